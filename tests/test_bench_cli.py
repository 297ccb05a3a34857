"""kvmcoal bench: the benchmark command, run for real at a tiny scale.

One run of every section (--scale 0.02: a few seconds) is shared by the
tests of its output; real KVM runs where /dev/kvm works, and is reported as
skipped, with the reason, where it does not.  Other runs check what the
command does without numpy, without gcc, with a peer that does not import
and beside CPU hogs (a busy machine), and a forced timing-check failure
checks the "unmeasured" path end to end.  No test judges a timing: this
machine is noisy, and the figures are kvmcoal bench's to report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import kvmcoal
from kvmcoal import bench, kvm
from kvmcoal.bench import cbuild, reporting, vmm, wakeup

SCALE = "0.02"


def _bench(*args: str, check: bool = True, env: dict[str, str] | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmcoal", "bench", *args],
                          capture_output=True, text=True, timeout=timeout, check=check, env=env)


def _methods(section: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A section's methods by key ("threads:kvmcoal" where it has threads and processes)."""
    if "methods" in section:
        return dict(section["methods"])
    return {f"{kind}:{key}": m for kind in ("threads", "processes")
            for key, m in section.get(kind, {}).items()}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], dict, Path | None]:
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "bench.json", out / "bench.png"
    args = ["--scale", SCALE, "--json", str(json_path)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png: Path | None = None
    else:
        args += ["--plot", str(png_path)]
        png = png_path
    run = _bench(*args)
    return run, json.loads(json_path.read_text()), png


def test_every_section_reports_figures_and_ratios(quick_run):
    run, report, _png = quick_run
    assert "Traceback" not in run.stderr
    assert list(report["sections"]) == list(bench.SECTIONS)
    assert report["meta"]["scale"] == float(SCALE) and report["meta"]["seconds"] > 0
    for name, section in report["sections"].items():
        if name == "kvm" and kvm.why_unavailable() is not None:
            assert "/dev/kvm" in section["skipped"]
            continue
        assert "skipped" not in section, (name, section)
        assert section["ratios"], name
        for r in section["ratios"]:
            assert {"name", "op", "target", "blocks", "met"} <= set(r), r
            if r.get("missing") or r.get("unmeasured"):
                assert r["met"] is None and r["blocks"] is None, r
                continue
            assert r["blocks"] > 0 and r["blocks_min"] <= r["blocks"] <= r["blocks_max"], r
            if r["op"] is None:
                assert r["met"] is None, r
            else:
                assert r["met"] is (r["blocks"] >= r["target"] if r["op"] == ">="
                                    else r["blocks"] <= r["target"]), r
        for key, m in _methods(section).items():
            assert m["label"], key
            assert m.get("missing") or m.get("unmeasured") or len(m) > 2, (key, m)


def test_the_consume_target_has_one_definition(quick_run):
    """consume / plain loop: against handler(a, d, p) with constant arguments, named so;
    the handler(*args) loop is a labelled reference, without a target."""
    run, report, _png = quick_run
    consumer = report["sections"]["consumer"]
    assert consumer["methods"]["plain_loop"]["label"] == (
        "plain Python loop, handler(a, d, p) x N, constant args")
    assert "handler(*args)" in consumer["methods"]["plain_loop_star"]["label"]
    by_name = {r["name"]: r for r in consumer["ratios"]}
    target = by_name["consume / plain loop"]
    assert (target["op"], target["target"]) == ("<=", 1.5)
    reference = by_name["consume / plain loop, handler(*args)"]
    assert reference["op"] is None and reference["met"] is None
    assert "plain Python loop, handler(a, d, p) x N, constant args" in run.stdout


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
    assert run.stdout.startswith(f"kvmcoal bench: kvmcoal {kvmcoal.__version__}")


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


def test_the_kvm_backend_is_in_the_meta_and_the_first_line(quick_run):
    run, report, _png = quick_run
    backend = getattr(kvm, "backend", None)
    if backend is None:
        pytest.skip("kvmcoal.kvm.backend() does not exist in this tree")
    name = backend()["backend"]
    assert report["meta"]["kvm_backend"]["backend"] == name
    assert f"KVM backend {name}" in run.stdout.splitlines()[0]


def test_plot_is_a_png(quick_run):
    _run, _report, png = quick_run
    if png is None:
        pytest.skip("matplotlib is not installed (pip install 'kvmcoal[plot]')")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_c_yardsticks_are_built_outside_the_package_and_the_tree(quick_run):
    """The quick run built cconsumer.c and cvmm.c (gcc is here): into the user's cache,
    not beside the sources."""
    _run, report, _png = quick_run
    package = Path(bench.__file__).resolve().parent
    built = [p for p in package.rglob("*")
             if p.is_file() and p.suffix not in (".py", ".c", ".pyc")]
    assert built == [], built
    assert not (package.parent.parent / "benchmarks" / "build").exists()
    if not report["sections"]["consumer"]["methods"]["c_consumer"].get("missing"):
        assert any(cbuild.cache_dir().glob("cconsumer-*"))


def test_a_build_goes_to_the_cache_named_by_its_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        first = cbuild.build("cvmm.c", "executable")
    except cbuild.CBuildUnavailable as exc:
        pytest.skip(str(exc))
    assert first.parent == tmp_path / "kvmcoal" / "bench" and os.access(first, os.X_OK)
    assert cbuild.build("cvmm.c", "executable") == first              # built once
    assert cbuild.build("cvmm.c", "executable", ["-O1"]) != first     # other flags, other build
    assert sorted(p.name for p in first.parent.iterdir()) == sorted(
        [first.name, cbuild.build("cvmm.c", "executable", ["-O1"]).name])  # no temporaries


def test_json_to_stdout_and_one_section():
    run = _bench("--only", "producer", "--scale", SCALE, "--json", "-", "--quiet")
    report = json.loads(run.stdout)
    assert list(report["sections"]) == ["producer"]
    assert run.stderr == ""


def test_help_is_plain_text():
    run = _bench("--help")
    assert "--scale" in run.stdout and "--blocks" in run.stdout
    for markup in ("``", ":func:", ":meth:", ":class:", ":mod:"):
        assert markup not in run.stdout, markup
    assert "consumer  draining a full ring" in run.stdout        # the section list, as written


def test_bad_arguments_are_refused_clearly(tmp_path):
    bad = _bench("--only", "nonsense", check=False)
    assert bad.returncode == 2 and "invalid choice: 'nonsense'" in bad.stderr
    for scale in ("0", "inf", "nan"):
        bad = _bench("--scale", scale, check=False)
        assert bad.returncode == 1 and "--scale must be a positive number" in bad.stderr
    bad = _bench("--blocks", "0", check=False)
    assert bad.returncode == 1 and "--blocks must be at least 1" in bad.stderr
    bad = _bench("--benchmarks", str(tmp_path), check=False)    # gone: nothing to find
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


def test_table_marks_skipped_sections_missing_and_unmeasured_rows():
    report = {
        "meta": {"kvmcoal": "0", "ring_module": "m", "python": "3", "machine": "x",
                 "scale": 1.0, "seconds": 1.0},
        "sections": {
            "kvm": {"skipped": "/dev/kvm cannot be used: absent"},
            "transfer": {"processes": {
                "ff": {"label": "faster-fifo", "missing": "No module"},
                "k": {"label": "kvmcoal", "unmeasured": "too busy", "retried": 9}},
                "ratios": [{"name": "records/s: kvmcoal / faster-fifo", "op": ">=",
                            "target": 2.0, "blocks": None, "missing": "No module",
                            "met": None},
                           {"name": "records/s: kvmcoal / Queue", "op": ">=", "target": 10.0,
                            "blocks": None, "unmeasured": "kvmcoal: too busy", "met": None}]},
        },
    }
    text = bench.format_table(report)
    assert "kvm: skipped: /dev/kvm cannot be used: absent" in text
    assert "faster-fifo" in text and text.count("missing: No module") == 2
    assert text.count("unmeasured: ") == 2 and "unmeasured: kvmcoal: too busy" in text
    missed, not_judged = reporting.judge(report)
    assert missed == []
    assert not_judged == ["kvm section (skipped: /dev/kvm cannot be used: absent)",
                          "records/s: kvmcoal / faster-fifo (missing: No module)",
                          "records/s: kvmcoal / Queue (unmeasured: kvmcoal: too busy)"]
    assert "targets not judged" in reporting.check_messages(missed, not_judged)[0]


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


def _pythonpath(first: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(first), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_check_fails_when_a_target_cannot_be_judged(tmp_path):
    """A peer that does not import leaves its target without a verdict: --check says
    which, and fails, rather than passing on the targets that were judged."""
    (tmp_path / "faster_fifo.py").write_text("raise ImportError('hidden by the test')\n")
    run = _bench("--only", "transfer", "--scale", "0.005", "--quiet", "--check", check=False,
                 env=_pythonpath(tmp_path))
    assert run.returncode == 1
    assert "targets not judged" in run.stderr and "faster-fifo" in run.stderr
    assert "hidden by the test" in run.stdout          # the table says why it is missing


def test_without_numpy_the_numpy_rows_are_missing_and_the_rest_measured(tmp_path):
    """numpy cannot be imported at all (sitecustomize sets sys.modules['numpy'] = None, in
    this process and in every one it starts): no traceback; the numpy outputs are missing,
    saying how to install it; everything else is measured."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['numpy'] = None\n")
    out = tmp_path / "bench.json"
    run = _bench("--scale", "0.01", "--quiet", "--json", str(out), check=False,
                 env=_pythonpath(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    report = json.loads(out.read_text())
    numpy_rows = {"drain_into_numpy", "c_consumer_numpy"}
    for name, section in report["sections"].items():
        if "skipped" in section:
            assert name == "kvm" and kvm.why_unavailable() is not None, section
            continue
        for key, m in _methods(section).items():
            if name == "consumer" and key in numpy_rows:
                assert m["missing"] == reporting.NUMPY_MISSING, m
            elif name == "consumer" and key.startswith("c_consumer") and m.get("missing"):
                assert "gcc" in m["missing"] or "header" in m["missing"], m   # no compiler here
            else:
                assert not m.get("missing") and not m.get("unmeasured"), (name, key, m)
    ratios = {r["name"]: r for r in report["sections"]["consumer"]["ratios"]}
    assert ratios["QEMU-loop / drain_into (numpy)"]["missing"] == reporting.NUMPY_MISSING
    assert ratios["QEMU-loop / drain_into (bytearray)"]["met"] is not None
    assert f"missing: {reporting.NUMPY_MISSING}" in run.stdout


def test_kvm_section_without_a_c_compiler_still_measures_the_python_vmm(tmp_path,
                                                                         monkeypatch):
    """With no gcc on PATH and nothing built yet (an empty cache), only the C runs and the
    ratios against them are missing, saying why; the Python VMM's runs and its coalescing
    target remain."""
    reason = kvm.why_unavailable()
    if reason is not None:
        pytest.skip(f"/dev/kvm cannot be used here: {reason}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    report = vmm.measure(300, 1)
    methods = report["methods"]
    assert methods["c_coalesced"]["missing"] == methods["c_uncoalesced"]["missing"]
    assert "gcc is not installed" in methods["c_coalesced"]["missing"]
    assert methods["python_coalesced"]["median_stores_per_s"] > 0
    by_name = {r["name"]: r for r in report["ratios"]}
    coalescing = by_name["stores/s: python coalesced / python uncoalesced"]
    assert coalescing["met"] is not None and not coalescing.get("missing")
    against_c = [r for r in report["ratios"] if "C " in r["name"]]
    assert against_c and all(r["met"] is None and r["missing"] for r in against_c)
    text = bench.format_table({"meta": {**reporting.environment(), "scale": 1.0},
                               "sections": {"kvm": report}})
    assert "the C VMM is missing" in text and text.count("gcc is not installed") >= 4
    assert report["python_minus_c_ns_per_store_coalesced"] is None
    assert not list(tmp_path.rglob("cvmm-*"))


# ---------------------------------------------------------------------------
# A busy machine: timing checks never end in a traceback


class _WriteAlwaysEarly(wakeup.ThreadWakeups):
    """Every kvmcoal round trip fails the timing check, as if the write had come before
    the consumer went to sleep (t0 at the epoch, before any t_enter)."""

    def _check_received(self, mode: str, t0: Any, got: Any) -> int:
        t0 = super()._check_received(mode, t0, got)      # the data checks still run
        return 0 if mode == "kvmcoal" else t0


def test_a_sample_that_keeps_failing_its_timing_check_is_unmeasured():
    section = wakeup.measure(20, 2, harnesses={"threads": _WriteAlwaysEarly})
    methods = section["threads"]
    why = methods["kvmcoal"]["unmeasured"]
    assert "timing check" in why and "the write was not made while it slept" in why
    # Bounded: at most LEAST_RETRIES + 1 retries of its 20 warm-up round trips, then none.
    assert 0 < methods["kvmcoal"]["retried"] <= reporting.LEAST_RETRIES + 1
    for mode in ("eventfd", "vm_write"):     # the other modes, interleaved with it, measured
        assert methods[mode]["samples"] == 20 and methods[mode]["retried"] == 0
    by_name = {r["name"]: r for r in section["ratios"]}
    target = by_name["wake p50, threads: kvmcoal / eventfd"]
    assert target["met"] is None and target["blocks"] is None
    assert target["unmeasured"].startswith(f"{methods['kvmcoal']['label']}: ")
    assert by_name["wake p50, threads: vm.write / eventfd"]["blocks"] > 0
    report = {"meta": {**reporting.environment(), "scale": 1.0}, "sections": {"wakeup": section}}
    text = bench.format_table(report)
    assert f"unmeasured: {why}" in text
    _missed, not_judged = reporting.judge(report)
    assert not_judged == [f"wake p50, threads: kvmcoal / eventfd (unmeasured: "
                          f"{target['unmeasured']})"]


def test_the_retry_budget_is_bounded_and_never_hides_a_data_failure():
    def invalid() -> None:
        raise reporting.InvalidSample("the consumer was not asleep")

    with pytest.raises(reporting.Unmeasured, match="3 times in a row.*not asleep"):
        reporting.valid_sample(invalid, reporting.RetryBudget(10, per_sample=3))
    budget = reporting.RetryBudget(10, least=2)
    calls = iter([reporting.InvalidSample("late"), None] * 3)

    def flaky() -> str:
        exc = next(calls)
        if exc is not None:
            raise exc
        return "ok"

    assert reporting.valid_sample(flaky, budget) == "ok"
    assert reporting.valid_sample(flaky, budget) == "ok"
    with pytest.raises(reporting.Unmeasured, match="3 samples failed.*more than 2 of 10"):
        reporting.valid_sample(flaky, budget)

    def lost() -> None:
        raise AssertionError("record 7 is missing")

    with pytest.raises(AssertionError, match="record 7"):          # data: raised at once
        reporting.valid_sample(lost, reporting.RetryBudget(10))


def test_wakeup_beside_cpu_hogs_reports_figures_or_why_not(tmp_path):
    """One CPU hog per CPU beside kvmcoal bench --only wakeup: it ends with status 0 and
    valid JSON, no traceback, and every method has its figures or an unmeasured reason."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(len(os.sched_getaffinity(0)))]
    out = tmp_path / "wakeup.json"
    try:
        run = _bench("--only", "wakeup", "--scale", "0.2", "--quiet", "--json", str(out),
                     check=False, timeout=120)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    section = json.loads(out.read_text())["sections"]["wakeup"]
    for key, m in _methods(section).items():
        assert ("p50_us" in m and "p99_us" in m) or m["unmeasured"], (key, m)
    for r in section["ratios"]:
        assert (r["blocks"] is not None) != bool(r.get("unmeasured")), r
