"""A throw-away PostgreSQL server on 127.0.0.1 (Debian's postgresql package), for the tests and
benchmarks/scale.py. Nothing here is used by the pipeline itself."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PostgresMissing(RuntimeError):
    """The server binaries are not installed."""


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(candidates[0]) if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_postgres(max_connections: int = 200) -> Iterator[str]:
    """Start a server with trust authentication on 127.0.0.1 and a free port; yield the URL of its
    ``postgres`` database; stop it and delete its files afterwards."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not initdb or not pg_ctl:
        raise PostgresMissing("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    # Directly under the system temp folder, which the postgres user can traverse (pytest's is 0700).
    root = Path(tempfile.mkdtemp(prefix="hema-postgres-"))
    data = root / "data"
    # initdb and postgres refuse to run as root: run them as Debian's postgres user then.
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, user="postgres")
    try:
        subprocess.run(
            [*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        port = _free_port()
        options = f"-h 127.0.0.1 -p {port} -k {root} -F -c max_connections={max_connections} -c fsync=off -c full_page_writes=off"
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], stdout=subprocess.DEVNULL, check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """A new empty database on the server; its URL."""
    import psycopg2

    admin = psycopg2.connect(server_url)
    admin.autocommit = True
    try:
        admin.cursor().execute(f"create database {name}")
    finally:
        admin.close()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def dagster_instance_storage(dagster_url: str) -> dict:
    """The ``storage:`` block of a Dagster instance on this server's database ``dagster_url``, as
    deploy/dagster-instance.yaml writes it (the password comes from PGPASSWORD there; trust here)."""
    from urllib.parse import urlsplit

    parsed = urlsplit(dagster_url)
    return {
        "postgres": {
            "postgres_db": {
                "username": parsed.username,
                "password": "",
                "hostname": parsed.hostname,
                "port": parsed.port,
                "db_name": parsed.path.lstrip("/"),
                # A bare postgresql:// resolves to psycopg 3 under SQLAlchemy 2.1; the project ships psycopg2.
                "scheme": "postgresql+psycopg2",
            }
        }
    }


def s3_compute_logs(bucket: str, endpoint: str) -> dict:
    """The ``compute_logs:`` block of deploy/dagster-instance.yaml, on this test's bucket and endpoint."""
    return {
        "module": "dagster_aws.s3.compute_log_manager",
        "class": "S3ComputeLogManager",
        "config": {"bucket": bucket, "prefix": "compute-logs", "endpoint_url": endpoint, "skip_empty_files": True},
    }
