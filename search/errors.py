"""Errors a user can fix: the CLI prints them as one line, with no traceback."""


class UserError(Exception):
    """Bad input: the message names what was wrong and what would be right."""


class TrialFailed(Exception):
    """One candidate could not be evaluated (compile error, NaN loss, device drop)."""
