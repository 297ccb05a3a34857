"""The kvmcoal command: demo, probe and the top-level help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmcoal import cli, kvm


@pytest.mark.parametrize("producer", ["kvm", "emulated"])
def test_demo_runs_as_a_command(producer):
    if producer == "kvm" and not kvm.available():
        pytest.skip(f"/dev/kvm is not usable here: {kvm.why_unavailable()}")
    run = subprocess.run([sys.executable, "-m", "kvmcoal", "demo", "--producer", producer,
                          "--iterations", "3000"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "kvmcoal demo guest: hello through a coalesced UART" in run.stdout
    assert "speed-up from coalescing" in run.stdout
    assert "coalescing on" in run.stderr    # the progress lines
    report = json.loads(subprocess.run(
        [sys.executable, "-m", "kvmcoal", "demo", "--producer", producer, "--iterations", "3000",
         "--json"], capture_output=True, text=True, check=True, timeout=120).stdout)
    on, off = report["runs"]
    assert report["producer"] == producer
    assert report["kvm_backend"] == kvm.backend()["backend"]   # the host's, whichever ran
    if producer == "kvm":
        assert f"on real KVM ({report['kvm_backend']})" in run.stdout
    assert on["writes"] == off["writes"] == cli.guest_writes(3000)
    assert on["uart"] == cli.expected_uart(3000).decode()
    assert off["from_ring"] == 0 and off["exits"] == off["writes"]
    assert on["exits"] < on["writes"] / 50      # almost everything went through the ring


def test_demo_checks_the_devices():
    result = cli.run_emulated(5000, coalesced=True)
    assert result["uart"].startswith(cli.BANNER.decode())
    fb = cli.expected_framebuffer(20000)           # wraps the 64 KiB window
    assert fb[:4] == (16384).to_bytes(4, "little") and fb[-4:] == (16383).to_bytes(4, "little")


def test_probe_runs_as_a_command():
    run = subprocess.run([sys.executable, "-m", "kvmcoal", "probe"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and "ring_max" in run.stdout


def test_probe_reports_the_host(capsys):
    assert cli.main(["probe", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ring_max"] == (info["page_size"] - 8) // 24
    assert info["kvm"] == kvm.available()
    backend = kvm.backend()
    assert info["kvm_backend"] == backend["backend"]
    assert info["kvm_hardware_assisted"] == backend["hardware_assisted"]
    assert ("kvm_note" in info) == (backend["hardware_assisted"] is False)


def test_command_line_entry_point():
    out = subprocess.run([sys.executable, "-m", "kvmcoal", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "demo" in out and "probe" in out
    bad = subprocess.run([sys.executable, "-m", "kvmcoal", "demo", "--iterations", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "at least 1" in bad.stderr
    assert "usage: kvmcoal demo" in bad.stderr     # the demo's usage, not the top level
