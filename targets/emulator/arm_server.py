"""aarch64 side of the emulated Raspberry Pi: a TVM RPC server run in this process.

Runs under ``qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11`` (``pi_emulator.py serve``
starts it). ``python -m tvm.exec.rpc_server`` cannot be used there: it starts its server in a
``sys.executable`` popen worker, and the x86 kernel cannot exec an aarch64 binary without
binfmt_misc. TVM's own ``PopenRPCServerState`` (what that worker runs) is started here directly
instead; it forks one child per session, and a fork stays inside QEMU.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
from types import FrameType

os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the compiler library is deleted from the root

import tvm_ffi  # noqa: E402
from tvm import rpc  # noqa: E402
from tvm.rpc import server as rpc_server  # noqa: E402

EMULATED_FUNC = "search.emulated"
EMULATED_TAG = "qemu-aarch64"


def _stop(signum: int, _frame: FrameType | None) -> None:
    """End the sessions too: the listen thread is not a daemon and would keep us alive."""
    for child in multiprocessing.active_children():
        child.terminate()
    os._exit(0)


def _wait_registered(tracker: tuple[str, int], key: str, timeout_s: float) -> None:
    """Block until the tracker lists a free server under ``key``, so 'ready' means requestable."""
    deadline = time.monotonic() + timeout_s
    session = rpc.connect_tracker(*tracker)
    try:
        while session.summary()["queue_info"].get(key, {}).get("free", 0) < 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not registered with tracker {tracker} as {key!r}")
            time.sleep(0.2)
    finally:
        session.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker")
    parser.add_argument("--key", default="", help="device key to register with the tracker")
    parser.add_argument("--silent", action="store_true", help="log errors only")
    args = parser.parse_args(argv)

    tracker = None
    if args.tracker:
        host, port = args.tracker.rsplit(":", 1)
        tracker = (host, int(port))
        if not args.key:
            parser.error("--tracker needs --key")

    # Registered before serving: each session's child is forked from here and inherits it.
    tvm_ffi.register_global_func(EMULATED_FUNC, lambda: EMULATED_TAG)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    state = rpc_server.PopenRPCServerState(
        args.host, args.port, args.port + 1, tracker_addr=tracker, key=args.key,
        silent=args.silent,
    )
    if tracker is not None:
        _wait_registered(tracker, args.key, timeout_s=60.0)
    suffix = f" (tracker {args.tracker}, key {args.key})" if tracker else ""
    print(f"pi-emulator: serving on {args.host}:{state.port}{suffix}", flush=True)
    while True:  # signals are handled in the main thread only
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
