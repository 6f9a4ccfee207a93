"""A PostgreSQL server of its own for MLflow's backend store, from Debian's ``postgresql`` package.

Nothing is assumed to be running: the cluster lives in ``<state>/pgdata`` (created with
``initdb`` on first use), listens on 127.0.0.1 only, and every role logs in with a generated
password (scram-sha-256), kept in a libpq password file ``<state>/pgpass`` readable by its
owner only. Clients name it with ``PGPASSFILE``, so no password appears in a URI, a command
line or a log. PostgreSQL refuses to run as root: when run by root, the server runs as the
``postgres`` system user (``runuser``), which must be able to reach the state folder.

    python -m ops.postgres start --state-dir .mlflow-server [--port N]   # prints the URI
    python -m ops.postgres stop --state-dir .mlflow-server
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DATABASE = ROLE = "mlflow"  # the database MLflow owns, and the role it logs in as
SUPERUSER = "postgres"
SERVER_USER = "postgres"  # the system user the server runs as when we are root
START_TIMEOUT_SECONDS = 60


class PostgresError(RuntimeError):
    """PostgreSQL is missing, cannot be set up, or did not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_dir() -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: ``$PG_BIN_DIR``, Debian's newest, or PATH."""
    if os.environ.get("PG_BIN_DIR"):
        return Path(os.environ["PG_BIN_DIR"])
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(re.sub(r"\D", "", p.parent.parent.name) or 0))
    if debian:
        return debian[-1].parent
    if found := shutil.which("initdb"):
        return Path(found).parent
    raise PostgresError("PostgreSQL's initdb not found: install Debian's postgresql package "
                        "(apt-get install postgresql) or set PG_BIN_DIR")


@dataclass
class Postgres:
    """One cluster in ``state_dir``; ``port`` is known once it runs."""

    state_dir: Path
    port: int | None = None

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "pgdata"

    @property
    def passfile(self) -> Path:
        return self.state_dir / "pgpass"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "postgres.log"

    def uri(self) -> str:
        """The SQLAlchemy URI of MLflow's database (the password comes from ``PGPASSFILE``)."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def client_env(self) -> dict[str, str]:
        """Environment variables a client (``mlflow server``) needs besides the URI."""
        return {"PGPASSFILE": str(self.passfile.resolve())}

    def running_port(self) -> int | None:
        """The port of the server running on this cluster (from ``postmaster.pid``), else None."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return port


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(_as_server_user(command), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode:
        detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise PostgresError(f"{what} failed (exit status {result.returncode}): " + " | ".join(detail))


def _hand_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)
        os.chown(path, user.pw_uid, user.pw_gid)


def init_cluster(pg: Postgres) -> None:
    """Create the cluster and the password file, unless ``pg.data_dir`` already holds one."""
    if (pg.data_dir / "PG_VERSION").is_file():
        return
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise PostgresError(f"running as root, but there is no {SERVER_USER!r} system user to run "
                                "PostgreSQL as (Debian's postgresql package creates it)") from None
    pg.state_dir.mkdir(parents=True, exist_ok=True)
    pg.data_dir.mkdir(mode=0o700, exist_ok=True)
    _hand_to_server_user(pg.data_dir)
    passwords = {SUPERUSER: secrets.token_urlsafe(24), ROLE: secrets.token_urlsafe(24)}
    pg.passfile.write_text("".join(f"127.0.0.1:*:*:{user}:{password}\n" for user, password in passwords.items()))
    pg.passfile.chmod(0o600)
    with tempfile.NamedTemporaryFile("w", dir=pg.state_dir) as pwfile:  # initdb wants an empty pgdata
        pwfile.write(passwords[SUPERUSER] + "\n")
        pwfile.flush()
        _hand_to_server_user(Path(pwfile.name))
        _run([str(bin_dir() / "initdb"), "--pgdata", str(pg.data_dir), "--username", SUPERUSER,
              "--pwfile", pwfile.name, "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
              "--encoding=UTF8", "--locale=C"],
             f"initdb in {pg.data_dir} (the {SERVER_USER} user must be able to reach that folder)"
             if os.geteuid() == 0 else f"initdb in {pg.data_dir}")


def start(pg: Postgres, port: int | None = None) -> Postgres:
    """Start the cluster (creating it first) on 127.0.0.1 and make sure MLflow's database exists."""
    init_cluster(pg)
    pg.port = pg.running_port()
    if pg.port is None:
        pg.port = port or free_port()
        # TCP on 127.0.0.1 only, no Unix socket (its path length is limited, and nobody needs it)
        options = f"-c listen_addresses=127.0.0.1 -p {pg.port} -c unix_socket_directories=''"
        _run([str(bin_dir() / "pg_ctl"), "--pgdata", str(pg.data_dir), "--log", str(pg.log_file),
              "--options", options, "--wait", "--timeout", str(START_TIMEOUT_SECONDS), "start"],
             f"starting PostgreSQL (log: {pg.log_file})")
    ensure_database(pg)
    return pg


def ensure_database(pg: Postgres) -> None:
    """Create MLflow's role and database (owned by that role) when they are missing."""
    import psycopg
    from psycopg import sql

    connection = psycopg.connect(host="127.0.0.1", port=pg.port, user=SUPERUSER, dbname="postgres",
                                 passfile=str(pg.passfile), connect_timeout=10,
                                 autocommit=True)  # CREATE DATABASE cannot run in a transaction
    password = next(line.rsplit(":", 1)[1] for line in pg.passfile.read_text().splitlines()
                    if line.split(":")[3] == ROLE)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,))
            if cursor.fetchone() is None:
                # utility commands take no bind parameters: quote the literal client-side
                cursor.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(ROLE), sql.Literal(password)))
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cursor.fetchone() is None:
                cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(DATABASE), sql.Identifier(ROLE)))
    finally:
        connection.close()


def stop(pg: Postgres) -> None:
    """Stop the cluster's server (fast shutdown: open sessions are ended); nothing if not running."""
    if pg.running_port() is None:
        return
    _run([str(bin_dir() / "pg_ctl"), "--pgdata", str(pg.data_dir), "--mode", "fast", "--wait", "stop"],
         "stopping PostgreSQL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.postgres", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--state-dir", type=Path, default=Path(".mlflow-server"),
                        help="folder of the cluster and its password file (default: %(default)s)")
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    pg = Postgres(args.state_dir.resolve())
    try:
        if args.action == "start":
            start(pg, args.port)
            print(f"PostgreSQL on 127.0.0.1:{pg.port}: {pg.uri()} (PGPASSFILE={pg.passfile})")
        else:
            stop(pg)
    except PostgresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
