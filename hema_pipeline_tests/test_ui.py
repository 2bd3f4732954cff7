"""The real thing an operator runs: `dagster dev` (webserver + daemon) on 127.0.0.1 with this repository's
workspace.yaml and dagster.yaml. The daemon's inbox sensor imports synthetic smears on its own; a run
launched through the GraphQL API succeeds; a failing run is recorded by the run-failure sensor; and a
headless Chromium renders the asset graph (screenshot kept).

The browser test needs Debian's chromium and chromium-driver (`.ci/run` installs them and sets
HEMA_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline.taxonomy import CELL_CLASSES
from hema_pipeline_tests.conftest import TEST_KEY_HEX, _free_port
from hema_pipeline_tests.support import TEST_KEY

pytestmark = pytest.mark.end_to_end

REPO = Path(__file__).resolve().parents[1]
LOCATION = "hema_pipeline"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
START_TIMEOUT_S = 240
GROUP_ASSETS = {
    "ingest": ("imported_smear",),
    "quality": ("cell_table",),
    "datasets": ("pbc8_dataset", "neutrophil_dysplasia_dataset"),
    # The graph renders only the nodes in view (long names are shortened): check ones a 1600x2000 window shows.
    "models": ("pbc8_trained_model", "pbc8_champion", "neutrophil_dysplasia_champion"),
    "predictions": ("smear_flag_thresholds", "smear_predictions", "smear_report"),
}
RUN_TIMEOUT_S = 300


@dataclass
class DagsterServer:
    url: str
    port: int
    home: Path
    dagster_home: Path
    warehouse: Path
    smear_ids: list[str]
    cells_per_smear: int
    log: Path
    process: subprocess.Popen | None = None  # `dagster dev`, leader of its own process group

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def runs(self, job_name: str) -> list[dict]:
        data = self.graphql(
            """
            query Runs($job: String!) {
              runsOrError(filter: {pipelineName: $job}) {
                ... on Runs { results { runId status tags { key value } } }
              }
            }
            """,
            {"job": job_name},
        )
        return data["runsOrError"]["results"]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""


def _wait_until(predicate, timeout_s: float, what: str, server: DagsterServer | None = None, interval_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n--- dagster dev log ---\n{server.log_tail()}" if server else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}{tail}")
        time.sleep(interval_s)


def _partition_tag(run: dict) -> str | None:
    return next((tag["value"] for tag in run["tags"] if tag["key"] == "dagster/partition"), None)


def train_a_champion_before_start(home: Path, dagster_home: Path, storage_resources: dict | None = None) -> None:
    """What a lab has before the night shift: smears imported from an earlier export, a pbc8 champion
    (one short epoch) and those smears predicted, all in this process on the same instance and warehouse,
    so that the daemon has a model to predict new smears with. ``storage_resources`` replaces the
    embedded ``storage``, ``warehouse`` and ``io_manager`` (a PostgreSQL warehouse, an S3 lake)."""
    import dagster as dg

    from hema_pipeline.defs.definitions import defs
    from hema_pipeline.defs.handles import HandleIOManager
    from hema_pipeline.defs.resources import InboxResource, PseudonymKeyResource, StorageResource, WarehouseResource

    earlier = generate_export(
        home / "earlier_export",
        SyntheticExportSpec(
            smears=8, cells_per_smear=40, seed=71, verified_share=1.0, class_mix={name: 1.0 for name in CELL_CLASSES}
        ),
    )
    resources = {
        "inbox": InboxResource(url=str(home / "earlier_export"), settle_seconds=0),
        "storage": StorageResource(lake_url=str(home / "lake"), quarantine_url=str(home / "quarantine")),
        "warehouse": WarehouseResource(path=str(home / "warehouse.duckdb")),
        "pseudonyms": PseudonymKeyResource(),
        "io_manager": HandleIOManager(lake_url=str(home / "lake")),
        **(storage_resources or {}),
    }
    configured = dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs, resources=resources)
    smear_ids = [TEST_KEY.smear_id(smear.folder.name) for smear in earlier.smears]
    training = {
        "ops": {
            "pbc8_dataset": {"config": {"image_size": 32, "min_cells_per_class": 8}},
            "pbc8_trained_model": {"config": {"architecture": "compact", "epochs": 1}},
        }
    }
    chain = {
        dg.AssetKey(name)
        for name in (
            "cell_table",
            "pbc8_dataset",
            "pbc8_trained_model",
            "pbc8_calibration",
            "pbc8_model",
            "pbc8_champion",
            "smear_flag_thresholds",
        )
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEMA_HOME", str(home))
        patch.setenv("HEMA_PSEUDONYM_KEY", TEST_KEY_HEX)
        patch.delenv("HEMA_DEMO", raising=False)
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            instance.add_dynamic_partitions("smears", smear_ids)
            for smear_id in smear_ids:
                assert (
                    configured.resolve_job_def("import_smears")
                    .execute_in_process(instance=instance, partition_key=smear_id)
                    .success
                )
            trained = configured.resolve_job_def("train_models").get_subset(asset_selection=chain)
            assert trained.execute_in_process(instance=instance, run_config=training).success
            for smear_id in smear_ids:
                assert (
                    configured.resolve_job_def("predict_smears")
                    .execute_in_process(instance=instance, partition_key=smear_id)
                    .success
                )


def dagster_dev_environment(home: Path, dagster_home: Path, **overrides: str) -> dict[str, str]:
    """The environment a test's `dagster dev` runs in: this process's minus any HEMA_* setting, a throw-away
    HEMA_HOME and DAGSTER_HOME, the test key, and sensors that tick every few seconds."""
    return {
        **{name: value for name, value in os.environ.items() if not name.startswith("HEMA_")},
        "HEMA_HOME": str(home),
        "DAGSTER_HOME": str(dagster_home),
        "HEMA_PSEUDONYM_KEY": TEST_KEY_HEX,
        "HEMA_INBOX_SETTLE_SECONDS": "0",
        "HEMA_INBOX_SENSOR_INTERVAL_SECONDS": "5",
        "HEMA_FAILURE_SENSOR_INTERVAL_SECONDS": "5",
        "HEMA_PREDICTION_SENSOR_INTERVAL_SECONDS": "5",
        "HEMA_RETRAIN_SENSOR_INTERVAL_SECONDS": "3600",
        "GX_ANALYTICS_ENABLED": "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **overrides,
    }


@contextmanager
def running_dagster_dev(
    home: Path,
    dagster_home: Path,
    environment: dict[str, str],
    smear_ids: list[str] | None = None,
    cells_per_smear: int = 0,
    log_name: str = "dagster-dev.log",
) -> Iterator[DagsterServer]:
    """`dagster dev -w workspace.yaml` on a free 127.0.0.1 port, yielded once the code location has loaded;
    stopped (its whole process group) on exit, its log copied to $HEMA_TEST_ARTIFACTS when set."""
    port = _free_port()
    log = home / log_name
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster")), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: webserver, daemon and code servers stop together
        )
    server = DagsterServer(
        url=f"http://127.0.0.1:{port}",
        port=port,
        home=home,
        dagster_home=dagster_home,
        warehouse=home / "warehouse.duckdb",
        smear_ids=smear_ids or [],
        cells_per_smear=cells_per_smear,
        log=log,
        process=process,
    )

    def code_location_loaded() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"dagster dev exited with {process.returncode}:\n{server.log_tail()}")
        try:
            data = server.graphql(
                "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
            )
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        entries = data["workspaceOrError"]["locationEntries"]
        for entry in entries:
            if entry["locationOrLoadError"] and entry["locationOrLoadError"]["__typename"] == "PythonError":
                raise AssertionError(f"code location failed to load: {entry['locationOrLoadError']['message']}")
        return any(entry["name"] == LOCATION and entry["loadStatus"] == "LOADED" for entry in entries)

    try:
        _wait_until(code_location_loaded, START_TIMEOUT_S, "the code location to load", server)
        yield server
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
        except ProcessLookupError:
            pass  # the group is gone already (a test may kill it on purpose)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        artifacts = os.environ.get("HEMA_TEST_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, Path(artifacts) / log_name)


@pytest.fixture(scope="module")
def dagster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterServer]:
    home = tmp_path_factory.mktemp("ui") / "hema"
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True)
    shutil.copyfile(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    train_a_champion_before_start(home, dagster_home)
    cells_per_smear = 12
    export = generate_export(home / "inbox", SyntheticExportSpec(smears=2, cells_per_smear=cells_per_smear, seed=91))
    smear_ids = sorted(TEST_KEY.smear_id(smear.folder.name) for smear in export.smears)
    environment = dagster_dev_environment(home, dagster_home)
    with running_dagster_dev(home, dagster_home, environment, smear_ids, cells_per_smear) as server:
        yield server


def test_daemon_imports_and_predicts_new_smears_on_its_own(dagster_server: DagsterServer) -> None:
    server = dagster_server

    def imports_done() -> list[dict] | None:
        # The sensor's runs (the earlier export was imported in the fixture, without a trigger tag).
        runs = [run for run in server.runs("import_smears") if {"key": "hema/trigger", "value": "inbox"} in run["tags"]]
        failed = [run for run in runs if run["status"] in ("FAILURE", "CANCELED")]
        if failed:
            raise AssertionError(f"import runs failed: {failed}\n{server.log_tail()}")
        succeeded = [run for run in runs if run["status"] == "SUCCESS"]
        return succeeded if len(succeeded) >= len(server.smear_ids) else None

    runs = _wait_until(imports_done, RUN_TIMEOUT_S, "the daemon to import both smears", server)
    assert sorted(_partition_tag(run) for run in runs) == server.smear_ids
    cells = Warehouse(server.warehouse).query(
        f"select smear_id, count(*) as n from cells where smear_id in ({', '.join('?' for _ in server.smear_ids)}) "
        "group by smear_id order by smear_id",
        server.smear_ids,
    )
    assert cells["smear_id"].tolist() == server.smear_ids
    assert cells["n"].tolist() == [server.cells_per_smear] * len(server.smear_ids)

    # The prediction automation sensor then predicts each new smear with the champion, in its own run.
    def predicted() -> list[dict] | None:
        rows = Warehouse(server.warehouse).query(
            f"select smear_id, count(distinct cell_uid) as n from predictions where task = 'pbc8' and smear_id in "
            f"({', '.join('?' for _ in server.smear_ids)}) group by smear_id order by smear_id",
            server.smear_ids,
        )
        done = rows.to_dict("records")
        return done if len(done) == len(server.smear_ids) and all(row["n"] == server.cells_per_smear for row in done) else None

    _wait_until(predicted, RUN_TIMEOUT_S, "the daemon to predict both new smears", server)
    reports = Warehouse(server.warehouse).query(
        f"select distinct smear_id from smear_reports where smear_id in ({', '.join('?' for _ in server.smear_ids)})",
        server.smear_ids,
    )
    assert sorted(reports["smear_id"]) == server.smear_ids
    assert "SensorExecutionError" not in server.log.read_text(errors="replace"), server.log_tail()


def test_materialisation_launched_through_graphql_succeeds(dagster_server: DagsterServer) -> None:
    from dagster_graphql import DagsterGraphQLClient

    server = dagster_server
    client = DagsterGraphQLClient("127.0.0.1", port_number=server.port)
    smear_id = server.smear_ids[0]
    run_id = client.submit_job_execution(
        "import_smears", repository_location_name=LOCATION, tags={"dagster/partition": smear_id, "hema/trigger": "graphql-test"}
    )

    def finished() -> str | None:
        status = client.get_run_status(run_id).value
        return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

    assert _wait_until(finished, RUN_TIMEOUT_S, f"GraphQL-launched run {run_id}", server) == "SUCCESS", server.log_tail()
    warehouse = Warehouse(server.warehouse)
    [status] = warehouse.query("select status from import_runs where dagster_run_id = ?", [run_id])["status"]
    assert status == "already_present"  # a re-import of the same export changes nothing
    assert warehouse.query("select count(*) as n from cells where smear_id = ?", [smear_id]).n[0] == server.cells_per_smear


def test_failed_run_is_recorded_by_the_run_failure_sensor(dagster_server: DagsterServer) -> None:
    import dagster as dg

    server = dagster_server
    missing = "S" + "0" * 19 + "f"
    with dg.DagsterInstance.from_config(str(server.dagster_home)) as instance:
        instance.add_dynamic_partitions("smears", [missing])
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=server.port)
    run_id = client.submit_job_execution("import_smears", repository_location_name=LOCATION, tags={"dagster/partition": missing})

    def recorded():
        status = client.get_run_status(run_id).value
        if status == "SUCCESS":
            raise AssertionError("an import of a smear with no inbox folder succeeded")
        rows = Warehouse(server.warehouse).query("select * from run_failures where run_id = ?", [run_id])
        return rows.to_dict("records")

    [row] = _wait_until(recorded, RUN_TIMEOUT_S, "the run-failure sensor to record the failed run", server)
    assert row["partition_key"] == missing and row["job_name"] == "import_smears"
    assert "no folder in the inbox or its archive pseudonymises" in row["message"]


def test_asset_graph_renders_in_headless_chromium(dagster_server: DagsterServer, tmp_path: Path) -> None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = f"Debian chromium/chromium-driver not installed ({CHROMIUM}, {CHROMEDRIVER}); `.ci/run` installs them"
        if os.environ.get("HEMA_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1600,2000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    artifacts = Path(os.environ.get("HEMA_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)

    def page_text() -> str:
        return driver.execute_script("return document.body ? document.body.innerText : ''")

    def dismiss_welcome_dialog() -> None:
        # A fresh instance greets the first visitor with a newsletter dialog over the graph.
        driver.execute_script(
            "for (const b of document.querySelectorAll('button')) { if (b.innerText.trim() === 'Skip') b.click(); }"
        )

    def shows(url: str, names: tuple[str, ...], screenshot: str) -> None:
        driver.get(url)

        def rendered() -> bool:
            dismiss_welcome_dialog()
            text = page_text()
            return all(name in text for name in names)

        try:
            _wait_until(rendered, 120, f"{url} to render {names}", dagster_server, interval_s=1.0)
        finally:
            driver.save_screenshot(str(artifacts / screenshot))

    try:
        # The global lineage graph: one node per asset group, in pipeline order.
        shows(f"{dagster_server.url}/asset-groups", ("ingest", "quality", "datasets", "models", "predictions"), "asset-graph.png")
        # Each group's graph: its assets as nodes.
        for group, names in GROUP_ASSETS.items():
            shows(f"{dagster_server.url}/locations/{LOCATION}/asset-groups/{group}", names, f"asset-graph-{group}.png")
        assert "Error" not in driver.title
    finally:
        driver.quit()
    for name in ("asset-graph.png", *(f"asset-graph-{group}.png" for group in GROUP_ASSETS)):
        assert (artifacts / name).stat().st_size > 10_000, f"{name} is blank"
