"""Import throughput (cells/s) beside a plain PIL decode-only loop over the same files, in one run.

    .venv/bin/python benchmarks/import_throughput.py [--synthetic-smears 20] [--pbc-cells 2000]

The figure is the ratio import / decode-only (goal >= 0.5). The import does everything the Dagster
asset does for a smear (parse, anonymise, validate and strip each JPEG, hash, store, DuckDB upsert,
Parquet); the Dagster run around it (~1 s per run) is reported separately.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

from hema_pipeline.anonymise.pseudonymise import PseudonymKey
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.ingest.inbox import Inbox
from hema_pipeline.ingest.smear_import import ImportTargets, import_smear
from hema_pipeline.settings import shared_data_dir
from hema_pipeline.storage.object_store import LocalObjectStore
from hema_pipeline.storage.warehouse import Warehouse


def decode_only(files: list[Path]) -> float:
    started = time.perf_counter()
    for path in files:
        with Image.open(path) as image:
            image.load()
    return len(files) / (time.perf_counter() - started)


def import_all(inbox_dir: Path, work: Path) -> tuple[float, int]:
    key = PseudonymKey(os.urandom(32))
    inbox = Inbox(LocalObjectStore(inbox_dir), settle_seconds=0)
    targets = ImportTargets(LocalObjectStore(work / "lake"), LocalObjectStore(work / "quarantine"), Warehouse(work / "w.duckdb"))
    smears = inbox.ready_smears()
    started = time.perf_counter()
    cells = sum(import_smear(inbox.store, smear, key, targets).cells_imported for smear in smears)
    return cells / (time.perf_counter() - started), cells


def measure(name: str, inbox_dir: Path, work: Path) -> dict[str, object]:
    files = sorted(inbox_dir.rglob("*.jpg"))
    decode_only(files[:50])  # warm the page cache for both loops alike
    decode_rate = decode_only(files)
    import_rate, cells = import_all(inbox_dir, work)
    return {"set": name, "cells": cells, "import": import_rate, "decode": decode_rate, "ratio": import_rate / decode_rate}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--synthetic-smears", type=int, default=20)
    parser.add_argument("--cells-per-smear", type=int, default=100)
    parser.add_argument("--pbc-cells", type=int, default=2000, help="0 skips the PBC measurement")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        generate_export(
            root / "synthetic", SyntheticExportSpec(smears=args.synthetic_smears, cells_per_smear=args.cells_per_smear, seed=7)
        )
        rows.append(measure("synthetic", root / "synthetic", root / "work-synthetic"))
        pbc = shared_data_dir() / "pbc"
        if args.pbc_cells and pbc.is_dir():
            from hema_pipeline.export.pbc import PbcExportSpec, export_pbc_as_smears

            export_pbc_as_smears(
                pbc, root / "pbc", PbcExportSpec(cells_per_smear=args.cells_per_smear, max_per_class=args.pbc_cells // 8, seed=7)
            )
            rows.append(measure("PBC pseudo-smears", root / "pbc", root / "work-pbc"))
        elif args.pbc_cells:
            print(f"(PBC images not found at {pbc}: PBC row skipped)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| set | cells | import cells/s | PIL decode-only cells/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['set']} | {row['cells']} | {row['import']:.0f} | {row['decode']:.0f} | {row['ratio']:.2f} |")


if __name__ == "__main__":
    main()
