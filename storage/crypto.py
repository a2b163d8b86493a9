"""Encryption at rest: people's words are kept sealed under a key.

With ``ATTUNE_ENCRYPTION_KEY`` set, message text, the prompts sent to the model and
long-term notes are stored sealed with AES-256-GCM, an authenticated cipher from
``cryptography``: a changed or misplaced value fails to open instead of reading as
something else. The full-text index holds a keyed hash (HMAC-SHA256) of each word in
place of the word, so a note is still found by its words and the index shows none of
them. Training data sets written to disk are sealed the same way.

A sealed value is bytes: format version (1 byte), key id (8), nonce (12), then the
ciphertext with its tag. The key id names the key it was sealed under, so a database
half way through ``attune keys rotate`` can hold values under two keys and each opens
with its own. The field's name (``messages.text``) is the associated data: a value
moved into another column does not open. Without a key, values stay plain text.

PostgreSQL's TEXT columns take no bytes, so there the cipher is ``textual``: a sealed
value is stored as ``\x01`` and the sealed bytes in base64, and a plain text that
happens to start with ``\x01`` or ``\x02`` is stored behind a ``\x02``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_ENV = "ATTUNE_ENCRYPTION_KEY"
NEW_KEY_ENV = "ATTUNE_NEW_ENCRYPTION_KEY"

# The columns that hold people's words, sealed when a key is set.
SEALED_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("text", "prompt"),
    "memories": ("text", "slot", "embedding"),
    "reward_models": ("terms",),
}

_FORMAT = 1
_SEALED, _ESCAPE = "\x01", "\x02"  # the marks of a textual cipher (PostgreSQL)
_HEADER = 1 + 8 + 12  # format, key id, nonce


class EncryptionError(Exception):
    """A key is missing, wrong or malformed, or a sealed value does not open."""


class Key:
    """One 32-byte secret, from which the cipher key, the search-index key and the key's
    public id are derived (HKDF-SHA256, one purpose each)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise ValueError("a key is 32 bytes")

        def derive(purpose: str) -> bytes:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"attune {purpose}".encode())
            return hkdf.derive(secret)

        self.id = derive("key id")[:8]
        self._aead = AESGCM(derive("text"))
        self._index = derive("search index")

    @staticmethod
    def generate() -> str:
        """A new random key, as ``ATTUNE_ENCRYPTION_KEY`` takes it."""
        return base64.urlsafe_b64encode(os.urandom(32)).decode()

    @classmethod
    def from_text(cls, text: str, variable: str = KEY_ENV) -> Key:
        try:
            secret = base64.urlsafe_b64decode(text.strip().encode("ascii"))
        except (binascii.Error, UnicodeEncodeError):
            secret = b""
        if len(secret) != 32:
            raise EncryptionError(
                f"{variable} is not a key: it must be 32 random bytes in URL-safe base64 "
                f"(44 characters). Make one with `attune keys new`."
            )
        return cls(secret)

    def seal(self, text: str, field: str) -> bytes:
        nonce = os.urandom(12)
        body = self._aead.encrypt(nonce, text.encode("utf-8"), field.encode())
        return bytes([_FORMAT]) + self.id + nonce + body

    def open(self, value: bytes, field: str) -> str:
        nonce = value[9:_HEADER]
        return self._aead.decrypt(nonce, value[_HEADER:], field.encode()).decode("utf-8")

    def word(self, word: str) -> str:
        """What the search index holds for ``word``."""
        return hmac.new(self._index, word.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


class Cipher:
    """How text is stored: sealed under ``key``, or plain when there is none. Values
    sealed under the keys in ``also`` open too (while a rotation is under way)."""

    def __init__(self, key: Key | None = None, *, also: Iterable[Key | None] = (), textual: bool = False) -> None:
        self.key = key
        self.textual = textual
        self._also = tuple(also)
        self._keys = {k.id: k for k in (key, *also) if k is not None}

    def as_text(self) -> Cipher:
        """The same keys, storing sealed values as text (for PostgreSQL)."""
        return Cipher(self.key, also=self._also, textual=True)

    def seal(self, text: str, field: str) -> str | bytes:
        if self.key is None:
            return _ESCAPE + text if self.textual and text[:1] in (_SEALED, _ESCAPE) else text
        sealed = self.key.seal(text, field)
        return _SEALED + base64.b64encode(sealed).decode("ascii") if self.textual else sealed

    def open(self, value: str | bytes, field: str) -> str:
        if isinstance(value, str):
            if not self.textual or value[:1] not in (_SEALED, _ESCAPE):
                return value  # stored before encryption was turned on (only read during a rotation)
            if value[:1] == _ESCAPE:
                return value[1:]
            value = base64.b64decode(value[1:])
        if len(value) < _HEADER or value[0] != _FORMAT:
            raise EncryptionError(f"a value in {field} is not in attune's sealed format")
        key = self._keys.get(value[1:9])
        if key is None:
            raise EncryptionError(
                f"a value in {field} is sealed under a key that was not given (set {KEY_ENV} to the right key)"
            )
        try:
            return key.open(value, field)
        except InvalidTag:
            raise EncryptionError(f"a value in {field} does not open: it was changed or damaged") from None

    def current(self, value: str | bytes) -> bool:
        """Whether ``value`` is stored as this cipher stores text now."""
        if isinstance(value, str) and self.textual and value[:1] == _SEALED:
            value = base64.b64decode(value[1:])
        if self.key is None:
            return isinstance(value, str)
        return isinstance(value, bytes) and value[1:9] == self.key.id

    def word(self, word: str) -> str:
        return word if self.key is None else self.key.word(word)


PLAIN = Cipher()
