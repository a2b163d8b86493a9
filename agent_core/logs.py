"""Logging set-up: one format, on stderr, with every configured secret masked."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable


class RedactSecrets(logging.Filter):
    """Replaces each secret value in a log record's final text with ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            text = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            for secret in self.secrets:
                text = text.replace(secret, "***")
                if record.exc_text:
                    record.exc_text = record.exc_text.replace(secret, "***")
            record.msg, record.args = text, ()
        return True


class QuietLibraries(logging.Filter):
    """Drops records below INFO from the named loggers and their children, whatever level
    those loggers were given: an SDK may set its own (slack_bolt copies the root's level onto
    each logger it makes, so under DEBUG its framework logger would speak)."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self.names = tuple(names)
        self.prefixes = tuple(f"{name}." for name in self.names)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO or not (
            record.name in self.names or record.name.startswith(self.prefixes)
        )


def setup_logging(level: str, secrets: Iterable[str] = (), platform_loggers: Iterable[str] = ()) -> None:
    """One handler on stderr at ``level``, masking ``secrets``; ``platform_loggers`` (the
    platforms' SDKs, as each declares) stay at INFO or above."""
    platform_loggers = list(platform_loggers)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(QuietLibraries(platform_loggers))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries speak only when something is wrong.
    for noisy in ("httpx", "httpcore", "openai", "aiosqlite", "asyncio", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # The platform libraries' debug output carries what people write: DEBUG is for attune's own loggers.
    for name in platform_loggers:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))
    children = tuple(f"{name}." for name in platform_loggers)
    for name, child in list(logging.root.manager.loggerDict.items()):
        if name.startswith(children) and isinstance(child, logging.Logger):
            child.setLevel(logging.NOTSET)  # a level an SDK set on it: it follows the one above again
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
