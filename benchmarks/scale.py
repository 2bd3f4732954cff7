"""Scale benchmark (issue 17): what the network-scale configuration sustains on this machine.

    .venv/bin/python benchmarks/scale.py --out /tmp/scale.json [--smears 200] [--workers 4]
        [--inbox-sizes 1000,10000,50000]

Measured, each the project's real code path:

1. **Warehouse upserts per second, per backend**: ``storage.warehouse.replace_rows`` of prediction rows
   (100 per smear, one transaction per smear, as the prediction asset writes them) into a DuckDB file and
   into PostgreSQL; for PostgreSQL also from ``--workers`` processes at once (DuckDB takes one writer).
2. **Smears per hour through the import** (``ingest.smear_import.import_smear``: parse, pseudonymise,
   strip and verify every JPEG, store, upsert, Parquet) from ``--workers`` processes into PostgreSQL,
   with the inbox and the lake on the local disk; per-smear latency median and p95.
3. **Inbox sensor tick against inbox size**: ``defs.ingest.plan_imports`` (what ``inbox_sensor`` runs each
   tick) over an inbox of N smear folders, all already imported (so the tick finds nothing new: the cost
   of history alone), as it is without an archive (``HEMA_INBOX_ARCHIVE`` unset).
4. **The same history in the archive**: N smears archived (``HEMA_INBOX_ARCHIVE``), 50 new folders in the
   inbox: the tick that requests the 50, and ``Inbox.locate`` of one archived smear (a re-run).

A PostgreSQL server is started on 127.0.0.1 for the run (Debian's postgresql; fsync off, as in the
tests: the figures are the pipeline's cost, not a durable server's). Prints a Markdown table and writes
every figure to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export  # noqa: E402
from hema_pipeline.storage.warehouse import Warehouse, replace_rows  # noqa: E402
from hema_pipeline_tests.postgres_server import create_database, running_postgres  # noqa: E402
from hema_pipeline_tests.support import TEST_KEY  # noqa: E402

CELLS_PER_SMEAR = 100


def _prediction_rows(smear_id: str) -> pd.DataFrame:
    classes = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
    return pd.DataFrame(
        {
            "smear_id": smear_id,
            "cell_uid": [f"{smear_id}:{index}" for index in range(CELLS_PER_SMEAR)],
            "model_version": "pbc8-benchmark",
            "task": "pbc8",
            "predicted_class": [classes[index % 4] for index in range(CELLS_PER_SMEAR)],
            "confidence": 0.97,
            "probabilities": json.dumps({name: 0.25 for name in classes}),
            "energy": -6.0,
            "ood_score": -6.0,
            "accepted": True,
            "referral_reason": None,
            "gradcam_key": None,
            "predicted_at": dt.datetime(2026, 12, 7, 3, 0),
            "prediction_run_id": "bench",
        }
    )


def _upsert_smears(location: str, smear_ids: list[str]) -> tuple[float, float]:
    """(start, end) wall-clock times of the writes alone (process start and imports excluded)."""
    warehouse = Warehouse(location)
    frames = [_prediction_rows(smear_id) for smear_id in smear_ids]
    with warehouse.connect():
        pass  # the schema, outside the timing
    started = time.time()
    for smear_id, frame in zip(smear_ids, frames, strict=True):
        with warehouse.transaction(serialise_on=f"smear:{smear_id}") as connection:
            replace_rows(connection, "predictions", frame, ["smear_id", "cell_uid", "model_version"])
    return started, time.time()


def _span(intervals: list[tuple[float, float]]) -> float:
    return max(end for _, end in intervals) - min(start for start, _ in intervals)


def measure_upserts(server: str, smears: int, workers: int, work: Path) -> dict:
    ids = [f"S{index:020d}" for index in range(smears)]
    rows = smears * CELLS_PER_SMEAR
    duckdb_seconds = _span([_upsert_smears(str(work / "upserts.duckdb"), ids)])
    postgres = create_database(server, f"bench_{uuid.uuid4().hex[:8]}")
    postgres_seconds = _span([_upsert_smears(postgres, ids)])
    again_seconds = _span([_upsert_smears(postgres, ids)])  # the same keys again: updates, no new rows
    concurrent = create_database(server, f"bench_{uuid.uuid4().hex[:8]}")
    Warehouse(concurrent).query("select 1")
    shares = [ids[index::workers] for index in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        concurrent_seconds = _span(pool.starmap(_upsert_smears, [(concurrent, share) for share in shares]))
    counted = Warehouse(concurrent).query("select count(*) as n from predictions").n[0]
    assert counted == rows, (counted, rows)
    return {
        "rows": rows,
        "duckdb_rows_per_second": rows / duckdb_seconds,
        "postgres_rows_per_second": rows / postgres_seconds,
        "postgres_rows_per_second_updating": rows / again_seconds,
        f"postgres_rows_per_second_{workers}_processes": rows / concurrent_seconds,
    }


def _import_share(location: str, root: str, folders: list[str]) -> tuple[float, float, list[float]]:
    from hema_pipeline.ingest.inbox import Inbox
    from hema_pipeline.ingest.smear_import import ImportTargets, import_smear
    from hema_pipeline.storage.object_store import LocalObjectStore

    base = Path(root)
    inbox = Inbox(LocalObjectStore(base / "inbox"), settle_seconds=0)
    targets = ImportTargets(LocalObjectStore(base / "lake"), LocalObjectStore(base / "quarantine"), Warehouse(location))
    by_folder = {smear.folder: smear for smear in inbox.smears()}
    latencies = []
    began = time.time()
    for folder in folders:
        started = time.perf_counter()
        import_smear(inbox.store, by_folder[folder], TEST_KEY, targets)
        latencies.append(time.perf_counter() - started)
    return began, time.time(), latencies


def measure_imports(server: str, smears: int, workers: int, work: Path) -> dict:
    root = work / "imports"
    export = generate_export(root / "inbox", SyntheticExportSpec(smears=smears, cells_per_smear=CELLS_PER_SMEAR, seed=7))
    folders = sorted(smear.folder.name for smear in export.smears)
    location = create_database(server, f"bench_{uuid.uuid4().hex[:8]}")
    Warehouse(location).query("select 1")
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.starmap(_import_share, [(location, str(root), folders[i::workers]) for i in range(workers)])
    seconds = _span([(began, ended) for began, ended, _ in parts])
    latencies = [value for _, _, part in parts for value in part]
    cells = Warehouse(location).query("select count(*) as n from cells").n[0]
    assert cells == smears * CELLS_PER_SMEAR, cells
    latencies.sort()
    return {
        "smears": smears,
        "workers": workers,
        "seconds": seconds,
        "smears_per_hour": smears / seconds * 3600,
        "latency_median_seconds": statistics.median(latencies),
        "latency_p95_seconds": latencies[int(0.95 * (len(latencies) - 1))],
    }


def measure_sensor_ticks(sizes: list[int], work: Path) -> list[dict]:
    from hema_pipeline.defs.ingest import plan_imports
    from hema_pipeline.ingest.inbox import Inbox
    from hema_pipeline.storage.object_store import LocalObjectStore

    results = []
    root = work / "inbox-sizes"
    made = 0
    metadata = json.dumps({"accession": "x", "cells": []})
    for size in sorted(sizes):
        for index in range(made, size):
            folder = root / f"ACC-{index:07d}"
            folder.mkdir(parents=True)
            (folder / "smear.json").write_text(metadata)
            (folder / "cell_001.jpg").write_bytes(b"\xff\xd8\xff\xd9")
        made = size
        inbox = Inbox(LocalObjectStore(root), settle_seconds=0)
        known = {TEST_KEY.smear_id(f"ACC-{index:07d}") for index in range(size)}
        started = time.perf_counter()
        plan = plan_imports(inbox, TEST_KEY, known, newer_than=time.time() + 60)
        seconds = time.perf_counter() - started
        assert not plan.run_requests
        results.append({"inbox_folders": size, "tick_seconds": seconds})
    return results


def measure_archived_history(sizes: list[int], work: Path, waiting: int = 50) -> list[dict]:
    from hema_pipeline.defs.ingest import plan_imports
    from hema_pipeline.ingest.inbox import Inbox
    from hema_pipeline.storage.object_store import LocalObjectStore

    results = []
    inbox_root, archive_root = work / "archiving-inbox", work / "archive"
    metadata = json.dumps({"accession": "x", "cells": []})

    def write_export(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "smear.json").write_text(metadata)
        (folder / "cell_001.jpg").write_bytes(b"\xff\xd8\xff\xd9")

    for index in range(waiting):
        write_export(inbox_root / f"NEW-{index:07d}")
    made = 0
    for size in sorted(sizes):
        for index in range(made, size):
            folder = f"ACC-{index:07d}"
            write_export(archive_root / TEST_KEY.smear_id(folder) / f"20261201T000000000000Z-{index:016x}" / folder)
        made = size
        inbox = Inbox(LocalObjectStore(inbox_root), settle_seconds=0, archive=LocalObjectStore(archive_root))
        started = time.perf_counter()
        plan = plan_imports(inbox, TEST_KEY, set())
        tick = time.perf_counter() - started
        assert len(plan.run_requests) == waiting
        started = time.perf_counter()
        located = inbox.locate(TEST_KEY.smear_id(f"ACC-{size // 2:07d}"), TEST_KEY)
        locate = time.perf_counter() - started
        assert located is not None and located.archived
        results.append(
            {"archived_smears": size, "waiting_folders": waiting, "tick_seconds": tick, "locate_archived_seconds": locate}
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smears", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--inbox-sizes", default="1000,10000,50000")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    figures: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    }
    with tempfile.TemporaryDirectory(prefix="hema-scale-") as folder, running_postgres() as server:
        work = Path(folder)
        figures["upserts"] = measure_upserts(server, args.smears, args.workers, work)
        print(json.dumps(figures["upserts"]), flush=True)
        figures["imports"] = measure_imports(server, args.smears, args.workers, work)
        print(json.dumps(figures["imports"]), flush=True)
        sizes = [int(size) for size in args.inbox_sizes.split(",")]
        figures["sensor_ticks"] = measure_sensor_ticks(sizes, work)
        print(json.dumps(figures["sensor_ticks"]), flush=True)
        figures["archived_history"] = measure_archived_history(sizes, work)
        print(json.dumps(figures["archived_history"]), flush=True)
    args.out.write_text(json.dumps(figures, indent=2))
    upserts, imports = figures["upserts"], figures["imports"]
    print("\n| figure | value |\n|---|---:|")
    for key, value in upserts.items():
        print(f"| upserts: {key} | {value:,.0f} |")
    print(f"| imports: smears/hour, {imports['workers']} processes | {imports['smears_per_hour']:,.0f} |")
    print(
        f"| imports: latency median / p95 (s) | {imports['latency_median_seconds']:.2f} / {imports['latency_p95_seconds']:.2f} |"
    )
    for tick in figures["sensor_ticks"]:
        print(f"| inbox sensor tick, {tick['inbox_folders']:,} folders (s) | {tick['tick_seconds']:.2f} |")
    for tick in figures["archived_history"]:
        print(
            f"| archive on, {tick['archived_smears']:,} archived + {tick['waiting_folders']} waiting: tick / locate one "
            f"archived (s) | {tick['tick_seconds']:.3f} / {tick['locate_archived_seconds']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
