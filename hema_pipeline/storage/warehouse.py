"""The warehouse: schema, connections and idempotent writes, on DuckDB or PostgreSQL.

``Warehouse(location)`` opens the backend the location names (like ``pathlib.Path``, the base class
picks its subclass): a file path is a ``DuckDBWarehouse``, the embedded default; a ``postgresql://`` URL
is a ``storage.postgres.PostgresWarehouse``, for many machines writing at once (see deploy/README.md).
Both offer the same methods and connections that answer the same calls (``execute(sql, parameters)``
then ``df()`` / ``fetchone()`` / ``fetchall()``, ``register`` / ``unregister`` a DataFrame), and
callers write SQL in the dialect both accept (``?`` placeholders).

DuckDB allows one writing process per file. Writers are serialised by Dagster (the ``duckdb_writer``
pool, see dagster.yaml); in addition ``connect`` retries while another process holds the lock, so a CLI
query that overlaps a run waits instead of failing. PostgreSQL takes concurrent writers; the writes that
must not interleave (one smear's import) say so with ``transaction(serialise_on=...)``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import psycopg2

# Applied in this order; each file is idempotent (create ... if not exists / create or replace view).
# Every file is written in the dialect DuckDB and PostgreSQL share, except where a backend has its own
# edition in sql/<dialect>/ (views.sql: DuckDB's QUALIFY and list functions).
SCHEMA_FILES: tuple[str, ...] = ("schema.sql", "datasets.sql", "models.sql", "predictions.sql", "monitoring.sql", "views.sql")

# Column types one dialect lacks, and what the other uses instead (whole words, outside comments).
DIALECT_TYPES: dict[str, dict[str, str]] = {
    "duckdb": {},
    # 64-bit perceptual hashes are unsigned; numeric(20, 0) holds every value exactly.
    "postgres": {"ubigint": "numeric(20, 0)"},
}

LOCK_WAIT_SECONDS = 120.0

# For connections that run SQL the caller did not write (`hema query`): read-only, no file system,
# network, extension or Python-variable access, and the configuration locked so SET/RESET/PRAGMA cannot
# turn any of it back on. No temp directory either, so nothing is spilled to disk.
LOCKED_DOWN_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "enable_external_access": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "allow_persistent_secrets": False,
    "python_enable_replacements": False,
    "temp_directory": "",
    "lock_configuration": True,
}


# What a failing statement raises, on either backend.
WAREHOUSE_ERRORS: tuple[type[Exception], ...] = (duckdb.Error, psycopg2.Error)


class WarehouseMissing(FileNotFoundError):
    """The warehouse file does not exist (and a reader must not create it)."""


class WarehouseRoleTooPowerful(PermissionError):
    """SQL the caller did not write was to run as a role that could escape a read-only session."""


class WarehouseBusy(RuntimeError):
    """Another process holds the warehouse file's write lock."""


def _is_lock_error(error: duckdb.Error) -> bool:
    return "lock" in str(error).lower()


def schema_sql(dialect: str = "duckdb") -> str:
    """The whole schema in ``dialect`` ("duckdb" or "postgres"), in application order."""
    folder = resources.files("hema_pipeline") / "sql"
    parts = []
    for name in SCHEMA_FILES:
        own_edition = folder / dialect / name
        source = own_edition if dialect != "duckdb" and own_edition.is_file() else folder / name
        parts.append(_with_dialect_types(source.read_text(), dialect))
    return "\n".join(parts)


def _with_dialect_types(sql: str, dialect: str) -> str:
    substitutions = DIALECT_TYPES[dialect]
    if not substitutions:
        return sql
    lines = []
    for line in sql.split("\n"):
        code, marker, comment = line.partition("--")
        for generic, specific in substitutions.items():
            code = re.sub(rf"\b{generic}\b", specific, code)
        lines.append(code + marker + comment)
    return "\n".join(lines)


def is_postgres_location(location: str | os.PathLike[str]) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://", "postgresql+psycopg2://"))


