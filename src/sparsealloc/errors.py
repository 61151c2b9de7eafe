"""User-facing errors: one clear line, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The message says what is wrong and how to fix it.

    The CLI prints ``error: <message>`` on one line and exits with code 2.
    """

    exit_code = 2


def check(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)
