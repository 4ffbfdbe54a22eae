"""Exclusive use of shared things by the workers of one machine: OS file locks
(`fcntl.flock`, released by the OS if a worker dies).

- A device: two trials timing (or tuning) on one device at once would slow each other and
  corrupt both figures. Devices from a TVM RPC tracker need no lock here: the tracker hands each
  device to one session at a time, across machines.
- A tuning database: MetaSchedule's JSONDatabase refers to workloads by line number, so two
  processes appending at once would corrupt it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from pathlib import Path

from search.core.task import cache_dir
from search.devices.target import TargetSpec


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold `path` (created if missing) exclusively, blocking until it is free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def device_lock(target: TargetSpec) -> Iterator[None]:
    """Hold the target's device exclusively (no-op for a tracker's pool)."""
    if target.tracker:
        yield
        return
    who = target.rpc or "local"
    name = f"{target.name}-{hashlib.sha1(who.encode()).hexdigest()[:8]}.lock"
    with file_lock(cache_dir() / "locks" / name):
        yield
