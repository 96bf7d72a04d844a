"""Values as messages and file names may carry them (DESIGN.md "Never delete what the user owns",
bad input): a control character (newline, carriage return, escape, ...) in a message would forge
a second line or drive the terminal, in a file name it makes a name no one can type; a value of
thousands of characters buries the message.

    has_control(s)      True if `s` holds a control character (C0, DEL, C1, line separators)
    shown(s, limit)     `s` quoted with its control characters escaped, cut at `limit`
    one_line(msg)       a message with control characters escaped and every run of more than
                        LONG_RUN characters without a space cut (a 10,000-digit --seed)
"""
from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
LONG_RUN = 300
_RUN = re.compile(r"\S{%d,}" % (LONG_RUN + 1))


def has_control(s: str) -> bool:
    return bool(_CONTROL.search(s))


def _escape(ch: str) -> str:
    return repr(ch)[1:-1]


def shown(s: str, limit: int = 80) -> str:
    r = repr(s)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(s)} characters)"


def one_line(msg: str) -> str:
    msg = _CONTROL.sub(lambda m: _escape(m.group()), msg)
    return _RUN.sub(lambda m: f"{m.group()[:80]}...({len(m.group())} characters)", msg)
