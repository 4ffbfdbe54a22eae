"""Folders a command will write: made and probed before any work, so a folder that cannot be
written is a one-line error at the start, not a failure after an hour of trials."""

from __future__ import annotations

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