class Warehouse:
    """The warehouse at ``location``: ``Warehouse(path)`` is a ``DuckDBWarehouse``,
    ``Warehouse("postgresql://...")`` a ``PostgresWarehouse``."""

    dialect: str = ""

    def __new__(cls, location: str | os.PathLike[str]) -> Warehouse:
        if cls is Warehouse:
            if is_postgres_location(location):
                from hema_pipeline.storage.postgres import PostgresWarehouse

                return super().__new__(PostgresWarehouse)
            return super().__new__(DuckDBWarehouse)
        return super().__new__(cls)

    def __getnewargs__(self) -> tuple[str]:
        # pickle and copy call __new__ with these, which picks the subclass again.
        return (self.location,)

    @property
    def location(self) -> str:
        """What ``Warehouse(...)`` was given."""
        raise NotImplementedError

    @property
    def description(self) -> str:
        """Where it is, safe for logs and messages (no password)."""
        raise NotImplementedError

    def exists(self) -> bool:
        """Whether the warehouse has been created (a reader must not create it)."""
        raise NotImplementedError

    def connect(self, read_only: bool = False) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def transaction(self, serialise_on: str | None = None) -> contextlib.AbstractContextManager[Any]:
        """A read-write connection inside one transaction: committed when the block ends, rolled back
        (and the error re-raised) when it raises. Transactions given the same ``serialise_on`` key run
        one after another (on DuckDB every writer already does)."""
        raise NotImplementedError

    def connect_existing(
        self, lock_wait_seconds: float = LOCK_WAIT_SECONDS, locked_down: bool = False
    ) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def connect_locked_down(self, lock_wait_seconds: float = LOCK_WAIT_SECONDS) -> contextlib.AbstractContextManager[Any]:
        """A read-only connection safe for SQL the caller did not write; never creates the warehouse
        (``WarehouseMissing``); ``WarehouseBusy`` after ``lock_wait_seconds``."""
        return self.connect_existing(lock_wait_seconds, locked_down=True)

    def query_locked_down(self, sql: str, parameters: Sequence[object] | None = None) -> pd.DataFrame:
        """``sql`` on a ``connect_locked_down`` connection; never creates the warehouse."""
        with self.connect_locked_down() as connection:
            return connection.execute(sql, parameters or []).df()

    def query(self, sql: str, parameters: Sequence[object] | None = None) -> pd.DataFrame:
        """Run a read query; an absent warehouse is created with the schema first."""
        if not self.exists():
            with self.connect():
                pass
        with self.connect(read_only=True) as connection:
            return connection.execute(sql, parameters or []).df()


