"""The Pi path end to end, here: cross-compiled aarch64 libraries run under a QEMU-emulated Pi.

Costs (measured here): the arm64 root takes about 45 s to build the first time (298 MB, cached in
~/.cache/search/pi-root, root needed for apt-get/debootstrap), about 0.1 s after; the run itself
about a minute.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env
from tests.rpc_helpers import free_port

EMULATOR = ROOT / "targets" / "emulator" / "pi_emulator.py"
PI_ROOT = Path.home() / ".cache" / "search" / "pi-root"  # machine-wide: not per test session


@pytest.fixture(scope="module")
def emulated_pi():
    setup = subprocess.run([sys.executable, str(EMULATOR), "setup", "--root", str(PI_ROOT)],
                           env=cli_env(), capture_output=True, text=True, timeout=1800)
    if setup.returncode != 0:
        pytest.fail(f"emulator setup failed: {setup.stderr[-1500:]}")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(EMULATOR), "serve", "--port", str(port),
                             "--root", str(PI_ROOT)], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("pi-emulator: serving on"), line
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_search_run_on_an_emulated_pi_is_labelled_emulated(emulated_pi, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("task: tests.tasks:tiny\ntrials: 3\nfinetune_steps: 2\n"
                      "tune_trials_per_task: 0\nseeds: [{}, {rank: 0.25}]\n")
    out = tmp_path / "pi"
    result = subprocess.run(
        [sys.executable, "-m", "search", "run", "--target", "raspberry-pi", "--rpc",
         f"127.0.0.1:{emulated_pi}", "--budget", "50ms", "--config", str(config), "--out",
         str(out)], env=cli_env(), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    front = json.loads((out / "front.json").read_text())
    assert front["emulated"] is True and front["trials"]["complete"] == 3
    for p in front["points"]:  # never reported as Pi latency
        assert p["latency_source"] == {"method": "emulated", "target": "raspberry-pi",
                                      "tuning": "untuned", "emulator": "qemu-aarch64"}
    assert "EMULATED" in result.stdout
    # the uploaded libraries were aarch64, and their outputs matched PyTorch (else failed trials)
    assert front["trials"]["failed"] == []
    export = subprocess.run([sys.executable, "-m", "search", "export", str(out),
                             str(front["points"][0]["trial"])], env=cli_env(),
                            capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr
    lib = next((out / "export").rglob("model_raspberry-pi.so"))
    assert b"\x7fELF" == lib.read_bytes()[:4] and lib.read_bytes()[18] == 183  # EM_AARCH64
