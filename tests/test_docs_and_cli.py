"""The README's examples run, and the kvmcoal command works."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmcoal import cli, kvm

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_examples():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_two_command_quick_start():
    quick = re.search(r"## Quick start\n\n```sh\n(.*?)```", README.read_text(), flags=re.S)
    assert quick is not None
    commands = quick.group(1).strip().splitlines()
    assert commands == ["pip install -e '.[test]' && python -m kvmcoal demo", "python -m pytest"]


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs(index, capsys):
    exec(compile(readme_examples()[index], f"README example {index}", "exec"), {})


def test_demo_checks_every_write(capsys):
    assert cli.main(["demo", "--iterations", "500", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    if report["backend"] != "kvm":
        pytest.skip(f"/dev/kvm is not usable here: {kvm.why_unavailable()}")
    on, off = report["runs"]
    for run in (on, off):
        # Every write came through the ring or as its own exit (plus the final HLT).
        assert run["writes"] == 1500 and run["from_ring"] + run["exits"] - 1 == 1500
    assert off["from_ring"] == 0
    assert on["exits"] < off["exits"] / 20


def test_software_demo_delivers_everything():
    result = cli.run_software(1000)
    assert result["from_ring"] == result["writes"] == 3000


def test_probe_reports_the_host(capsys):
    assert cli.main(["probe", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ring_max"] == (info["page_size"] - 8) // 24
    assert info["kvm"] == kvm.available()


def test_command_line_entry_point():
    out = subprocess.run([sys.executable, "-m", "kvmcoal", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "demo" in out and "probe" in out
    bad = subprocess.run([sys.executable, "-m", "kvmcoal", "demo", "--iterations", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "at least 1" in bad.stderr
