"""``attune keys``: the encryption key of the database.

    attune keys new       print a new random key (for ATTUNE_ENCRYPTION_KEY)
    attune keys rotate    re-encrypt everything under ATTUNE_NEW_ENCRYPTION_KEY

``rotate`` reads the current key from ``ATTUNE_ENCRYPTION_KEY`` (unset for a database
stored plain, which it then encrypts) and needs the database to itself: stop attune
first. If it is killed, run it again with the same two keys; it carries on.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from agent_core.config import Config
from attune.wiring import open_database
from storage.crypto import KEY_ENV, NEW_KEY_ENV, EncryptionError, Key
from storage.keys import rotate, rotation_cipher


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    keys = sub.add_parser("keys", parents=[common], help="the database's encryption key: make one, rotate it")
    action = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    action.add_parser("new", parents=[common], help=f"print a new random key for {KEY_ENV}")
    rotate_cmd = action.add_parser(
        "rotate",
        parents=[common],
        help=f"re-encrypt everything from {KEY_ENV} (unset: plain) to {NEW_KEY_ENV}; stop attune first",
    )
    rotate_cmd.add_argument("--batch", type=int, default=500, metavar="N", help="rows per transaction (default 500)")


async def run(config: Config, args: argparse.Namespace) -> int:
    if args.keys_command == "new":
        print(Key.generate())
        return 0
    new_text = config.secrets.get("new_encryption_key")
    if not new_text:
        raise EncryptionError(f"set {NEW_KEY_ENV} to the new key (make one with `attune keys new`).")
    old_text = config.secrets.get("encryption_key")
    old = Key.from_text(old_text) if old_text else None
    new = Key.from_text(new_text, NEW_KEY_ENV)
    db = await open_database(config, cipher=rotation_cipher(old, new), rotating=True)
    shown = 0.0

    def progress(table: str, done: int, total: int) -> None:
        nonlocal shown
        if done >= total or time.monotonic() - shown >= 1:
            print(f"{table}: {done}/{total} rows", flush=True)
            shown = time.monotonic()

    try:
        resealed = await rotate(db, old, new, progress, batch=max(1, args.batch))
    finally:
        await db.close()
    print(f"Done: {resealed} values re-encrypted. Start attune with {KEY_ENV} set to the new key.", flush=True)
    return 0
