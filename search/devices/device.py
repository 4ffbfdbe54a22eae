"""Reaching the device: this process, a TVM RPC server, or a TVM RPC tracker's device pool.

No protocol of our own: sessions are `tvm.rpc.connect` / `connect_tracker(...).request(key)`.
A tracker serializes measurements per device (one session per server at a time), so several
searches can share a pool.
"""

from __future__ import annotations

import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.core.errors import UserError

SERVER_HINT = "python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090"


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"{what} {text!r} must look like HOST:PORT, e.g. 192.168.1.20:9090")
    return host, int(port)


@dataclass(frozen=True)
class Device:
    """Where candidates run. rpc and tracker are HOST:PORT strings; tracker needs a key."""

    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    cross_compiler: str | None = None  # e.g. aarch64-linux-gnu-gcc for a Pi
    session_timeout_s: int = 600

    @property
    def local(self) -> bool:
        return self.rpc is None and self.tracker is None

    def describe(self) -> str:
        if self.tracker:
            return f"tracker {self.tracker} key {self.key}"
        return f"rpc {self.rpc}" if self.rpc else "local"

    def check_reachable(self, target_name: str) -> None:
        """Before any work: the address answers, else one line saying what to start where."""
        if self.local:
            return
        address = self.tracker or self.rpc
        host, port = parse_address(address, "tracker" if self.tracker else "--rpc address")
        if self.tracker and not self.key:
            raise UserError("--tracker needs --key KEY (the key the device's RPC server "
                            "registered with)")
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            start = (f"python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}, and on each "
                     f"device: python -m tvm.exec.rpc_server --tracker {address} --key {self.key}"
                     if self.tracker else
                     f"on the device: python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}")
            raise UserError(f"no TVM RPC {'tracker' if self.tracker else 'server'} answers at "
                            f"{address} for target {target_name!r} ({exc.strerror or exc}); "
                            f"start one: {start}") from None
        if self.tracker:
            self._check_key()

    def _check_key(self) -> None:
        from tvm import rpc

        host, port = parse_address(self.tracker, "tracker")
        summary = rpc.connect_tracker(host, port).summary()
        keys = {q for q in summary.get("queue_info", {})}
        if self.key not in keys:
            raise UserError(f"tracker {self.tracker} has no device under key {self.key!r} "
                            f"(keys: {', '.join(sorted(keys)) or 'none'}); start one: "
                            f"python -m tvm.exec.rpc_server --tracker {self.tracker} "
                            f"--key {self.key}")

    def session(self) -> Any:
        """A fresh RPC session (for a tracker: a free device of the key)."""
        from tvm import rpc

        if self.tracker:
            host, port = parse_address(self.tracker, "tracker")
            return rpc.connect_tracker(host, port).request(
                self.key, session_timeout=self.session_timeout_s)
        host, port = parse_address(self.rpc, "--rpc address")
        return rpc.connect(host, port, session_timeout=self.session_timeout_s)

    def emulation(self, session: Any) -> str | None:
        """What emulates the device, if the server says so (our QEMU Pi registers this)."""
        try:
            return str(session.get_function("search.emulated")())
        except Exception:  # noqa: BLE001 - a real device has no such function
            return None

    def load(self, session: Any, executable: Any, name: str = "candidate") -> Any:
        """Export the compiled module for the device, upload it, load it there."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.so"
            if self.cross_compiler:
                executable.export_library(str(path), cc=self.cross_compiler)
            else:
                executable.export_library(str(path))
            session.upload(str(path))
        return session.load_module(f"{name}.so")
