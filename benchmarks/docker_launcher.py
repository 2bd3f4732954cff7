"""Docker launcher benchmark (issue 17): one container per run, on the images built from deploy/Dockerfile.

    .venv/bin/python benchmarks/docker_launcher.py --out /tmp/docker_launcher.json [--smears 6] [--cells 40]
        [--ingest-image hema-ingest:bench] [--ml-image hema-ml:bench] [--runs 4]

What runs where, as on the cluster but with Docker in place of Kubernetes:

- the two code locations, each a gRPC server in its own container from its own image (``ingest`` without
  TensorFlow, ``ml`` with it: ``docker build -f deploy/Dockerfile --target ingest|ml``), on 127.0.0.1;
- the daemon on this machine, with Dagster's instance on PostgreSQL (psycopg2 scheme, as deploy/ writes
  it) and ``dagster_docker.DockerRunLauncher`` as the run launcher: every run it dequeues becomes a new
  container of the image its code location reported (``DAGSTER_CURRENT_IMAGE``), which exits when the
  run ends;
- the warehouse on PostgreSQL; the inbox, lake and quarantine in one folder mounted into every container
  at the same path (on the cluster: S3).

A pbc8 champion is trained first in this process (one short epoch: its quality is not measured). Then
``--smears`` exports are dropped into the inbox; the inbox sensor (ingest location) requests an import
run per smear, and the prediction automation (ml location) requests prediction runs. Measured: runs and
containers (one each, every run successful), the time from a run's container being created to the run
starting (the price of a container per run), run durations, and inbox-to-predictions latency.

Needs: a Docker daemon (here ``dockerd --bridge=none --iptables=false``: containers use ``--network
host``), the two images (each with ``dagster-docker`` added: the run worker rebuilds the instance,
run launcher included, from its configuration; this script adds it on top of the given images), and
``dagster-docker`` in this virtual environment at the version of the other Dagster libraries. Not in
``make test``: CI has no Docker daemon, and building the ml image downloads TensorFlow.
Prints a Markdown table and writes every figure to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dagster as dg  # noqa: E402
import yaml  # noqa: E402
from dagster_docker.docker_run_launcher import DOCKER_CONTAINER_ID_TAG, DOCKER_IMAGE_TAG  # noqa: E402

from hema_pipeline.defs.handles import HandleIOManager  # noqa: E402
from hema_pipeline.defs.ingest import DUCKDB_WRITER_POOL  # noqa: E402
from hema_pipeline.defs.resources import StorageResource, WarehouseResource  # noqa: E402
from hema_pipeline.export.format import METADATA_FILE_NAME  # noqa: E402
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export  # noqa: E402
from hema_pipeline.storage.warehouse import Warehouse  # noqa: E402
from hema_pipeline_tests.conftest import TEST_KEY_HEX  # noqa: E402
from hema_pipeline_tests.postgres_server import create_database, dagster_instance_storage, running_postgres  # noqa: E402
from hema_pipeline_tests.support import TEST_KEY  # noqa: E402
from hema_pipeline_tests.test_ui import train_a_champion_before_start  # noqa: E402

RUN_IMAGE_SUFFIX = "-runs"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _docker(*arguments: str, stdin: str | None = None) -> str:
    completed = subprocess.run(["docker", *arguments], input=stdin, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"docker {' '.join(arguments[:3])} failed: {completed.stderr[-2000:]}")
    return completed.stdout.strip()


def _with_dagster_docker(image: str) -> str:
    """``image`` plus dagster-docker at this environment's version: the run worker in the container
    rebuilds the instance (its run launcher included) from the configuration it is given."""
    from importlib.metadata import version

    tag = f"{image.split(':')[0]}{RUN_IMAGE_SUFFIX}:{image.split(':')[1] if ':' in image else 'latest'}"
    dockerfile = (
        f"FROM {image}\nUSER root\n"
        f'RUN uv pip install --no-cache -p /opt/hema/venv/bin/python "dagster-docker=={version("dagster-docker")}"\n'
        "USER 10001\n"
    )
    _docker("build", "--network", "host", "-q", "-t", tag, "-", stdin=dockerfile)
    return tag


def _wait_for_port(port: int, container: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if _docker("inspect", "-f", "{{.State.Running}}", container) != "true":
            raise RuntimeError(f"code server {container} exited:\n{_docker('logs', '--tail', '40', container)}")
        time.sleep(1.0)
    raise RuntimeError(f"code server {container} did not listen on {port} within {timeout_s:.0f} s")


def _upload(inbox: Path, folder: Path) -> None:
    """Every image first, ``smear.json`` last, as an analyser's export job writes a folder."""
    target = inbox / folder.name
    target.mkdir()
    for path in sorted(folder.iterdir(), key=lambda item: item.name == METADATA_FILE_NAME):
        shutil.copyfile(path, target / path.name)


def _percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(round(share * (len(values) - 1))))]


