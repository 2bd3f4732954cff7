"""The DuckDB warehouse: schema, connections and idempotent writes.

DuckDB allows one writing process per file. Writers are serialised by Dagster (the ``duckdb_writer``
pool, see dagster.yaml); in addition ``connect`` retries while another process holds the lock, so a CLI
query that overlaps a run waits instead of failing.
"""

from __future__ import annotations

import contextlib
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
