"""Shared fixtures: a throw-away pipeline environment (HEMA_HOME, DAGSTER_HOME, key) per test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TEST_KEY_HEX = "5e" * 32


@dataclass
class PipelineEnv:
    home: Path
    inbox: Path
    lake: Path
    quarantine: Path
    warehouse: Path
    dagster_home: Path

    def resources(self) -> dict[str, object]:
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
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto_server did not start on 127.0.0.1")
            time.sleep(0.1)
    previous = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
