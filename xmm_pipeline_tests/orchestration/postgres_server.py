"""A throwaway PostgreSQL server on 127.0.0.1 for tests: initdb, pg_ctl start, one database, pg_ctl stop.

The binaries come from `pg_config --bindir` (Debian: /usr/lib/postgresql/<major>/bin). The server
refuses to run as root, so as root (CI) every server command runs as the `postgres` system user the
Debian package creates, in a data directory that user owns. Password authentication (scram) on TCP
only, so the Dagster instance connects with real credentials.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEBIAN_BINDIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
SYSTEM_USER = "postgres"


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    username: str
    password: str
    db_name: str


def find_bindir() -> Path | None:
    """Folder holding initdb and pg_ctl, or None."""
    candidates = []
    if shutil.which("pg_config"):
        result = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(result.stdout.strip()))
    candidates += DEBIAN_BINDIRS
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


def unavailable_reason() -> str | None:
    """Why no server can be started here, or None."""
    if find_bindir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"running as root and there is no {SYSTEM_USER!r} system user to run the server as"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", SYSTEM_USER, "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def running_server(db_name: str = "dagster") -> Iterator[PostgresServer]:
    """Start a fresh server with one database; stop it and delete its files on exit."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError(unavailable_reason())
    folder = Path(tempfile.mkdtemp(prefix="xmm_pg_"))  # not under pytest's root-only tmp folders
    data, password = folder / "data", secrets.token_hex(12)
    (folder / "password").write_text(password)
    if os.geteuid() == 0:
        account = pwd.getpwnam(SYSTEM_USER)
        for path in (folder, folder / "password"):
            os.chown(path, account.pw_uid, account.pw_gid)
    port = free_port()
    run = subprocess.run
    run(
        _as_server_user(
            [str(bindir / "initdb"), "-D", str(data), "-U", SYSTEM_USER, "-E", "UTF8", "--auth=scram-sha-256",
             f"--pwfile={folder / 'password'}"]
        ),
        check=True, capture_output=True,
    )
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {folder}"
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log")]
    run(_as_server_user([*pg_ctl, "-o", options, "-w", "-t", "60", "start"]), check=True, capture_output=True)
    try:
        server = PostgresServer("127.0.0.1", port, SYSTEM_USER, password, db_name)
        create_database(server)
        yield server
    finally:
        run(_as_server_user([*pg_ctl, "-m", "fast", "-w", "stop"]), check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server: PostgresServer) -> None:
    import psycopg2

    connection = psycopg2.connect(
        host=server.host, port=server.port, user=server.username, password=server.password, dbname="postgres"
    )
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{server.db_name}"')
    finally:
        connection.close()
