"""The DuckDB warehouse: schema, connections and idempotent writes.

DuckDB allows one writing process per file. Writers are serialised by Dagster (the ``duckdb_writer``
pool, see dagster.yaml); in addition ``connect`` retries while another process holds the lock, so a CLI
query that overlaps a run waits instead of failing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import duckdb
import pandas as pd

# Applied in this order; each file is idempotent (create ... if not exists / create or replace view).
SCHEMA_FILES: tuple[str, ...] = ("schema.sql", "datasets.sql", "models.sql", "predictions.sql", "monitoring.sql", "views.sql")

LOCK_WAIT_SECONDS = 120.0

# For connections that run SQL the caller did not write (`hema query`): read-only, no file system,
# network, extension or Python-variable access, and the configuration locked so SET/RESET/PRAGMA cannot
# turn any of it back on. No temp directory either, so nothing is spilled to disk.
LOCKED_DOWN_CONFIG: dict[str, object] = {
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


class WarehouseMissing(FileNotFoundError):
    """The warehouse file does not exist (and a reader must not create it)."""


class WarehouseBusy(RuntimeError):
    """Another process holds the warehouse file's write lock."""


def _is_lock_error(error: duckdb.Error) -> bool:
    return "lock" in str(error).lower()


def schema_sql() -> str:
    folder = resources.files("hema_pipeline") / "sql"
    parts = [(folder / name).read_text() for name in SCHEMA_FILES if (folder / name).is_file()]
    return "\n".join(parts)


class Warehouse:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._schema_applied = False

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
                connection.execute(schema_sql())
                self._schema_applied = True
            yield connection
        finally:
            connection.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction: committed when the block ends, rolled back
        (and the error re-raised) when it raises."""
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

    def connect_locked_down(self, lock_wait_seconds: float = LOCK_WAIT_SECONDS) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        """A read-only connection safe for arbitrary SQL (``LOCKED_DOWN_CONFIG``): it cannot read or write
        files other than the warehouse, attach databases, load extensions or change its settings. Never
        creates the file (``WarehouseMissing``); ``WarehouseBusy`` after ``lock_wait_seconds``."""
        return self.connect_existing(lock_wait_seconds, locked_down=True)

    def query_locked_down(self, sql: str, parameters: Sequence[object] | None = None) -> pd.DataFrame:
        """``sql`` on a ``connect_locked_down`` connection; never creates the warehouse."""
        with self.connect_locked_down() as connection:
            return connection.execute(sql, parameters or []).df()

    def query(self, sql: str, parameters: Sequence[object] | None = None) -> pd.DataFrame:
        """Run a read query; an absent warehouse file is created with the schema first."""
        if not self.path.exists():
            with self.connect():
                pass
        with self.connect(read_only=True) as connection:
            return connection.execute(sql, parameters or []).df()


def replace_rows(
    connection: duckdb.DuckDBPyConnection,
    table: str,
    frame: pd.DataFrame,
    key_columns: Sequence[str],
) -> None:
    """Upsert ``frame`` into ``table`` by ``key_columns`` (delete matching keys, insert), in the caller's
    transaction. Columns are matched by name, so the frame may list them in any order."""
    if frame.empty:
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


PSEUDONYM_SCHEME_COLUMNS = ("key_fingerprint", "record_number_normalisation", "accession_normalisation")


def read_pseudonym_scheme(connection: duckdb.DuckDBPyConnection) -> dict[str, str] | None:
    """The warehouse's recorded pseudonymisation scheme, or None where the table or its row is absent.
    Never raises for an absent table (so it is safe inside the caller's transaction)."""
    [present] = connection.execute(
        "select count(*) from duckdb_tables() where database_name = current_database() "
        "and schema_name = 'main' and table_name = 'pseudonym_scheme'"
    ).fetchone()
    if not present:
        return None
    row = connection.execute(
        f"select {', '.join(PSEUDONYM_SCHEME_COLUMNS)} from pseudonym_scheme where scheme_id = 1"
    ).fetchone()
    return None if row is None else dict(zip(PSEUDONYM_SCHEME_COLUMNS, row, strict=True))


def record_pseudonym_scheme(
    connection: duckdb.DuckDBPyConnection,
    key_fingerprint: str,
    record_number_normalisation: str,
    accession_normalisation: str,
) -> None:
    """Record the scheme unless one is recorded already (then nothing changes: compare with
    ``read_pseudonym_scheme``). Notes how many smears the warehouse held already, imported before the
    scheme was recorded."""
    [smears_before] = connection.execute(
        "select count(*) from duckdb_tables() where database_name = current_database() "
        "and schema_name = 'main' and table_name = 'smears'"
    ).fetchone()
    if smears_before:
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
