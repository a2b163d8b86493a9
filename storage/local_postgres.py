"""A throwaway PostgreSQL server on 127.0.0.1, for the test suite and the benchmarks.

It uses the server binaries of Debian's ``postgresql`` package (``initdb``, ``pg_ctl``)
and a fresh data directory; as root (CI) the server runs as the ``postgres`` user,
which PostgreSQL requires. Trust authentication on 127.0.0.1 only: nothing here is for
production (there, point ``[storage] url`` at a server of your own).

    with LocalPostgres() as server:
        url = server.create_database("attune_test")
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

SUPERUSER = "attune"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def server_bin() -> Path:
    """The directory of ``initdb`` and ``pg_ctl``: ``$ATTUNE_PG_BIN``, else the newest
    Debian ``/usr/lib/postgresql/<version>/bin``."""
    if explicit := os.environ.get("ATTUNE_PG_BIN"):
        return Path(explicit)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise PostgresUnavailable("no PostgreSQL server here: install Debian's `postgresql` package")
    return Path(found[-1]).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """Start with :meth:`start` (or ``with``); :meth:`stop` removes everything."""

    def __init__(self, *, durable: bool = False) -> None:
        # durable=False: fsync off, for tests. The benchmarks keep PostgreSQL's defaults.
        self.durable = durable
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="attune-pg-"))
        self.data = self.root / "data"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = [str(a) for a in args]
        if self._as_postgres:  # runuser lives in sbin, which a plain PATH may lack
            runuser = shutil.which("runuser") or next(
                (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if Path(p).exists()), "runuser"
            )
            command = [runuser, "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr or done.stdout}")

    def start(self) -> LocalPostgres:
        binaries = server_bin()
        if self._as_postgres:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres", "postgres")
        self._run(binaries / "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                  "--no-locale")  # fmt: skip
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server (again) on its data directory and port."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(server_bin() / "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"),
                  "-w", "-t", "60", "start")  # fmt: skip

    def halt(self) -> None:
        """Stop the server as an operator's restart or a fail-over does (``-m fast``: every
        client connection is cut), keeping its data: :meth:`resume` brings it back."""
        self._run(server_bin() / "pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """``pg_ctl restart -m fast``, as an operator does it."""
        self.halt()
        self.resume()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            with contextlib.suppress(RuntimeError):  # it was not running
                self._run(server_bin() / "pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
