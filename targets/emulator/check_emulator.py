"""End-to-end check of the emulated Pi: cross-compile, upload, run and time, direct and via tracker.

Run with the x86 venv: ``python targets/emulator/check_emulator.py [--root DIR]``. Exits 0 only
when every check passes; prints one line per check and the costs it measured.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from torch import nn  # noqa: E402
from tvm import relax, rpc  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

HERE = Path(__file__).resolve().parent
EMULATOR = HERE / "pi_emulator.py"
READY = "pi-emulator: serving on"
KEY = "pi-emu"


class Checks:
    """Collects pass/fail lines so one failure does not hide the others."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.failed.append(name)
        return ok


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def process(
    cmd: list[str],
    ready: Callable[[str], bool] | None,
    timeout_s: float,
) -> Iterator[float]:
    """Start cmd, yield the seconds until a stdout line satisfies ``ready``, then stop its group.

    A group, because ``python -m tvm.exec.rpc_tracker`` runs the tracker in a popen worker that
    outlives a plain SIGTERM to its parent.
    """
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(f"    | {line}")
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        while ready is not None:
            line = lines.get(timeout=max(0.0, start + timeout_s - time.monotonic()))
            if line is None:
                raise RuntimeError(f"{cmd[:3]} exited with {proc.wait()} before it was ready")
            if ready(line):
                break
        yield time.monotonic() - start
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def build(path: Path) -> tuple[nn.Module, torch.Tensor]:
    """Cross-compile a small MLP for the Pi 4 with the Debian aarch64 gcc."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(1, 16)
    ep = torch.export.export(model, (x,))
    mod = from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    ex = tvm.compile(mod, target=tvm.target.Target("raspberry-pi/4b-aarch64"))
    ex.export_library(str(path), cc="aarch64-linux-gnu-gcc")
    return model, x


def exercise(
    connect: Callable[[], rpc.RPCSession],
    lib_path: Path,
    model: nn.Module,
    x: torch.Tensor,
    check: Checks,
    label: str,
) -> None:
    """Upload, load, run and time the library in one remote session; errors fail the path."""
    try:
        remote = connect()
        emulated = remote.get_function("search.emulated")()
        check(f"{label}: search.emulated", emulated == "qemu-aarch64", repr(emulated))
        remote.upload(str(lib_path))
        dev = remote.cpu()
        vm = relax.VirtualMachine(remote.load_module(lib_path.name), dev)
        arg = tvm.runtime.tensor(x.numpy(), dev)
        start = time.monotonic()
        out = vm["main"](arg).numpy()
        first_ms = (time.monotonic() - start) * 1e3
        with torch.no_grad():
            expect = model(x).numpy()
        err = float(np.abs(out - expect).max())
        check(
            f"{label}: output matches PyTorch",
            np.allclose(out, expect, rtol=1e-4, atol=1e-5),
            f"max abs error {err:.2e}, first call {first_ms:.1f} ms incl. RPC",
        )
        start = time.monotonic()
        res = vm.time_evaluator("main", dev, number=100, repeat=5)(arg)
        eval_s = time.monotonic() - start
        check(
            f"{label}: remote time_evaluator",
            res.median > 0,
            f"median {res.median * 1e3:.4f} ms (emulated, not a Pi timing), "
            f"evaluator took {eval_s:.1f} s",
        )
    except Exception as exc:  # noqa: BLE001 - reported as a failed check
        check(f"{label}: session", False, f"{type(exc).__name__}: {exc}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="arm64 root (pi_emulator.py's default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = ["--root", args.root] if args.root else []
    check = Checks()
    start = time.monotonic()

    t0 = time.monotonic()
    subprocess.run([sys.executable, str(EMULATOR), "setup", *root], check=True)
    check("setup", True, f"{time.monotonic() - t0:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        lib_path = Path(tmp) / "mlp_aarch64.so"
        t0 = time.monotonic()
        model, x = build(lib_path)
        print(f"cross-compiled in {time.monotonic() - t0:.1f} s", flush=True)
        kind = subprocess.run(["file", "-b", str(lib_path)], capture_output=True, text=True).stdout
        check(
            "export_library gives an aarch64 ELF",
            "ELF 64-bit" in kind and "aarch64" in kind,
            kind.split(",")[1].strip() if "," in kind else kind.strip(),
        )

        port = free_port()
        serve = [sys.executable, str(EMULATOR), "serve", "--port", str(port), *root]
        with process(serve, lambda line: line.startswith(READY), 300) as ready_s:
            check("server ready (direct)", True, f"{ready_s:.1f} s after start")
            exercise(lambda: rpc.connect("127.0.0.1", port), lib_path, model, x, check, "direct")

        tport, sport = free_port(), free_port()
        tracker = [
            sys.executable,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(tport),
            "--port-end",
            str(tport + 1),
        ]
        with process(tracker, None, 60):
            wait_port(tport, 60)
            serve = [
                sys.executable,
                str(EMULATOR),
                "serve",
                "--port",
                str(sport),
                *root,
                "--tracker",
                f"127.0.0.1:{tport}",
                "--key",
                KEY,
            ]
            with process(serve, lambda line: line.startswith(READY), 300) as ready_s:
                check("server ready (tracker)", True, f"{ready_s:.1f} s after start")
                exercise(
                    lambda: rpc.connect_tracker("127.0.0.1", tport).request(KEY),
                    lib_path,
                    model,
                    x,
                    check,
                    "tracker",
                )

    print(
        f"check took {time.monotonic() - start:.1f} s; "
        f"{'all passed' if not check.failed else 'FAILED: ' + ', '.join(check.failed)}"
    )
    return 0 if not check.failed else 1


if __name__ == "__main__":
    sys.exit(main())
