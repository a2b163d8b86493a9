"""Key rotation: every sealed value moved from the current key (or plain text) to a new key.

The rotation first records the new key's id in ``encryption.rotating_to``; from then
on attune refuses to start until the rotation has finished. It then walks each sealed
column in batches of rows, each batch one transaction: a value already under the new
key is left as it is, any other is opened (with the old key, or read as plain text) and
sealed under the new one; a note's search-index entry is rewritten in the same
transaction as its text. Killed at any point, a second run with the same two keys
picks up where the first stopped. At the end the new key becomes the database's key
and the files are scrubbed of the old values.
"""

from __future__ import annotations

from collections.abc import Callable

from storage.crypto import KEY_ENV, NEW_KEY_ENV, SEALED_COLUMNS, Cipher, EncryptionError, Key
from storage.database import Database
from storage.note_search import note_terms, slot_key

# (table, rows done, rows in all)
Progress = Callable[[str, int, int], None]


def rotation_cipher(old: Key | None, new: Key) -> Cipher:
    """Seals under ``new``; opens what is under either key (or plain)."""
    return Cipher(new, also=[old])


async def rotate(db: Database, old: Key | None, new: Key, progress: Progress, batch: int = 500) -> int:
    """Move every sealed value of ``db`` (opened with :func:`rotation_cipher`) to ``new``;
    the number of values re-sealed."""
    key_id, rotating_to = await db.key_state()
    if old is not None and new.id == old.id:
        raise EncryptionError(f"{NEW_KEY_ENV} is the key the database is already under.")
    if rotating_to is not None and rotating_to != new.id:
        raise EncryptionError(
            f"an interrupted rotation of {db.where} was moving it to another key: "
            f"finish that one first (set {NEW_KEY_ENV} to that key)."
        )
    if key_id is None and old is not None:
        raise EncryptionError(f"{db.where} is not encrypted: leave {KEY_ENV} unset to encrypt it with {NEW_KEY_ENV}.")
    if key_id is not None and old is None:
        raise EncryptionError(f"{db.where} is encrypted: set {KEY_ENV} to its current key.")
    if key_id is not None and old is not None and key_id != old.id:
        raise EncryptionError(f"{KEY_ENV} is not the key {db.where} is encrypted with.")
    await db.execute(
        "INSERT INTO encryption (id, key_id, rotating_to) VALUES (1, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET rotating_to = excluded.rotating_to",
        (key_id, new.id),
    )
    resealed = 0
    for table, columns in SEALED_COLUMNS.items():
        resealed += await _rotate_table(db, table, columns, batch, progress)
    async with db.transaction() as conn:
        await conn.execute("UPDATE encryption SET key_id = ?, rotating_to = NULL WHERE id = 1", (new.id,))
    await db.scrub()
    return resealed


async def _rotate_table(db: Database, table: str, columns: tuple[str, ...], batch: int, progress: Progress) -> int:
    cipher = db.cipher
    total = int((await db.fetchone(f"SELECT COUNT(*) FROM {table}"))[0])  # type: ignore[index]
    done = resealed = 0
    last = 0
    while True:
        rows = await db.fetchall(
            f"SELECT id, user_id, {', '.join(columns)} FROM {table} WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
        )
        if not rows:
            return resealed
        async with db.transaction() as conn:
            for row in rows:
                stale = [c for c in columns if row[c] is not None and not cipher.current(row[c])]
                if not stale:
                    continue
                texts = {c: cipher.open(row[c], f"{table}.{c}") for c in stale}
                sealed = [cipher.seal(texts[c], f"{table}.{c}") for c in stale]
                await conn.execute(
                    f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in stale)} WHERE id = ?", (*sealed, row["id"])
                )
                if table == "memories" and "text" in texts:  # the index's hashed words change with the key
                    terms = note_terms(cipher, row["user_id"], texts["text"])
                    await conn.execute("UPDATE memories_fts SET terms = ? WHERE rowid = ?", (terms, row["id"]))
                if table == "memories" and "slot" in texts:  # and so does the hashed slot
                    await conn.execute(
                        "UPDATE memories SET slot_key = ? WHERE id = ?", (slot_key(cipher, texts["slot"]), row["id"])
                    )
                resealed += len(stale)
        last = int(rows[-1]["id"])
        done += len(rows)
        progress(table, done, total)