class DuckDBWarehouse(Warehouse):
    """One DuckDB file: the embedded default."""

    dialect = "duckdb"

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self.path = Path(location)
        self._schema_applied = False

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def description(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.is_file()

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                connection = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as error:
                if "lock" not in str(error).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
        try:
            if not read_only and not self._schema_applied:
                connection.execute(schema_sql(self.dialect))
                self._schema_applied = True
            yield connection
        finally:
            connection.close()

    @contextmanager
    def transaction(self, serialise_on: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        # One writing process per file: every transaction is already serialised.
        with self.connect() as connection:
            connection.execute("begin transaction")
            try:
                yield connection
                connection.execute("commit")
            except BaseException:
                connection.execute("rollback")
                raise

    @contextmanager
    def connect_existing(
        self, lock_wait_seconds: float = LOCK_WAIT_SECONDS, locked_down: bool = False
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection that never creates the file: raises ``WarehouseMissing`` when it is
        absent, ``WarehouseBusy`` when a writer holds it for longer than ``lock_wait_seconds``.
        ``locked_down`` adds ``LOCKED_DOWN_CONFIG``, for SQL the caller did not write."""
        if not self.path.is_file():
            what = "is not a file" if self.path.exists() else "does not exist"
            raise WarehouseMissing(f"the warehouse {self.path} {what}")
        config = dict(LOCKED_DOWN_CONFIG) if locked_down else {}
        deadline = time.monotonic() + lock_wait_seconds
        while True:
            try:
                connection = duckdb.connect(str(self.path), read_only=True, config=config)
                break
            except duckdb.IOException as error:
                if not _is_lock_error(error):
                    raise
                if time.monotonic() >= deadline:
                    raise WarehouseBusy(f"another process is writing the warehouse {self.path}") from error
                time.sleep(0.25)
        try:
            yield connection
        finally:
            connection.close()

    def connect_locked_down(
        self, lock_wait_seconds: float = LOCK_WAIT_SECONDS
    ) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        """A read-only connection safe for arbitrary SQL (``LOCKED_DOWN_CONFIG``): it cannot read or write
        files other than the warehouse, attach databases, load extensions or change its settings. Never
        creates the file (``WarehouseMissing``); ``WarehouseBusy`` after ``lock_wait_seconds``."""
        return self.connect_existing(lock_wait_seconds, locked_down=True)


def dialect_of(connection: Any) -> str:
    """ "duckdb" or "postgres": the dialect a connection from ``Warehouse.connect`` speaks."""
    return str(getattr(connection, "dialect", "duckdb"))


def replace_rows(
    connection: Any,
    table: str,
    frame: pd.DataFrame,
    key_columns: Sequence[str],
) -> None:
    """Upsert ``frame`` into ``table`` by ``key_columns``, in the caller's transaction. Columns are
    matched by name, so the frame may list them in any order. DuckDB: delete matching keys, insert (its
    single writer makes that safe); PostgreSQL: ``insert ... on conflict do update``, which concurrent
    writers of the same keys cannot turn into duplicates or unique-key errors."""
    if frame.empty:
        return
    if dialect_of(connection) == "postgres":
        connection.upsert(table, frame, key_columns)
        return
    connection.register("incoming_rows", frame)
    try:
        join = " and ".join(f"{table}.{column} = incoming_rows.{column}" for column in key_columns)
        connection.execute(f"delete from {table} where exists (select 1 from incoming_rows where {join})")
        columns = ", ".join(frame.columns)
        connection.execute(f"insert into {table} ({columns}) select {columns} from incoming_rows")
    finally:
        # Inside an aborted transaction unregister raises too; the original error is the one to see.
        with contextlib.suppress(duckdb.Error):
            connection.unregister("incoming_rows")


def table_exists(connection: Any, table: str) -> bool:
    """Whether ``table`` exists in the connection's current schema; never raises for an absent one."""
    if dialect_of(connection) == "postgres":
        # The catalogue, not information_schema, which hides tables the role holds no privilege on.
        [(present,)] = connection.execute(
            "select to_regclass(quote_ident(current_schema()) || '.' || quote_ident(?)) is not null", [table]
        ).fetchall()
        return bool(present)
    [present] = connection.execute(
        "select count(*) from information_schema.tables where table_catalog = current_database() "
        "and table_schema = current_schema() and table_name = ?",
        [table],
    ).fetchone()
    return bool(present)


PSEUDONYM_SCHEME_COLUMNS = ("key_fingerprint", "record_number_normalisation", "accession_normalisation")


def read_pseudonym_scheme(connection: Any) -> dict[str, str] | None:
    """The warehouse's recorded pseudonymisation scheme, or None where the table or its row is absent.
    Never raises for an absent table (so it is safe inside the caller's transaction)."""
    if not table_exists(connection, "pseudonym_scheme"):
        return None
    row = connection.execute(f"select {', '.join(PSEUDONYM_SCHEME_COLUMNS)} from pseudonym_scheme where scheme_id = 1").fetchone()
    return None if row is None else dict(zip(PSEUDONYM_SCHEME_COLUMNS, row, strict=True))


def record_pseudonym_scheme(
    connection: Any,
    key_fingerprint: str,
    record_number_normalisation: str,
    accession_normalisation: str,
) -> None:
    """Record the scheme unless one is recorded already (then nothing changes: compare with
    ``read_pseudonym_scheme``). Notes how many smears the warehouse held already, imported before the
    scheme was recorded."""
    smears_before = 0
    if table_exists(connection, "smears"):
        [smears_before] = connection.execute("select count(*) from smears").fetchone()
    connection.execute(
        "insert into pseudonym_scheme (scheme_id, key_fingerprint, record_number_normalisation, "
        "accession_normalisation, smears_before, created_at) values (1, ?, ?, ?, ?, ?) "
        "on conflict do nothing",
        [
            key_fingerprint,
            record_number_normalisation,
            accession_normalisation,
            int(smears_before),
            dt.datetime.now(dt.UTC).replace(tzinfo=None),
        ],
    )
