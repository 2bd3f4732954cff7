"""The warehouse on PostgreSQL: for many machines writing at once (the network-scale deployment).

A DuckDB file takes one writing process; pods are separate machines. PostgreSQL takes them all, and
``insert ... on conflict`` keeps concurrent upserts free of duplicates and key errors. DuckDB stays the
embedded default and the lab's analytics engine (it reads Parquet mirrors and can attach this database).

Location: ``postgresql://user@host:port/database`` (``HEMA_WAREHOUSE``). Put no password in it (it would
reach Dagster's run config and the UI): libpq reads ``PGPASSWORD`` or ``PGPASSFILE``, which a Kubernetes
secret provides (deploy/README.md).

``PostgresConnection`` answers the calls the project makes on a DuckDB connection: ``execute`` with ``?``
placeholders then ``df()`` / ``fetchone()`` / ``fetchall()`` / ``to_arrow_table()``, and ``register`` /
``unregister`` of a DataFrame (a temporary table). JSON columns come back as text, as DuckDB returns them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import math
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pyarrow

from hema_pipeline.storage.warehouse import (
    LOCK_WAIT_SECONDS,
    Warehouse,
    WarehouseMissing,
    WarehouseRoleTooPowerful,
    schema_sql,
    table_exists,
)

# pg_advisory_lock key held while the schema is applied, so that pods starting together do not race on
# "create table if not exists" (which is not atomic in PostgreSQL's catalogue).
SCHEMA_LOCK_KEY = 0x68656D61  # "hema"

# What a locked-down (user-written) query may take before PostgreSQL cancels it.
LOCKED_DOWN_STATEMENT_TIMEOUT_MS = 120_000


# What a ``?`` inside is not a placeholder in: quoted strings and identifiers, dollar-quoted bodies,
# and comments.
_NOT_PLACEHOLDERS = re.compile(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$([A-Za-z_]*)\$.*?\$\2\$|--[^\n]*|/\*.*?\*/)", re.DOTALL)


def _sql_with_pyformat_placeholders(sql: str) -> str:
    """``?`` placeholders (outside quotes, dollar-quoted bodies and comments) become psycopg2's ``%s``;
    every literal ``%`` is doubled."""
    pieces = []
    position = 0
    for match in _NOT_PLACEHOLDERS.finditer(sql):
        pieces.append(sql[position : match.start()].replace("%", "%%").replace("?", "%s"))
        pieces.append(match.group(0).replace("%", "%%"))
        position = match.end()
    pieces.append(sql[position:].replace("%", "%%").replace("?", "%s"))
    return "".join(pieces)


def _python_value(value: Any) -> Any:
    """numpy and pandas scalars as the Python values psycopg2 adapts; missing values as NULL."""
    if value is None or value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, (list, tuple)):
        return [_python_value(item) for item in value]
    if isinstance(value, np.ndarray):
        return [_python_value(item) for item in value.tolist()]
    return value


def _column_type(series: pd.Series) -> str:
    if series.dtype == object:
        present = series.dropna()
        sample = present.iloc[0] if len(present) else None
        if isinstance(sample, dt.datetime):
            return "timestamp"
        if isinstance(sample, dt.date):
            return "date"
        if isinstance(sample, bool):
            return "boolean"
        if isinstance(sample, int):
            return "bigint"
        if isinstance(sample, float):
            return "double precision"
        return "text"
    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if pd.api.types.is_unsigned_integer_dtype(series):
        return "numeric(20, 0)"
    if pd.api.types.is_integer_dtype(series):
        return "bigint"
    if pd.api.types.is_float_dtype(series):
        return "double precision"
    if pd.api.types.is_datetime64_any_dtype(series):
        return "timestamp"
    return "text"


_NUMERIC_OID = 1700

# PostgreSQL type OIDs (pg_type) -> the Arrow types DuckDB exports for the same column types.
_ARROW_TYPES: dict[int, pyarrow.DataType] = {
    16: pyarrow.bool_(),
    20: pyarrow.int64(),
    21: pyarrow.int16(),
    23: pyarrow.int32(),
    700: pyarrow.float32(),
    701: pyarrow.float64(),
    1700: pyarrow.float64(),
    25: pyarrow.string(),
    1043: pyarrow.string(),
    114: pyarrow.string(),  # json, read as text
    3802: pyarrow.string(),
    1082: pyarrow.date32(),
    1114: pyarrow.timestamp("us"),
    1009: pyarrow.list_(pyarrow.string()),
    1015: pyarrow.list_(pyarrow.string()),
}


def _quoted(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def _rows(frame: pd.DataFrame) -> list[tuple[Any, ...]]:
    columns = [frame[column].astype(object).tolist() for column in frame.columns]
    return [tuple(_python_value(value) for value in row) for row in zip(*columns, strict=True)]


class PostgresConnection:
    """A psycopg2 connection behind the DuckDB-connection calls the project uses. Autocommit, so the
    project's own ``begin transaction`` / ``commit`` / ``rollback`` statements mark transactions, as on
    DuckDB."""

    dialect = "postgres"

    def __init__(self, raw: psycopg2.extensions.connection) -> None:
        self.raw = raw
        self._cursor: psycopg2.extensions.cursor | None = None

    def execute(self, sql: str, parameters: Sequence[object] | None = None) -> PostgresConnection:
        cursor = self.raw.cursor()
        if parameters:
            cursor.execute(_sql_with_pyformat_placeholders(sql), [_python_value(value) for value in parameters])
        else:
            cursor.execute(sql)
        self._cursor = cursor
        return self

    def _result_cursor(self) -> psycopg2.extensions.cursor:
        if self._cursor is None or self._cursor.description is None:
            raise psycopg2.ProgrammingError("the last statement returned no rows")
        return self._cursor

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._result_cursor().fetchone()

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._result_cursor().fetchall()

    def df(self) -> pd.DataFrame:
        cursor = self._result_cursor()
        names = [column.name for column in cursor.description]
        frame = pd.DataFrame.from_records(cursor.fetchall(), columns=names)
        for column in cursor.description:
            if column.type_code == _NUMERIC_OID:
                # By the column's declared scale, not its values, so a query's dtype never depends on the
                # data: numeric(20, 0) holds unsigned 64-bit hashes (Python ints), other numerics are
                # measurements (floats; an unconstrained numeric, as avg() returns, has no scale).
                integral = column.scale == 0
                frame[column.name] = frame[column.name].map(
                    lambda value, integral=integral: None if value is None else (int(value) if integral else float(value))
                )
        return frame

    def to_arrow_table(self) -> pyarrow.Table:
        """The rows with the column types their SQL types give (as DuckDB's export would), never types
        guessed from the values: the Parquet mirrors of one table must agree from smear to smear."""
        cursor = self._result_cursor()
        names = [column.name for column in cursor.description]
        types = [_ARROW_TYPES.get(column.type_code, pyarrow.string()) for column in cursor.description]
        rows = cursor.fetchall()
        columns = [[row[index] for row in rows] for index in range(len(names))]
        return pyarrow.Table.from_arrays(
            [pyarrow.array(values, type=kind) for values, kind in zip(columns, types, strict=True)], names=names
        )

    def sql(self, sql: str, params: Sequence[object] | None = None) -> PostgresConnection:
        """DuckDB's relational entry point, for the one use the project makes of it (``to_arrow_table``)."""
        return self.execute(sql, params)

    def register(self, name: str, frame: pd.DataFrame) -> None:
        """``frame`` as a temporary table ``name`` (until ``unregister`` or the connection closes)."""
        table = _quoted(name)
        columns = ", ".join(f"{_quoted(str(column))} {_column_type(frame[column])}" for column in frame.columns)
        cursor = self.raw.cursor()
        cursor.execute(f"drop table if exists pg_temp.{table}")
        cursor.execute(f"create temporary table {table} ({columns})")
        if not frame.empty:
            psycopg2.extras.execute_values(cursor, f"insert into {table} values %s", _rows(frame), page_size=1000)

    def unregister(self, name: str) -> None:
        if self.raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR:
            # The rollback that follows drops it; a statement now would hide the error that aborted it.
            return
        self.raw.cursor().execute(f"drop table if exists pg_temp.{_quoted(name)}")

    def upsert(self, table: str, frame: pd.DataFrame, key_columns: Sequence[str]) -> None:
        """``insert ... on conflict (keys) do update``: one statement per page, safe under concurrent writers."""
        columns = [_quoted(str(column)) for column in frame.columns]
        keys = [_quoted(column) for column in key_columns]
        updates = [column for column in columns if column not in keys]
        action = "do update set " + ", ".join(f"{column} = excluded.{column}" for column in updates) if updates else "do nothing"
        statement = f"insert into {_quoted(table)} ({', '.join(columns)}) values %s on conflict ({', '.join(keys)}) {action}"
        psycopg2.extras.execute_values(self.raw.cursor(), statement, _rows(frame), page_size=1000)

    def close(self) -> None:
        self.raw.close()


def _json_as_text(raw: psycopg2.extensions.connection) -> None:
    psycopg2.extras.register_default_json(raw, loads=lambda text: text)
    psycopg2.extras.register_default_jsonb(raw, loads=lambda text: text)


def _database_does_not_exist(error: psycopg2.OperationalError) -> bool:
    return getattr(error, "pgcode", None) == "3D000" or "does not exist" in str(error)


class PostgresWarehouse(Warehouse):
    """The warehouse in a PostgreSQL database (its default schema)."""

    dialect = "postgres"

    def __init__(self, location: str) -> None:
        parsed = urllib.parse.urlsplit(str(location))
        query = {name.lower() for name in urllib.parse.parse_qs(parsed.query)}
        if parsed.password or query & {"password", "passfile"}:
            raise ValueError(
                "the warehouse URL must not hold a password (it would show in run config and the UI): "
                "set PGPASSWORD or PGPASSFILE instead"
            )
        # libpq does not know SQLAlchemy's driver suffix.
        self.dsn = urllib.parse.urlunsplit(parsed._replace(scheme="postgresql"))
        self._schema_applied = False

    @property
    def location(self) -> str:
        return self.dsn

    @property
    def description(self) -> str:
        parsed = urllib.parse.urlsplit(self.dsn)
        host = parsed.hostname or "localhost"
        port = f":{parsed.port}" if parsed.port else ""
        return f"postgresql://{host}{port}{parsed.path}"

    def _open(self, read_only: bool, statement_timeout_ms: int | None = None) -> PostgresConnection:
        options = []
        if read_only:
            options.append("-c default_transaction_read_only=on")
        if statement_timeout_ms is not None:
            options.append(f"-c statement_timeout={int(statement_timeout_ms)}")
        raw = psycopg2.connect(self.dsn, options=" ".join(options) or None, application_name="hema-pipeline")
        raw.autocommit = True
        _json_as_text(raw)
        return PostgresConnection(raw)

    def exists(self) -> bool:
        """False where the database or its schema is absent; a server that cannot be reached (down, a
        wrong password) raises, so that it is never mistaken for "nothing imported yet"."""
        try:
            connection = self._open(read_only=True)
        except psycopg2.OperationalError as error:
            if _database_does_not_exist(error):
                return False
            raise
        try:
            return table_exists(connection, "cells")
        finally:
            connection.close()

    def _apply_schema(self, connection: PostgresConnection) -> None:
        """The schema once per version of it, not once per process: every run pod connects, and
        re-running the DDL (alter table, create or replace view) would take exclusive locks that stall
        imports behind long lab queries. The applied version is the schema text's SHA-256."""
        schema = schema_sql(self.dialect)
        version = hashlib.sha256(schema.encode()).hexdigest()
        if table_exists(connection, "schema_versions") and connection.execute(
            "select count(*) from schema_versions where schema_sha256 = ?", [version]
        ).fetchall() == [(1,)]:
            self._schema_applied = True
            return
        connection.execute("select pg_advisory_lock(?)", [SCHEMA_LOCK_KEY])
        try:
            connection.execute("begin transaction")
            try:
                connection.execute(schema)
                connection.execute(
                    "create table if not exists schema_versions (schema_sha256 varchar primary key, applied_at timestamp not null)"
                )
                connection.execute("insert into schema_versions values (?, now()) on conflict do nothing", [version])
                connection.execute("commit")
            except BaseException:
                connection.execute("rollback")
                raise
        finally:
            connection.execute("select pg_advisory_unlock(?)", [SCHEMA_LOCK_KEY])
        self._schema_applied = True

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[PostgresConnection]:
        connection = self._open(read_only)
        try:
            if not read_only and not self._schema_applied:
                self._apply_schema(connection)
            yield connection
        finally:
            connection.close()

    @contextmanager
    def transaction(self, serialise_on: str | None = None) -> Iterator[PostgresConnection]:
        with self.connect() as connection:
            connection.execute("begin transaction")
            try:
                if serialise_on is not None:
                    # Released by commit or rollback; two imports of one smear wait for each other,
                    # imports of different smears do not.
                    connection.execute("select pg_advisory_xact_lock(hashtextextended(?, 0))", [serialise_on])
                yield connection
                connection.execute("commit")
            except BaseException:
                with contextlib.suppress(psycopg2.Error):
                    connection.execute("rollback")
                raise

    @contextmanager
    def connect_existing(
        self, lock_wait_seconds: float = LOCK_WAIT_SECONDS, locked_down: bool = False
    ) -> Iterator[PostgresConnection]:
        """Read-only (every transaction of the session is read only); ``locked_down`` adds a statement
        timeout. Raises ``WarehouseMissing`` where the schema was never applied. Protection from SQL the
        caller did not write rests on the role as well: give ``hema query`` a role with SELECT only
        (deploy/README.md), since a session setting can be changed by the SQL it runs."""
        try:
            connection = self._open(
                read_only=True, statement_timeout_ms=LOCKED_DOWN_STATEMENT_TIMEOUT_MS if locked_down else None
            )
        except psycopg2.OperationalError as error:
            raise WarehouseMissing(f"the warehouse {self.description} cannot be reached: {error.args[0].strip()}") from error
        try:
            if locked_down:
                # A session setting cannot keep SQL the caller did not write from writing: the SQL can
                # change it (psycopg2 sends several statements as one). The role must be unable to, so lab
                # SQL runs only as a role that can neither write a warehouse table nor leave the session
                # (a superuser can also read server files): deploy/README.md, "the reader role".
                [(superuser, writable)] = connection.execute(
                    "select r.rolsuper or r.rolcreaterole or r.rolbypassrls, "
                    # a table it may change, by table or column grant
                    "coalesce((select bool_or(has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER') "
                    "or has_any_column_privilege(c.oid, 'INSERT, UPDATE')) from pg_class c "
                    "join pg_namespace n on n.oid = c.relnamespace where n.nspname = current_schema() and c.relkind = 'r'), false) "
                    # a role it could SET ROLE to (a writer, or the server-file roles), or objects it could plant
                    "or exists (select 1 from pg_auth_members m where m.member = r.oid) "
                    "or has_schema_privilege(current_schema(), 'CREATE') "
                    "from pg_roles r where r.rolname = current_user"
                ).fetchall()
                if superuser or writable:
                    raise WarehouseRoleTooPowerful(
                        f"refusing to run lab SQL as a role that {'is a superuser or may create roles or bypass row security' if superuser else 'can write the warehouse, or could become a role that can'}: "
                        "connect as a role with SELECT only"
                    )
            if not table_exists(connection, "cells"):
                raise WarehouseMissing(f"the warehouse {self.description} has no schema yet (nothing imported)")
            yield connection
        finally:
            connection.close()
