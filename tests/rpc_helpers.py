"""Real TVM RPC servers and trackers on loopback, started and stopped by the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.conftest import cli_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def process(args: list[str]) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-m", *args], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        yield proc
    finally:
        kill(proc)


def kill(proc: subprocess.Popen) -> None:
    """The server and the workers it forked: the whole process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def rpc_server(tracker: str | None = None, key: str = "") -> Iterator[tuple[int, subprocess.Popen]]:
    port = free_port()
    args = ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
            "--port-end", str(port + 1)]
    if tracker:
        args += ["--tracker", tracker, "--key", key]
    with process(args) as proc:
        wait_port(port)
        yield port, proc


@contextmanager
def rpc_tracker() -> Iterator[str]:
    port = free_port()
    with process(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                  "--port-end", str(port + 1)]):
        wait_port(port)
        yield f"127.0.0.1:{port}"


def wait_key(tracker: str, key: str, servers: int, timeout: float = 60) -> None:
    """Until `servers` devices are registered under `key` (registration is asynchronous)."""
    from tvm import rpc

    host, port = tracker.rsplit(":", 1)
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = rpc.connect_tracker(host, int(port)).summary()
        free = info.get("queue_info", {}).get(key, {}).get("free", 0)
        if free >= servers:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{servers} servers did not register under {key!r}")
