"""Files and folders a command writes: folders made and probed before any work, so a folder
that cannot be written is a one-line error at the start, not a failure after an hour of
trials; cache files replaced atomically, so processes that race never read half a file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from search.core.errors import UserError


def writable_folder(path: Path, what: str, hint: str = "") -> None:
    """Make `path` and write a probe file in it; a UserError naming `what` if that fails."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write {what} {str(path)!r}: {exc.strerror}{hint}") from None


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a file beside `path` (this process's own), then rename it onto `path`:
    workers or runs on one host that fill the same cache entry never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    write(tmp)
    tmp.replace(path)
