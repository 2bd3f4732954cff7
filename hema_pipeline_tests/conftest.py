"""Shared fixtures: a throw-away pipeline environment (HEMA_HOME, DAGSTER_HOME, key) per test."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TEST_KEY_HEX = "5e" * 32


def restore_stop_signals() -> None:
    """Let SIGINT and SIGTERM stop this process and everything it starts, however it was started.

    A job started in the background of a non-interactive shell (`cmd &`, as a CI runner may start
    .ci/run) inherits SIGINT ignored, and Dagster maps SIGTERM to SIGINT's handler whenever it runs
    something (`dagster._utils.interrupts`): SIGTERM becomes ignored too, in this process and, since an
    ignored signal stays ignored across exec, in every pool worker and server a test starts afterwards. A
    multiprocessing pool's terminate() then waits forever on a worker it cannot stop, and `dagster dev`
    ignores the SIGTERM that should stop it."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pytest_configure(config: pytest.Config) -> None:
    restore_stop_signals()


@dataclass
class PipelineEnv:
    home: Path
    inbox: Path
    lake: Path
    quarantine: Path
    warehouse: Path | str  # a DuckDB file, or a postgresql:// URL (pipeline_env_on_both_warehouses)
    dagster_home: Path

    def resources(self) -> dict[str, object]:
        from hema_pipeline.defs.handles import HandleIOManager
        from hema_pipeline.defs.resources import (
            InboxResource,
            PseudonymKeyResource,
            StorageResource,
            WarehouseResource,
        )

        return {
            "inbox": InboxResource(url=str(self.inbox), settle_seconds=0),
            "storage": StorageResource(lake_url=str(self.lake), quarantine_url=str(self.quarantine)),
            "warehouse": WarehouseResource(path=str(self.warehouse)),
            "pseudonyms": PseudonymKeyResource(),
            "io_manager": HandleIOManager(lake_url=str(self.lake)),
        }


@pytest.fixture
def pipeline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PipelineEnv:
    home = tmp_path / "hema"
    env = PipelineEnv(
        home=home,
        inbox=home / "inbox",
        lake=home / "lake",
        quarantine=home / "quarantine",
        warehouse=home / "warehouse.duckdb",
        dagster_home=home / "dagster_home",
    )
    env.inbox.mkdir(parents=True)
    env.dagster_home.mkdir(parents=True)
    monkeypatch.setenv("HEMA_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(env.dagster_home))
    monkeypatch.setenv("HEMA_PSEUDONYM_KEY", TEST_KEY_HEX)
    monkeypatch.delenv("HEMA_DEMO", raising=False)
    for name in ("HEMA_INBOX", "HEMA_LAKE", "HEMA_QUARANTINE", "HEMA_WAREHOUSE", "HEMA_PSEUDONYM_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    return env


@pytest.fixture
def dagster_instance(pipeline_env: PipelineEnv) -> Iterator[object]:
    """A real SQLite-backed instance in the test's DAGSTER_HOME (its files are searched by the PHI canary)."""
    import dagster as dg

    with dg.instance_for_test(temp_dir=str(pipeline_env.dagster_home)) as instance:
        yield instance


def shared_data_dir() -> Path:
    return Path(os.environ.get("HEMA_SHARED_DATA", "../shared/data")).resolve()


def require_pbc() -> Path:
    root = shared_data_dir() / "pbc"
    if not root.is_dir():
        pytest.skip(f"PBC images not found at {root}: set HEMA_SHARED_DATA to the folder holding pbc/")
    return root


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto_server) on 127.0.0.1 for the whole session."""
    from hema_pipeline_tests.s3_server import running_s3_server

    with running_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL server (Debian's postgresql package) on 127.0.0.1 and a random port for the
    session; yields the URL of its maintenance database. Skips where the package is absent, unless
    HEMA_REQUIRE_POSTGRES=1 (as in .ci/run) turns that into a failure."""
    from hema_pipeline_tests.postgres_server import PostgresMissing, running_postgres

    try:
        with running_postgres() as url:
            yield url
    except PostgresMissing as missing:
        if os.environ.get("HEMA_REQUIRE_POSTGRES") == "1":
            pytest.fail(str(missing))
        pytest.skip(str(missing))


@pytest.fixture
def postgres_database(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's server; its URL. Dropped afterwards."""
    import uuid

    import psycopg2

    from hema_pipeline_tests.postgres_server import create_database

    name = f"hema_{uuid.uuid4().hex[:12]}"
    url = create_database(postgres_server, name)
    try:
        yield url
    finally:
        admin = psycopg2.connect(postgres_server)
        admin.autocommit = True
        admin.cursor().execute(f"drop database if exists {name} with (force)")
        admin.close()


def pipeline_env_on_both_warehouses() -> object:
    """A ``pipeline_env`` fixture for a test module whose every test must hold on both warehouse
    backends: ``pipeline_env = pipeline_env_on_both_warehouses()`` at module level runs each test once
    on a DuckDB file and once on a fresh PostgreSQL database (HEMA_WAREHOUSE set to match)."""

    @pytest.fixture(params=["duckdb", "postgres"])
    def pipeline_env(request: pytest.FixtureRequest, pipeline_env: PipelineEnv, monkeypatch: pytest.MonkeyPatch) -> PipelineEnv:
        if request.param == "postgres":
            pipeline_env.warehouse = request.getfixturevalue("postgres_database")
            monkeypatch.setenv("HEMA_WAREHOUSE", str(pipeline_env.warehouse))
        return pipeline_env

    return pipeline_env


SERVER_FIXTURES = frozenset({"postgres_server", "postgres_database", "s3_endpoint"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that needs a server (PostgreSQL, moto_server), directly or through a "postgres" parameter,
    or runs end to end, is slow by definition, so `make check` leaves it out without anyone having to
    remember the mark."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        needs_server = SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) or "postgres" in params.values()
        if needs_server or item.get_closest_marker("end_to_end"):
            item.add_marker(pytest.mark.slow)
