"""Per-user memory: what gets remembered, and how it comes back.

A user's long-term notes are saved by ``/remember`` and by "remember that ..." in a
plain message (:func:`note_to_remember`). For each reply,
:meth:`storage.Store.reply_context` recalls the notes that match the message (FTS5,
BM25) and then the newest ones, and this user's recent turns in this chat. Everything
is keyed by the core's user id, so in a group chat one person's turns and notes never
reach another person's prompt.
"""

from __future__ import annotations

import re

# "remember that my cat is called Tom", "please remember: I'm vegetarian"
_REMEMBER = re.compile(r"^\s*(?:please\s+)?remember(?:\s+that|\s*:)\s+(?P<note>.+?)\s*$", re.I | re.S)
MAX_NOTE_CHARS = 500


def note_to_remember(text: str) -> str | None:
    """The note in a plain-text "remember that ..." message, if it is one."""
    match = _REMEMBER.match(text)
    if not match:
        return None
    note = match.group("note").rstrip(".!")
    return note[:MAX_NOTE_CHARS] or None
