"""aarch64 side of the emulated Raspberry Pi: a TVM RPC server run in this process.

Runs under ``qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11`` (``pi_emulator.py serve``
starts it). ``python -m tvm.exec.rpc_server`` cannot be used there: it starts its server in a
``sys.executable`` popen worker, and the x86 kernel cannot exec an aarch64 binary without
binfmt_misc. TVM's own server loop, what that worker runs, is started here directly
instead: its listen loop (``tvm.rpc.server._listen_loop``) forks one child per session, and
a fork stays inside QEMU.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType

os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the compiler library is deleted from the root

import tvm  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import rpc  # noqa: E402
from tvm.rpc import server as rpc_server  # noqa: E402

EMULATED_FUNC = "search.emulated"
EMULATED_TAG = "qemu-aarch64"


def _load_runtime_extra() -> None:
    """Load what runtime-only mode skips: tvm.contrib.random (MetaSchedule's RPCRunner fills
    its inputs with ``random_fill_for_measure``) and tvm.contrib.sort live in this library."""
    ctypes.CDLL(  # ctypes never unloads it, so its functions stay registered
        os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_extra.so"),
        ctypes.RTLD_LOCAL,
    )


def _stop(signum: int, _frame: FrameType | None) -> None:
    """End the forked sessions too, not only this process."""
    for child in multiprocessing.active_children():
        child.terminate()
    os._exit(0)


def _listen_forever(
    sock: socket.socket, port: int, key: str, tracker: tuple[str, int] | None
) -> None:
    """TVM's accept/fork loop, restarted when a session's child dies (e.g. a crashing library).

    ``_serving`` raises on a non-zero session exit without returning to its old cwd (a
    session temp dir that is then deleted), which would end the server or break the next session.
    """
    home = os.getcwd()
    while True:
        try:
            rpc_server._listen_loop(sock, port, key, tracker, None, None)
        except Exception as err:  # noqa: BLE001 - one bad session must not stop the device
            rpc_server.logger.warning("session failed (%s); still serving", err)
            os.chdir(home)
            time.sleep(0.5)


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

    # Loaded and registered before serving: each session's child is forked from here.
    _load_runtime_extra()
    tvm_ffi.register_global_func(EMULATED_FUNC, lambda: EMULATED_TAG)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    if args.silent:
        rpc_server.logger.setLevel("ERROR")
    sock = socket.socket(rpc.base.get_addr_family((args.host, args.port)), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1)
    listener = threading.Thread(
        target=_listen_forever, args=(sock, args.port, args.key, tracker), daemon=True
    )
    listener.start()
    if tracker is not None:
        _wait_registered(tracker, args.key, timeout_s=60.0)
    suffix = f" (tracker {args.tracker}, key {args.key})" if tracker else ""
    print(f"pi-emulator: serving on {args.host}:{args.port}{suffix}", flush=True)
    # Poll rather than signal.pause(): should the listener thread ever die, exit (non-zero)
    # instead of leaving a server that accepts nothing.
    while listener.is_alive():
        listener.join(0.5)
    return 1


if __name__ == "__main__":
    sys.exit(main())
