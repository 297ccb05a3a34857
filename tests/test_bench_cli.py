"""``kvmcoal bench``: the quick benchmark command, run for real at a tiny scale.

One run of every section (``--scale 0.02``: a few seconds) is shared by the
tests of its output; real KVM runs where /dev/kvm works, and is reported as
skipped, with the reason, where it does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmcoal import bench, kvm

SCALE = "0.02"


def _bench(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmcoal", "bench", *args],
                          capture_output=True, text=True, timeout=300, check=check)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "bench.json", out / "bench.png"
    args = ["--scale", SCALE, "--json", str(json_path)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png_path = None
    else:
        args += ["--plot", str(png_path)]
    run = _bench(*args)
    return run, json.loads(json_path.read_text()), png_path


def test_every_section_reports_figures_and_ratios(quick_run):
    _run, report, _png = quick_run
    assert list(report["sections"]) == list(bench.SECTIONS)
    for name, section in report["sections"].items():
        if name == "kvm" and kvm.why_unavailable() is not None:
            assert "/dev/kvm" in section["skipped"]
            continue
        assert "skipped" not in section, (name, section)
        assert section["ratios"], name
        for r in section["ratios"]:
            assert {"name", "op", "target", "met"} <= set(r), r
            if not r.get("missing"):
                assert r["blocks"] > 0 and r["blocks_min"] <= r["blocks"] <= r["blocks_max"], r
                if r["op"] is None:
                    assert r["met"] is None, r
                else:
                    assert r["met"] is (r["blocks"] >= r["target"] if r["op"] == ">="
                                        else r["blocks"] <= r["target"]), r


def test_consumer_batches_cover_every_method_and_size(quick_run):
    _run, report, _png = quick_run
    batches = report["sections"]["consumer"]["batches"]
    sizes = {b["entries"] for b in batches}
    assert {1, 8, 64} <= sizes and max(sizes) > 64          # 1, 8, 64 and a full ring
    assert all(b["best_ns_per_entry"] > 0 for b in batches)


def test_table_shows_every_ratio_and_the_targets(quick_run):
    run, report, _png = quick_run
    for section in report["sections"].values():
        for r in section.get("ratios", ()):
            assert r["name"] in run.stdout
    assert "met" in run.stdout or "MISSED" in run.stdout
    # Progress went to stderr, the table to stdout.
    assert "consumer:" in run.stderr and "[" in run.stderr


def test_real_kvm_section_runs_here_or_says_why(quick_run):
    run, report, _png = quick_run
    section = report["sections"]["kvm"]
    reason = kvm.why_unavailable()
    if reason is not None:
        print(f"/dev/kvm unusable here ({reason}): the kvm section must say so")
        assert "skipped" in section and "kvm: skipped" in run.stdout
        return
    methods = section["methods"]
    assert methods["python_coalesced"]["exits"] < methods["python_uncoalesced"]["exits"]


def test_plot_is_a_png(quick_run):
    _run, _report, png = quick_run
    if png is None:
        pytest.skip("matplotlib is not installed (pip install 'kvmcoal[plot]')")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_to_stdout_and_one_section():
    run = _bench("--only", "producer", "--scale", SCALE, "--json", "-", "--quiet")
    report = json.loads(run.stdout)
    assert list(report["sections"]) == ["producer"]
    assert run.stderr == ""


def test_bad_arguments_are_refused_clearly(tmp_path):
    bad = _bench("--only", "nonsense", check=False)
    assert bad.returncode == 2 and "invalid choice: 'nonsense'" in bad.stderr
    for scale in ("0", "inf", "nan"):
        bad = _bench("--scale", scale, check=False)
        assert bad.returncode == 1 and "--scale must be a positive number" in bad.stderr
    bad = _bench("--benchmarks", str(tmp_path), "--quiet", check=False)
    assert bad.returncode == 1 and "found none at" in bad.stderr


def test_table_marks_skipped_sections_and_missing_peers():
    report = {
        "meta": {"kvmcoal": "0", "ring_module": "m", "python": "3", "machine": "x",
                 "scale": 1.0, "seconds": 1.0},
        "sections": {
            "kvm": {"skipped": "/dev/kvm cannot be used: absent"},
            "transfer": {"methods": {"ff": {"label": "faster-fifo", "missing": "No module"}},
                         "ratios": [{"name": "records/s: kvmcoal / faster-fifo", "op": ">=",
                                     "target": 2.0, "missing": "No module", "met": None}]},
        },
    }
    text = bench.format_table(report)
    assert "kvm: skipped: /dev/kvm cannot be used: absent" in text
    assert "faster-fifo" in text and text.count("missing: No module") == 2


def test_outputs_and_plot_are_checked_before_anything_is_measured(tmp_path):
    """A bad --json/--plot path or a plot with nothing to draw fails at once, not after
    a run's worth of measuring (no section ever starts)."""
    cases = [
        (["--plot", str(tmp_path / "no" / "dir" / "b.png")], "does not exist"),
        (["--json", str(tmp_path)], "is a directory"),
        (["--json", str(tmp_path / "no" / "x.json")], "does not exist"),
        (["--only", "producer", "--skip", "producer"], "nothing to run"),
    ]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        cases.append((["--plot", str(tmp_path / "b.png")], "needs matplotlib"))
    else:
        cases += [(["--plot", str(tmp_path / "b.bogus")], "cannot write 'bogus'"),
                  (["--only", "producer", "--plot", str(tmp_path / "b.png")],
                   "nothing to plot")]
    for args, message in cases:
        bad = _bench(*args, check=False)
        assert bad.returncode == 1 and message in bad.stderr, (args, bad.stderr)
        assert "starting" not in bad.stderr, args
    assert not list(tmp_path.iterdir())