def _parse_docker_time(value: str) -> dt.datetime:
    # Docker writes nanoseconds; keep microseconds.
    head, _, rest = value.rstrip("Z").partition(".")
    return dt.datetime.fromisoformat(f"{head}.{(rest + '000000')[:6]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smears", type=int, default=6)
    parser.add_argument("--cells", type=int, default=40)
    parser.add_argument("--runs", type=int, default=4, help="max concurrent runs")
    parser.add_argument("--ingest-image", default="hema-ingest:bench")
    parser.add_argument("--ml-image", default="hema-ml:bench")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Containers run as uid 10001 and write into folders this process creates.
    os.umask(0)
    started_at = time.perf_counter()
    images = {"ingest": _with_dagster_docker(args.ingest_image), "ml": _with_dagster_docker(args.ml_image)}
    figures: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "docker": _docker("version", "-f", "{{.Server.Version}}"),
        "images": images,
        "image_sizes_mb": {
            location: round(int(_docker("image", "inspect", "-f", "{{.Size}}", image)) / 1e6)
            for location, image in images.items()
        },
        "smears": args.smears,
        "cells_per_smear": args.cells,
        "max_concurrent_runs": args.runs,
        "run_image_build_seconds": time.perf_counter() - started_at,  # adding dagster-docker (cached after the first)
    }
    label = f"hema-bench-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="hema-docker-", dir="/tmp"))
    work.chmod(0o777)  # mkdtemp makes it 0700: the containers' user must reach the folders inside
    code_servers: list[str] = []
    daemon = None
    try:
        with running_postgres() as server:
            home, dagster_home = work / "home", work / "dagster_home"
            for folder in (home, dagster_home, work / "inbox", work / "lake", work / "quarantine"):
                folder.mkdir(parents=True)
            warehouse_url = create_database(server, f"hema_{uuid.uuid4().hex[:8]}")
            settings = {
                "HEMA_HOME": str(home),
                "HEMA_WAREHOUSE": warehouse_url,
                "HEMA_INBOX": str(work / "inbox"),
                "HEMA_LAKE": str(work / "lake"),
                "HEMA_QUARANTINE": str(work / "quarantine"),
                "HEMA_PSEUDONYM_KEY": TEST_KEY_HEX,
                "HEMA_INBOX_SETTLE_SECONDS": "0",
                "HEMA_INBOX_SENSOR_INTERVAL_SECONDS": "5",
                "HEMA_PREDICTION_SENSOR_INTERVAL_SECONDS": "5",
                "HEMA_FAILURE_SENSOR_INTERVAL_SECONDS": "5",
                "HEMA_RETRAIN_SENSOR_INTERVAL_SECONDS": "3600",
                "GX_ANALYTICS_ENABLED": "false",
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "DAGSTER_HOME": str(dagster_home),
            }
            config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
            config["storage"] = dagster_instance_storage(create_database(server, f"dagster_{uuid.uuid4().hex[:8]}"))
            config["concurrency"]["runs"]["max_concurrent_runs"] = args.runs
            config["run_launcher"] = {
                "module": "dagster_docker",
                "class": "DockerRunLauncher",
                "config": {
                    "network": "host",
                    "env_vars": [f"{name}={value}" for name, value in settings.items()],
                    "container_kwargs": {
                        "volumes": {str(work): {"bind": str(work), "mode": "rw"}},
                        "labels": {"hema-bench": label},
                    },
                },
            }
            (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config))
            with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
                instance.event_log_storage.set_concurrency_slots(DUCKDB_WRITER_POOL, args.runs)

            started = time.perf_counter()
            os.environ.update(settings)
            train_a_champion_before_start(
                home,
                dagster_home,
                {
                    "storage": StorageResource(lake_url=settings["HEMA_LAKE"], quarantine_url=settings["HEMA_QUARANTINE"]),
                    "warehouse": WarehouseResource(path=warehouse_url),
                    "io_manager": HandleIOManager(lake_url=settings["HEMA_LAKE"]),
                },
            )
            figures["champion_seconds"] = time.perf_counter() - started
            print(f"champion trained in {figures['champion_seconds']:.0f} s", flush=True)

            workspace = []
            for location, image in images.items():
                port = _free_port()
                name = f"{label}-{location}-code"
                environment = [f"--env={key}={value}" for key, value in settings.items()]
                environment += [f"--env=HEMA_CODE_LOCATION={location}", f"--env=DAGSTER_CURRENT_IMAGE={image}"]
                _docker(
                    "run", "-d", "--name", name, "--network", "host", f"--volume={work}:{work}", *environment, image,
                    "dagster", "api", "grpc", "-h", "127.0.0.1", "-p", str(port), "-m", "hema_pipeline.defs.definitions",
                )  # fmt: skip
                code_servers.append(name)
                _wait_for_port(port, name)
                workspace.append({"grpc_server": {"host": "127.0.0.1", "port": port, "location_name": location}})
            (work / "workspace.yaml").write_text(yaml.safe_dump({"load_from": workspace}))

            log = (work / "daemon.log").open("wb")
            daemon = subprocess.Popen(
                [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(work / "workspace.yaml")],
                env={**os.environ, **settings},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            export = generate_export(
                work / "analyser", SyntheticExportSpec(smears=args.smears, cells_per_smear=args.cells, seed=211)
            )
            smear_ids = [TEST_KEY.smear_id(smear.folder.name) for smear in export.smears]
            uploaded: dict[str, dt.datetime] = {}
            for smear, smear_id in zip(export.smears, smear_ids, strict=True):
                _upload(work / "inbox", smear.folder)
                uploaded[smear_id] = dt.datetime.now(dt.UTC).replace(tzinfo=None)

            warehouse = Warehouse(warehouse_url)
            placeholders = ", ".join("?" for _ in smear_ids)
            deadline = time.monotonic() + args.timeout
            while True:
                predicted = warehouse.query(
                    f"select smear_id, min(predicted_at) as at from predictions where task = 'pbc8' "
                    f"and smear_id in ({placeholders}) group by smear_id",
                    smear_ids,
                )
                if len(predicted) == len(smear_ids):
                    break
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{len(predicted)} of {len(smear_ids)} smears predicted; daemon log:\n"
                        + (work / "daemon.log").read_text()[-4000:]
                    )
                time.sleep(2.0)
            latencies = sorted(
                (row.at.to_pydatetime() - uploaded[row.smear_id]).total_seconds() for row in predicted.itertuples()
            )

            with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
                # Runs still finishing (a report after the predictions) are waited for.
                while (
                    any(
                        run.status not in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
                        for run in instance.get_runs()
                    )
                    and time.monotonic() < deadline
                ):
                    time.sleep(2.0)
                runs = [run for run in instance.get_runs() if run.tags.get(DOCKER_CONTAINER_ID_TAG)]
                records = {record.dagster_run.run_id: record for record in instance.get_run_records()}
            container_ids = set(_docker("ps", "-aq", "--no-trunc", "--filter", f"label=hema-bench={label}").split())
            if not runs:
                raise RuntimeError("no run was launched in a container: see the daemon log")
            start_overheads, durations = [], []
            for run in runs:
                created = _parse_docker_time(_docker("inspect", "-f", "{{.Created}}", run.tags[DOCKER_CONTAINER_ID_TAG]))
                record = records[run.run_id]
                if record.start_time and record.end_time:
                    start = dt.datetime.fromtimestamp(record.start_time, dt.UTC).replace(tzinfo=None)
                    start_overheads.append((start - created).total_seconds())
                    durations.append(record.end_time - record.start_time)
            by_job: dict[str, dict[str, int]] = {}
            for run in runs:
                by_job.setdefault(run.job_name, {}).setdefault(run.status.value, 0)
                by_job[run.job_name][run.status.value] += 1
            figures.update(
                {
                    "runs_by_job_and_status": by_job,
                    "runs_in_containers": len(runs),
                    "containers": len(container_ids),
                    "one_container_per_run": len(container_ids) == len(runs)
                    and {run.tags[DOCKER_CONTAINER_ID_TAG] for run in runs} == container_ids,
                    "images_used": sorted({run.tags.get(DOCKER_IMAGE_TAG, "") for run in runs}),
                    "container_created_to_run_start_seconds_median": statistics.median(start_overheads or [math.nan]),
                    "container_created_to_run_start_seconds_max": max(start_overheads or [math.nan]),
                    "run_seconds_median": statistics.median(durations or [math.nan]),
                    "latency_seconds": latencies,
                    "latency_median_seconds": statistics.median(latencies),
                    "latency_p95_seconds": _percentile(latencies, 0.95),
                }
            )
    finally:
        if daemon is not None:
            os.killpg(daemon.pid, 15)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, 9)
            shutil.copyfile(work / "daemon.log", args.out.with_suffix(".daemon.log"))
        leftover = _docker("ps", "-aq", "--filter", f"label=hema-bench={label}").split()
        for container in [*code_servers, *leftover]:
            subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(figures, indent=2, default=str))
    print("\n| figure | value |\n|---|---:|")
    print(f"| runs launched in containers / containers / every run in its own | {figures['runs_in_containers']} / {figures['containers']} / {figures['one_container_per_run']} |")  # fmt: skip
    print(f"| runs by job and status | {json.dumps(figures['runs_by_job_and_status'])} |")
    print(f"| container created → run started, median / max | {figures['container_created_to_run_start_seconds_median']:.1f} s / {figures['container_created_to_run_start_seconds_max']:.1f} s |")  # fmt: skip
    print(f"| run duration, median | {figures['run_seconds_median']:.1f} s |")
    print(f"| {args.smears} smears: inbox → predictions, median / p95 | {figures['latency_median_seconds']:.0f} s / {figures['latency_p95_seconds']:.0f} s |")  # fmt: skip
    print(f"| image sizes (MB) | {figures['image_sizes_mb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
