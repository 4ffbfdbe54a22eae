"""The three ways a command fails, told apart by the CLI (`search.cli.main`):

- UserError: bad input; one line, exit 2. Nothing (or nothing useful) was done.
- SearchFailed: the inputs were fine but the run found nothing to pick from (the baseline or
  every candidate failed); one line, exit 3, after the front is written.
- InternalError: a bug in our code (or the task's) surfaced inside a trial; one line naming
  the saved traceback, exit 1. A bug must stop the run, not fail every trial quietly.

TrialFailed is not a command's failure: one candidate could not be evaluated, and the study goes
on. Only code that knows a failure is the candidate's (a compile error, a NaN loss, a device
drop) raises it; anything else raised in a trial is an InternalError.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input: the message names what was wrong and what would be right."""

    exit_code = 2


class SearchFailed(UserError):
    """A run that completed but has no usable result; the message says why."""

    exit_code = 3


class InternalError(Exception):
    """A bug raised inside trial `trial`; its traceback is saved in `log`."""

    exit_code = 1

    def __init__(self, trial: int, error: BaseException, log: Path) -> None:
        self.trial, self.error, self.log = trial, error, log
        first = str(error).strip().splitlines()
        super().__init__(f"internal error in trial {trial}: {type(error).__name__}"
                         f"{': ' + first[0] if first else ''}; traceback saved in {log}")


class TrialFailed(Exception):
    """One candidate could not be evaluated (compile error, NaN loss, device drop)."""
