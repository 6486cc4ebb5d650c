"""The one exception a user is meant to see: a list of problems, each naming its fix.

The CLI prints every problem on its own line and exits with code 2, without a traceback
(`--debug` shows it). Code anywhere in the package raises `UserError` for bad input; any
other exception is a bug and is reported as one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class Stopped(Exception):
    """A run that stopped on purpose: interrupted (SIGTERM 143, Ctrl-C 130) or diverged (3). The CLI prints
    `lines` as they are and exits with `code`, without a traceback."""

    def __init__(self, lines: list[str], code: int):
        self.lines, self.code = lines, code
        super().__init__("\n".join(lines))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` when a close match exists, else an empty string."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def raise_if(problems: list[str]) -> None:
    if problems:
        raise UserError(problems)
