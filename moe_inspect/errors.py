"""Errors a user can cause. The CLI turns these into one sentence and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (path, option, model), reported without a traceback."""

    exit_code = 2


class NotMoEError(UserError):
    """The model loaded fine but has no router that moe-inspect can hook."""
