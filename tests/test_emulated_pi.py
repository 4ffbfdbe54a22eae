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


def serve_emulated_pi(cpu: str):
    setup = subprocess.run([sys.executable, str(EMULATOR), "setup", "--root", str(PI_ROOT)],
                           env=cli_env(), capture_output=True, text=True, timeout=1800)
    if setup.returncode != 0:
        pytest.fail(f"emulator setup failed: {setup.stderr[-1500:]}")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(EMULATOR), "serve", "--port", str(port),
                             "--root", str(PI_ROOT), "--cpu", cpu], env=cli_env(),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("pi-emulator: serving on"), line
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def emulated_pi():
    yield from serve_emulated_pi("cortex-a72")  # the Pi 4


@pytest.fixture(scope="module")
def emulated_pi5():
    yield from serve_emulated_pi("cortex-a76")  # the Pi 5: the dot-product extension


def count_sdot(library: bytes) -> int:
    """SDOT instructions (vector and by-element forms, 4S) in an aarch64 binary's code."""
    import numpy as np

    words = np.frombuffer(library[:len(library) // 4 * 4], dtype="<u4")
    vector = (words & 0xFFE0FC00) == 0x4E809400
    element = (words & 0xFFC0F400) == 0x4F80E000
    return int(vector.sum() + element.sum())


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
                                      "tuning": "untuned", "emulator": "qemu-aarch64",
                                      "reference_ms": p["latency_source"]["reference_ms"]}
    assert "EMULATED" in result.stdout
    # the uploaded libraries were aarch64, and their outputs matched PyTorch (else failed trials)
    assert front["trials"]["failed"] == []
    export = subprocess.run([sys.executable, "-m", "search", "export", str(out),
                             str(front["points"][0]["trial"])], env=cli_env(),
                            capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr
    lib = next((out / "export").rglob("model_raspberry-pi.so"))
    assert b"\x7fELF" == lib.read_bytes()[:4] and lib.read_bytes()[18] == 183  # EM_AARCH64


@pytest.mark.slow
def test_int8_kernels_for_the_pi5_use_sdot_and_match_torch(emulated_pi5, tmp_path):
    """The Pi 5's int8 kernels (the "sdot" form: activation shifted to int8, 128 * sum(w) added
    back) run on the emulated Pi 5 (a CPU model with dotprod) and give PyTorch's output; the
    library holds sdot instructions (untuned: LLVM's vectorizer already emits them for this
    reduction; tuning over a direct --rpc is off, as for any device without a tracker)."""
    import torch

    from search.backend.compile import Compiler
    from search.backend.measure import compile_and_time
    from search.compress.int8 import ActQuant, calibrate, fold_batchnorm, quantize_layers
    from search.devices.target import Measurement, load_target
    from tests.test_int8_conv import CONVS, Net

    torch.manual_seed(0)
    net = Net().eval()
    for name in CONVS:
        fold_batchnorm(net, name)
    acts = calibrate(net, [*CONVS, "head"], [torch.randn(8, 3, 24, 24) for _ in range(2)])
    quantize_layers(net, acts)
    assert acts["head"] != ActQuant(0.0, 0)
    target = load_target("raspberry-pi-5").with_device(rpc=f"127.0.0.1:{emulated_pi5}")
    compiler = Compiler(target, tmp_path / "db", trials_per_task=0)
    x = torch.randn(1, 3, 24, 24)
    timed = compile_and_time(net, x, compiler, target, settings=Measurement(1, 1, 1), atol=1e-4)
    assert timed.compiled.int8_kernels == 4  # three convs, one Linear
    assert timed.source.method == "emulated"
    lib = tmp_path / "model.so"
    timed.compiled.executable.export_library(str(lib), cc=target.cross_compiler)
    assert count_sdot(lib.read_bytes()) > 0
    # a real signal: the same graph built for the Pi 4's A72 (no dot product) has none
    from search.backend.compile import to_relax

    pi4 = load_target("raspberry-pi")
    plain = Compiler(pi4, tmp_path / "db4", trials_per_task=0).compile(to_relax(net, x))
    plain.executable.export_library(str(tmp_path / "pi4.so"), cc=pi4.cross_compiler)
    assert count_sdot((tmp_path / "pi4.so").read_bytes()) == 0
