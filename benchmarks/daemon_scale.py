"""Daemon benchmark (issue 17): smears through the real daemon on the network-scale storage.

    .venv/bin/python benchmarks/daemon_scale.py --out /tmp/daemon_scale.json [--trickle 6] [--gap 30]
        [--burst 40] [--cells 100] [--runs 4]

`dagster dev` (webserver, daemon, run workers as subprocesses) with Dagster's instance on PostgreSQL
(psycopg2 scheme, as deploy/ configures it), compute logs on S3, the warehouse on PostgreSQL, and the
inbox, its archive, the lake and the quarantine on S3 (moto_server on 127.0.0.1). A pbc8 champion is
trained first (one short epoch: the model's quality is not what is measured). Then:

1. **Trickle**: ``--trickle`` smears uploaded one every ``--gap`` seconds; for each, the latency from the
   end of its upload (its ``smear.json`` written last, as an analyser's export job does) to its
   predictions in the warehouse: the inbox sensor tick, the import run, the automation tick, the
   prediction run.
2. **Burst**: ``--burst`` smears uploaded at once; smears per hour from the end of the upload to the last
   smear's predictions with at most ``--runs`` concurrent runs, each smear's latency, and how many
   prediction runs the burst took (batched by the prediction asset's BackfillPolicy).

The inbox sensor and the prediction automation sensor tick every ``--sensor-interval`` seconds (30, the
production default; the tick interval also decides how many newly imported smears one prediction run
takes).
Prints a Markdown table and writes every figure to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
import dagster as dg  # noqa: E402
import yaml  # noqa: E402

from hema_pipeline.defs.handles import HandleIOManager  # noqa: E402
from hema_pipeline.defs.ingest import DUCKDB_WRITER_POOL  # noqa: E402
from hema_pipeline.defs.resources import StorageResource, WarehouseResource  # noqa: E402
from hema_pipeline.export.format import METADATA_FILE_NAME  # noqa: E402
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export  # noqa: E402
from hema_pipeline.storage.object_store import open_object_store  # noqa: E402
from hema_pipeline.storage.warehouse import Warehouse  # noqa: E402
from hema_pipeline_tests.postgres_server import (  # noqa: E402
    create_database,
    dagster_instance_storage,
    running_postgres,
    s3_compute_logs,
)
from hema_pipeline_tests.s3_server import running_s3_server  # noqa: E402
from hema_pipeline_tests.support import TEST_KEY  # noqa: E402
from hema_pipeline_tests.test_ui import (  # noqa: E402
    REPO,
    dagster_dev_environment,
    running_dagster_dev,
    train_a_champion_before_start,
)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _upload(store, folder: Path) -> None:
    """Every image first, ``smear.json`` last: the folder is ready for the sensor only when complete."""
    for path in sorted(folder.iterdir(), key=lambda item: item.name == METADATA_FILE_NAME):
        store.put_bytes(f"{folder.name}/{path.name}", path.read_bytes())


def _first_predictions(warehouse: Warehouse, smear_ids: list[str]) -> dict[str, tuple[dt.datetime, str]]:
    placeholders = ", ".join("?" for _ in smear_ids)
    frame = warehouse.query(
        f"select smear_id, min(predicted_at) as at, min(prediction_run_id) as run from predictions "
        f"where task = 'pbc8' and smear_id in ({placeholders}) group by smear_id",
        smear_ids,
    )
    return {row.smear_id: (row.at.to_pydatetime(), row.run) for row in frame.itertuples()}


def _wait_for_predictions(warehouse: Warehouse, smear_ids: list[str], timeout_s: float, server) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        done = _first_predictions(warehouse, smear_ids)
        if len(done) == len(smear_ids):
            return done
        failed = [run for job in ("import_smears", "__ASSET_JOB") for run in server.runs(job) if run["status"] == "FAILURE"]
        if failed:
            raise RuntimeError(f"{len(failed)} run(s) failed: {failed[:3]}\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(done)} of {len(smear_ids)} smears predicted after {timeout_s:.0f} s\n{server.log_tail()}")
        time.sleep(1.0)


def _latencies(uploaded: dict[str, dt.datetime], predicted: dict[str, tuple[dt.datetime, str]]) -> list[float]:
    return sorted((predicted[smear][0] - uploaded[smear]).total_seconds() for smear in uploaded)


def _percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(round(share * (len(values) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trickle", type=int, default=6)
    parser.add_argument("--gap", type=float, default=30.0)
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--cells", type=int, default=100)
    parser.add_argument("--runs", type=int, default=4, help="max concurrent runs (and writer pool slots)")
    parser.add_argument("--sensor-interval", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=2400.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    figures: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "cells_per_smear": args.cells,
        "max_concurrent_runs": args.runs,
        "sensor_interval_seconds": args.sensor_interval,
    }
    with (
        tempfile.TemporaryDirectory(prefix="hema-daemon-") as folder,
        running_postgres() as server,
        running_s3_server() as endpoint,
    ):
        home = Path(folder) / "hema"
        dagster_home = home / "dagster_home"
        dagster_home.mkdir(parents=True)
        bucket = f"hema-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        dagster_url = create_database(server, f"dagster_{uuid.uuid4().hex[:8]}")
        warehouse_url = create_database(server, f"hema_{uuid.uuid4().hex[:8]}")
        config = yaml.safe_load((REPO / "dagster.yaml").read_text())
        config["storage"] = dagster_instance_storage(dagster_url)
        config["compute_logs"] = s3_compute_logs(bucket, endpoint)
        config["concurrency"]["runs"]["max_concurrent_runs"] = args.runs
        (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config))
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            instance.event_log_storage.set_concurrency_slots(DUCKDB_WRITER_POOL, args.runs)
        urls = {name: f"s3://{bucket}/{name}" for name in ("inbox", "archive", "lake", "quarantine")}
        started = time.perf_counter()
        train_a_champion_before_start(
            home,
            dagster_home,
            {
                "storage": StorageResource(lake_url=urls["lake"], quarantine_url=urls["quarantine"], s3_endpoint_url=endpoint),
                "warehouse": WarehouseResource(path=warehouse_url),
                "io_manager": HandleIOManager(lake_url=urls["lake"], s3_endpoint_url=endpoint),
            },
        )
        figures["champion_seconds"] = time.perf_counter() - started
        print(f"champion trained in {figures['champion_seconds']:.0f} s", flush=True)

        total = args.trickle + args.burst
        export = generate_export(home / "analyser", SyntheticExportSpec(smears=total, cells_per_smear=args.cells, seed=171))
        smears = [(TEST_KEY.smear_id(smear.accession), smear.folder) for smear in export.smears]
        inbox = open_object_store(urls["inbox"], endpoint_url=endpoint)
        warehouse = Warehouse(warehouse_url)
        environment = dagster_dev_environment(
            home,
            dagster_home,
            HEMA_WAREHOUSE=warehouse_url,
            HEMA_INBOX=urls["inbox"],
            HEMA_INBOX_ARCHIVE=urls["archive"],
            HEMA_LAKE=urls["lake"],
            HEMA_QUARANTINE=urls["quarantine"],
            HEMA_S3_ENDPOINT_URL=endpoint,
            # Uploads write smear.json last; a folder without it waits (the production default).
            HEMA_INBOX_SETTLE_SECONDS="300",
            HEMA_INBOX_SENSOR_INTERVAL_SECONDS=str(args.sensor_interval),
            HEMA_PREDICTION_SENSOR_INTERVAL_SECONDS=str(args.sensor_interval),
        )
        with running_dagster_dev(home, dagster_home, environment, log_name="dagster-dev-daemon-scale.log") as dagster:
            trickle, burst = smears[: args.trickle], smears[args.trickle :]
            uploaded: dict[str, dt.datetime] = {}
            for index, (smear_id, path) in enumerate(trickle):
                _upload(inbox, path)
                uploaded[smear_id] = _utc_now()
                if index < len(trickle) - 1:
                    time.sleep(args.gap)
            done = _wait_for_predictions(warehouse, [smear for smear, _ in trickle], args.timeout, dagster)
            latencies = _latencies(uploaded, done)
            figures["trickle"] = {
                "smears": len(trickle),
                "gap_seconds": args.gap,
                "latency_seconds": latencies,
                "latency_median_seconds": statistics.median(latencies),
                "latency_p95_seconds": _percentile(latencies, 0.95),
            }
            print(json.dumps(figures["trickle"]), flush=True)

            if burst:
                imports_before = len(dagster.runs("import_smears"))
                for _, path in burst:
                    _upload(inbox, path)
                burst_uploaded = _utc_now()
                uploaded = {smear_id: burst_uploaded for smear_id, _ in burst}
                done = _wait_for_predictions(warehouse, [smear for smear, _ in burst], args.timeout, dagster)
                latencies = _latencies(uploaded, done)
                makespan = max(latencies)
                figures["burst"] = {
                    "smears": len(burst),
                    "makespan_seconds": makespan,
                    "smears_per_hour": len(burst) / makespan * 3600,
                    "latency_median_seconds": statistics.median(latencies),
                    "latency_p95_seconds": _percentile(latencies, 0.95),
                    "prediction_runs": len({run for _, run in done.values()}),
                    "import_runs": len(dagster.runs("import_smears")) - imports_before,
                }
                print(json.dumps(figures["burst"]), flush=True)
            figures["inbox_objects_left"] = sum(1 for _ in inbox.list())
            shutil.copyfile(dagster.log, args.out.with_suffix(".log"))
    args.out.write_text(json.dumps(figures, indent=2, default=str))
    trickle, burst = figures["trickle"], figures.get("burst")
    print("\n| figure | value |\n|---|---:|")
    print(
        f"| trickle ({trickle['smears']} smears, one every {trickle['gap_seconds']:.0f} s): upload → predictions, median / p95 | {trickle['latency_median_seconds']:.0f} s / {trickle['latency_p95_seconds']:.0f} s |"
    )
    if burst:
        print(
            f"| burst of {burst['smears']} smears, {args.runs} concurrent runs: smears per hour | {burst['smears_per_hour']:,.0f} |"
        )
        print(
            f"| burst: upload → predictions, median / p95 / last | {burst['latency_median_seconds']:.0f} s / "
            f"{burst['latency_p95_seconds']:.0f} s / {burst['makespan_seconds']:.0f} s |"
        )
        print(f"| burst: import runs / prediction runs | {burst['import_runs']} / {burst['prediction_runs']} |")
    print(f"| inbox objects left after the run (archive on) | {figures['inbox_objects_left']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
