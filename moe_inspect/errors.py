"""Errors a user can cause. The CLI turns these into one sentence and exit code 2.

Library sentences name a setting the way the Python API spells it, in backticks (`seq_len`,
`trust_remote_code=True`); ``for_cli`` respells those as the command line's flags (--seq-len,
--trust-remote-code), so one sentence serves both audiences.
"""

from __future__ import annotations

import re

_SETTING = re.compile(r"`([a-z][a-z0-9_]*)(?:=True)?`")


class UserError(Exception):
    """A problem with the user's input (path, option, model), reported without a traceback."""

    exit_code = 2

    def for_cli(self) -> str:
        """The sentence with every `api_name` written as its --cli-flag."""
        return _SETTING.sub(lambda m: "--" + m.group(1).replace("_", "-"), str(self))


class NotMoEError(UserError):
    """The model loaded fine but has no router that moe-inspect can hook."""
