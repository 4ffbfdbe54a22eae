"""The cost of the device path: one tuned artifact timed locally, through a TVM RPC server on
loopback, and through a tracker on loopback; plus a run's tuning cost and kernel reuse.

    python bench/bench_rpc.py --run runs/host-5ms
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import optuna  # noqa: E402
import torch  # noqa: E402

from search.backend.compile import Compiler, to_relax  # noqa: E402
from search.backend.measure import run_and_time  # noqa: E402
from search.core.task import load_task  # noqa: E402
from search.devices.device import Device  # noqa: E402
from search.study.runfolder import RunInfo, tuning_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(args)


def wait_registered(tracker_port: int, key: str, timeout_s: float = 120) -> None:
    """Registration with the tracker is asynchronous: wait until the device is free there."""
    from tvm import rpc

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        queue = rpc.connect_tracker("127.0.0.1", tracker_port).summary().get("queue_info", {})
        if queue.get(key, {}).get("free", 0) > 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"no server registered under {key!r}")


def tuning_report(run_dir: Path) -> None:
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{run_dir / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    new = sum(t.user_attrs["new_kernels"] for t in done)
    secs = sum(t.user_attrs["tuning_s"] for t in done)
    print(f"tuning in {run_dir}: {new} kernels tuned in {secs:.0f} s "
          f"({secs / max(new, 1):.1f} s per kernel) over {len(done)} trials")
    for t in done:
        k = t.user_attrs.get("kernels")
        reused = "" if k is None else f", {k - t.user_attrs['new_kernels']}/{k} reused"
        print(f"  trial {t.number:>2}: {t.user_attrs['new_kernels']} new kernels, "
              f"{t.user_attrs['tuning_s']:.0f} s tuning{reused}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = RunInfo.load(args.run)
    target = info.load_target()
    task = load_task(info.config.task, **info.config.task_args)
    with torch.no_grad():
        ref = task.model(*task.example)
    tuned = Compiler(target, tuning_dir(target), trials_per_task=0)
    untuned = Compiler(target, Path(f"/tmp/search-bench-empty-{os.getpid()}"), 0)
    exe = tuned.compile(to_relax(task.model, task.example)).executable
    exe_untuned = untuned.compile(to_relax(task.model, task.example)).executable

    rpc_port, tracker_port = free_port(), free_port()
    server = start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(rpc_port),
                    "--port-end", str(rpc_port + 1)], rpc_port)
    tracker = start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                     str(tracker_port), "--port-end", str(tracker_port + 1)], tracker_port)
    pooled_port = free_port()
    pooled = start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(pooled_port),
                    "--port-end", str(pooled_port + 1), "--tracker",
                    f"127.0.0.1:{tracker_port}", "--key", "bench"], pooled_port)
    wait_registered(tracker_port, "bench")
    rows = []
    try:
        m = target.measurement
        rows.append(("uncompressed, untuned, local",
                     run_and_time(exe_untuned, task.example, ref, m).median_ms))
        rows.append(("uncompressed, tuned, local",
                     run_and_time(exe, task.example, ref, m).median_ms))
        rows.append(("uncompressed, tuned, RPC loopback", run_and_time(
            exe, task.example, ref, m, Device(rpc=f"127.0.0.1:{rpc_port}")).median_ms))
        rows.append(("uncompressed, tuned, tracker loopback", run_and_time(
            exe, task.example, ref, m,
            Device(tracker=f"127.0.0.1:{tracker_port}", key="bench")).median_ms))
    finally:
        for proc in (server, pooled, tracker):
            os.killpg(proc.pid, 9)
    local = rows[1][1]
    print(f"target {target.name}, task {task.name}, one thread, batch 1")
    print(f"{'artifact / path':<40} {'median ms':>10} {'vs tuned local':>15}")
    for name, ms in rows:
        print(f"{name:<40} {ms:>10.3f} {ms / local:>14.3f}x")
    tuning_report(args.run)


if __name__ == "__main__":
    main()
