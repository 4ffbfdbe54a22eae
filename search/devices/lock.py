"""Exclusive use of shared things by the workers of one machine: OS file locks
(`fcntl.flock`, released by the OS if a worker dies).

- A device, named by what it is (this host's CPU, an RPC server's address), not by its target
  file: two trials timing (or tuning) on one device at once would slow each other and corrupt
  both figures; and while a candidate is timed on this CPU, our fine-tunes on it wait between
  steps (`cpu_turn`), so a figure from a run with workers is one with nothing else of ours on
  the CPU. Devices from a TVM RPC tracker need no lock here: the tracker hands each device to
  one session at a time, across machines.
- A tuning database: MetaSchedule's JSONDatabase refers to workloads by line number, so two
  processes appending at once would corrupt it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from search.devices.target import TargetSpec


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold `path` (created if missing) exclusively (or shared with other shared holders),
    blocking until it is free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def physical_device(target: TargetSpec) -> str:
    """The device a target times on, by what it is, not by its file: this host's CPU, or the
    RPC server's address (its host resolved, so `localhost` and `127.0.0.1` are one device).
    Two target files for one CPU then exclude each other."""
    if not target.rpc:
        return physical_device_here()
    host, _, port = target.rpc.rpartition(":")
    try:
        host = socket.gethostbyname(host)
    except OSError:
        pass  # unresolvable: the address as written (the device check reports it)
    return f"rpc@{host}:{port}"


def lock_dir() -> Path:
    """Machine-wide, not per user or cache folder: runs with different HOMEs or cache folders
    on one machine share its CPU. SEARCH_LOCK_DIR overrides (tests)."""
    path = Path(os.environ.get("SEARCH_LOCK_DIR") or Path(tempfile.gettempdir()) / "search-locks")
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            path.chmod(0o1777)  # every user's runs lock here
    return path


_HELD = 0  # this process holds a device exclusively (its own CPU work then needs no turn)


def _lock_path(who: str) -> Path:
    name = f"{re.sub(r'[^A-Za-z0-9_.@-]', '_', who)}-{hashlib.sha1(who.encode()).hexdigest()[:8]}"
    return lock_dir() / f"{name}.lock"


@contextlib.contextmanager
def device_lock(target: TargetSpec) -> Iterator[None]:
    """Hold the target's physical device exclusively (no-op for a tracker's pool). On this
    host's CPU it also waits for, and then holds off, our CPU work there (`cpu_turn`): the
    gate first, so fine-tune steps arriving meanwhile wait behind the timing (no starvation)."""
    global _HELD
    if target.tracker:
        yield
        return
    path = _lock_path(physical_device(target))
    gate = path.with_suffix(".gate")
    with file_lock(gate), file_lock(path):
        _HELD += 1
        try:
            yield
        finally:
            _HELD -= 1


@contextlib.contextmanager
def cpu_turn() -> Iterator[None]:
    """A turn for our CPU work (a fine-tune step, an evaluation) on this host: shared with
    other such work, never while a candidate is compiled-and-timed or tuned on this CPU
    (`device_lock` holds it then). Between steps, so a timing waits at most one step."""
    if _HELD:
        yield
        return
    path = _lock_path(physical_device_here())
    with file_lock(path.with_suffix(".gate"), shared=True):
        handle = _open(path)
        fcntl.flock(handle, fcntl.LOCK_SH)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def physical_device_here() -> str:
    return f"cpu@{socket.gethostname()}"


def _open(path: Path):  # noqa: ANN202 - a text file handle
    return open(path, "a+")  # noqa: SIM115 - closed by the caller
