"""What the notes' full-text index holds and what a search for a message asks it.

Each word of a note is stored with its owner's prefix (a keyed hash of the word when the
database is encrypted); a search looks up the words of the message, less the stop words.
"""

from __future__ import annotations

import re

from storage.crypto import Cipher

_WORD = re.compile(r"\w+", re.UNICODE)


def note_terms(cipher: Cipher, user_id: int, text: str) -> str:
    """What the full-text index holds for a note: each word (a keyed hash of it when
    encrypted) with the owner's prefix."""
    return " ".join(f"u{int(user_id)}_{cipher.word(w)}" for w in _WORD.findall(text.lower()))


# Words that say nothing about which note matters; leaving them out of a search keeps it
# short (each word is one lookup per index segment).
STOP_WORDS = frozenset(
    [
        "about",
        "above",
        "after",
        "again",
        "all",
        "also",
        "and",
        "any",
        "are",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "can",
        "could",
        "did",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "her",
        "here",
        "hers",
        "herself",
        "him",
        "himself",
        "his",
        "how",
        "into",
        "its",
        "itself",
        "just",
        "let",
        "more",
        "most",
        "myself",
        "nor",
        "not",
        "now",
        "off",
        "once",
        "only",
        "other",
        "our",
        "ours",
        "ourselves",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "themselves",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "too",
        "under",
        "until",
        "very",
        "was",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "tell",
        "please",
        "thanks",
        "thank",
        "know",
        "like",
        "want",
    ]
)


def search_terms(cipher: Cipher, user_id: int, text: str) -> list[str]:
    """The index terms that find this user's notes relevant to ``text`` (any of them)."""
    words = sorted({w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in STOP_WORDS})
    return [f"u{int(user_id)}_{cipher.word(w)}" for w in words]
