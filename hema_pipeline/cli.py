"""The `hema` command line. Imports are lazy: `hema query` must not pay for TensorFlow."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from hema_pipeline.demo import run_demo

    return run_demo(use_pbc=args.pbc, smears=args.smears, cells_per_smear=args.cells, seed=args.seed)


def _generate(args: argparse.Namespace) -> int:
    from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export

    spec = SyntheticExportSpec(
        smears=args.smears,
        cells_per_smear=args.cells,
        seed=args.seed,
        dysplastic_smear_share=args.dysplastic_share,
        malignant_smear_share=args.malignant_share,
        verified_share=args.verified_share,
    )
    export = generate_export(Path(args.out), spec)
    print(f"wrote {len(export.smears)} smears to {export.root}")
    return 0


def _query(args: argparse.Namespace) -> int:
    """Lab SQL on a locked-down, read-only connection: no files, extensions or settings changes, and a
    missing warehouse is an error (never created)."""
    from hema_pipeline import settings
    from hema_pipeline.storage.warehouse import Warehouse, WarehouseBusy, WarehouseMissing

    import duckdb
    import pandas as pd

    warehouse = Warehouse(args.warehouse or settings.warehouse_path())
    try:
        frame = warehouse.query_locked_down(args.sql)
    except WarehouseMissing as error:
        print(f"hema query: {error}; check --warehouse / HEMA_WAREHOUSE (nothing was created)", file=sys.stderr)
        return 2
    except WarehouseBusy as error:
        print(f"hema query: {error}; try again when the run has finished", file=sys.stderr)
        return 1
    except duckdb.Error as error:
        print(f"hema query: {error}", file=sys.stderr)
        return 1
    if args.csv:
        frame.to_csv(sys.stdout, index=False)
    else:
        with pd.option_context("display.max_rows", args.max_rows, "display.max_columns", None, "display.width", 200):
            print(frame.to_string(index=False))
    return 0


def _classify(args: argparse.Namespace) -> int:
    from hema_pipeline import settings
    from hema_pipeline.inference.classify import classify_files, collect_image_files
    from hema_pipeline.inference.predict import CellClassifier
    from hema_pipeline.modeling.registry import load_model
    from hema_pipeline.storage.object_store import open_object_store
    from hema_pipeline.storage.warehouse import Warehouse

    if not args.file and not args.directory:
        print("hema classify: give -f FILE or -d DIRECTORY", file=sys.stderr)
        return 2
    paths = collect_image_files(args.file or (), args.directory or (), recursive=args.recursive)
    if not paths:
        print("hema classify: no image files found", file=sys.stderr)
        return 2
    warehouse = Warehouse(args.warehouse or settings.warehouse_path())
    if not warehouse.path.is_file():
        # Opening a mistyped path would create an empty warehouse beside the real one.
        print(f"hema classify: no warehouse at {warehouse.path} (check --warehouse or HEMA_WAREHOUSE)", file=sys.stderr)
        return 2
    lake = open_object_store(settings.lake_url(), endpoint_url=settings.s3_endpoint_url() or None)
    try:
        loaded = load_model(lake, warehouse, args.task, args.model)
    except (KeyError, LookupError, ValueError) as error:
        print(f"hema classify: {error}", file=sys.stderr)
        return 2
    outcome = classify_files(paths, CellClassifier(loaded.model, loaded.card), args.output, progress=not args.quiet)
    print(
        f"classified {outcome.classified} of {len(paths)} images with {loaded.card.model_version} -> {args.output}",
        file=sys.stderr,
    )
    return 0 if outcome.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hema", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the main job end to end on the embedded default")
    demo.add_argument("--pbc", action="store_true", help="use the PBC images in HEMA_SHARED_DATA instead of synthetic smears")
    demo.add_argument("--smears", type=int, default=12)
    demo.add_argument("--cells", type=int, default=100, help="cells per smear")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo)

    generate = commands.add_parser("generate", help="write a synthetic CellaVision-style export (fake patients)")
    generate.add_argument("out", help="folder to write the smear folders into (e.g. the inbox)")
    generate.add_argument("--smears", type=int, default=6)
    generate.add_argument("--cells", type=int, default=100, help="cells per smear")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--dysplastic-share", type=float, default=0.0, help="share of smears generated dysplastic")
    generate.add_argument("--malignant-share", type=float, default=0.0, help="share of smears with blasts")
    generate.add_argument("--verified-share", type=float, default=1.0, help="share of cells with a verified class")
    generate.set_defaults(handler=_generate)

    classify = commands.add_parser("classify", help="classify cell images with a registered model, to CSV")
    classify.add_argument("-f", "--file", action="append", help="an image file (repeatable)")
    classify.add_argument("-d", "--directory", action="append", help="a folder of images (repeatable)")
    classify.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders of -d")
    classify.add_argument("-o", "--output", required=True, help="CSV to write")
    classify.add_argument("--task", default="pbc8", help="the task whose model classifies (default: pbc8)")
    classify.add_argument("--model", help="a model version (default: the task's champion)")
    classify.add_argument("--warehouse", help="DuckDB file (default: HEMA_WAREHOUSE or .hema/warehouse.duckdb)")
    classify.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    classify.set_defaults(handler=_classify)

    query = commands.add_parser(
        "query",
        help="run SQL against the warehouse (read-only; no file, extension or settings access)",
    )
    query.add_argument("sql")
    query.add_argument("--warehouse", help="DuckDB file (default: HEMA_WAREHOUSE or .hema/warehouse.duckdb)")
    query.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    query.add_argument("--max-rows", type=int, default=200)
    query.set_defaults(handler=_query)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
