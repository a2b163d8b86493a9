"""What the notes' full-text index holds and what a search for a message asks it.

Each word of a note is stored with its owner's prefix (a keyed hash of the word when the
database is encrypted); a search looks up the words of the message, less the stop words.
"""

from __future__ import annotations

import re

from storage.crypto import Cipher
from storage.stop_words import STOP_WORDS

_WORD = re.compile(r"\w+", re.UNICODE)


def note_terms(cipher: Cipher, user_id: int, text: str) -> str:
    """What the full-text index holds for a note: each word (a keyed hash of it when
    encrypted) with the owner's prefix."""
    return " ".join(f"u{int(user_id)}_{cipher.word(w)}" for w in _WORD.findall(text.lower()))


def search_terms(cipher: Cipher, user_id: int, text: str) -> list[str]:
    """The index terms that find this user's notes relevant to ``text`` (any of them)."""
    words = sorted({w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in STOP_WORDS})
    return [f"u{int(user_id)}_{cipher.word(w)}" for w in words]


def slot_key(cipher: Cipher, slot: str | None) -> str | None:
    """What the ``slot_key`` column holds for a note's slot (a keyed hash when encrypted)."""
    return cipher.word(slot) if slot else None