def test_json_to_dev_stdout_is_json_only():
    run = _bench("--only", "producer", "--scale", "0.005", "--json", "/dev/stdout", "--quiet")
    assert json.loads(run.stdout)["sections"]["producer"]


def test_check_fails_when_a_target_cannot_be_judged(tmp_path):
    """A peer that does not import leaves its target without a verdict: --check says
    which, and fails, rather than passing on the targets that were judged."""
    (tmp_path / "faster_fifo.py").write_text("raise ImportError('hidden by the test')\n")
    run = subprocess.run(
        [sys.executable, "-m", "kvmcoal", "bench", "--only", "transfer", "--scale", "0.005",
         "--quiet", "--check"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert run.returncode == 1
    assert "targets not judged" in run.stderr and "faster-fifo" in run.stderr
    assert "hidden by the test" in run.stdout          # the table says why it is missing


def test_kvm_section_without_the_c_vmm_still_measures_the_python_vmm(monkeypatch):
    """Where cvmm.c cannot be built (no gcc), only the C runs and the ratios against
    them are missing; the Python VMM's runs and its coalescing target remain."""
    reason = kvm.why_unavailable()
    if reason is not None:
        pytest.skip(f"/dev/kvm cannot be used here: {reason}")
    reports = bench.load_reports(bench.find_benchmarks())
    kw = reports["report_kvm"].kw

    def no_gcc(*_args, **_kwargs):
        raise kw.CvmmUnavailable("gcc is not installed (simulated by the test)")

    monkeypatch.setattr(kw, "CvmmServer", no_gcc)
    report = reports["report_kvm"].measure(300, 1)
    methods = report["methods"]
    assert methods["c_coalesced"]["missing"] == methods["c_uncoalesced"]["missing"]
    assert "simulated" in methods["c_coalesced"]["missing"]
    assert methods["python_coalesced"]["median_stores_per_s"] > 0
    by_name = {r["name"]: r for r in report["ratios"]}
    coalescing = by_name["stores/s: python coalesced / python uncoalesced"]
    assert coalescing["met"] is not None and not coalescing.get("missing")
    against_c = [r for r in report["ratios"] if "C " in r["name"]]
    assert against_c and all(r["met"] is None and r["missing"] for r in against_c)
    text = reports["report_kvm"].format_table(report)
    assert "the C VMM is missing" in text and text.count("simulated") >= 2
    assert report["python_minus_c_ns_per_store_coalesced"] is None
