"""The `hema` command line. Imports are lazy: `hema query` must not pay for TensorFlow."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

# TensorFlow's C++ start-up notices on a machine without a GPU: printed before its logging is configured,
# so TF_CPP_MIN_LOG_LEVEL cannot silence them, and nothing in them is for a lab user to act on.
_TENSORFLOW_STARTUP_NOTICE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|failed call to cuInit|cpu_feature_guard\.cc"
    r"|This TensorFlow binary is optimized|To enable the following instructions"
)


@contextlib.contextmanager
def _tensorflow_startup_notices_filtered() -> Iterator[None]:
    """Runs the block with the process's stderr passed through a filter, line by line as it is written,
    that drops the notices above: everything else (an error TensorFlow reports, a fatal message before an
    abort) reaches the terminal as it happens."""
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def relay() -> None:
        with os.fdopen(read_end, "rb") as source:
            for line in source:
                if not _TENSORFLOW_STARTUP_NOTICE.search(line.decode(errors="replace")):
                    os.write(terminal, line)

    relaying = threading.Thread(target=relay, name="stderr-filter", daemon=True)
    relaying.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # the pipe's last writer closes: the relay reads to its end and stops
        relaying.join(timeout=5)
        os.close(terminal)


def start_tensorflow_quietly() -> None:
    """Import TensorFlow and look for a GPU (when it reports on CUDA) with the start-up notices filtered."""
    with _tensorflow_startup_notices_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")


def _demo(args: argparse.Namespace) -> int:
    from hema_pipeline.demo import run_demo

    start_tensorflow_quietly()
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
    import pandas as pd

    from hema_pipeline import settings
    from hema_pipeline.storage.warehouse import (
        WAREHOUSE_ERRORS,
        Warehouse,
        WarehouseBusy,
        WarehouseMissing,
        WarehouseRoleTooPowerful,
    )

    warehouse = Warehouse(args.warehouse or settings.warehouse_path())
    try:
        frame = warehouse.query_locked_down(args.sql)
    except WarehouseMissing as error:
        print(f"hema query: {error}; check --warehouse / HEMA_WAREHOUSE (nothing was created)", file=sys.stderr)
        return 2
    except WarehouseRoleTooPowerful as error:
        print(f"hema query: {error}", file=sys.stderr)
        return 2
    except WarehouseBusy as error:
        print(f"hema query: {error}; try again when the run has finished", file=sys.stderr)
        return 1
    except WAREHOUSE_ERRORS as error:
        print(f"hema query: {error}", file=sys.stderr)
        return 1
    if args.csv:
        frame.to_csv(sys.stdout, index=False)
    else:
        with pd.option_context("display.max_rows", args.max_rows, "display.max_columns", None, "display.width", 200):
            print(frame.to_string(index=False))
    return 0


# What `hema models list` shows, in this order; columns an older warehouse lacks are left out.
MODEL_LIST_COLUMNS = (
    "task",
    "model_version",
    "champion",
    "status",
    "architecture",
    "input_size",
    "accuracy",
    "macro_f1",
    "ece_after",
    "referral_coverage",
    "referral_target",
    "referral_confidence",
    "referral_certified_accuracy",
    "dataset_version",
    "created_at",
)


def _thresholds(args: argparse.Namespace) -> int:
    """Smear-level thresholds for haematologists: ``fit`` records a new fit of the dysplastic-share
    threshold on labelled smears (the flag-thresholds asset then uses it), ``list`` reads the record."""
    import json

    from hema_pipeline import settings
    from hema_pipeline.inference.smear_thresholds import SmearLabelsError, describe, fit_dysplasia_threshold, read_smear_labels
    from hema_pipeline.storage.warehouse import WAREHOUSE_ERRORS, Warehouse, WarehouseBusy

    warehouse = Warehouse(args.warehouse or settings.warehouse_path())
    if not warehouse.exists():
        print(f"hema thresholds: no warehouse at {warehouse.description} (check --warehouse or HEMA_WAREHOUSE)", file=sys.stderr)
        return 2
    failures: tuple[type[Exception], ...] = (SmearLabelsError, ValueError, OSError, WarehouseBusy, *WAREHOUSE_ERRORS)
    try:
        if args.action == "list":
            table = warehouse.query("select * from smear_threshold_fits order by fitted_at desc, fit_id")
            print(table.to_string(index=False) if not table.empty else "no threshold has been fitted yet")
            return 0
        recorded = fit_dysplasia_threshold(warehouse, read_smear_labels(args.labels), args.reason, record=not args.dry_run)
    except failures as error:
        print(f"hema thresholds: {error}", file=sys.stderr)
        return 1
    fit = recorded.fit
    print(json.dumps(describe(recorded), indent=2))
    print(
        f"dysplasia_share_threshold {fit.threshold:.4f}: sensitivity {fit.sensitivity:.3f}, specificity "
        f"{fit.specificity:.3f}, AUC {fit.auc:.3f} on {fit.positive_smears} + {fit.negative_smears} smears; "
        + ("not recorded (--dry-run)" if args.dry_run else "recorded: materialise smear_flag_thresholds to use it"),
        file=sys.stderr,
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    """The model registry for operators: list and show read on a read-only connection (a missing
    warehouse is an error, never created); promote and rollback write the promotion log."""
    import json

    import pandas as pd

    from hema_pipeline import settings
    from hema_pipeline.storage.warehouse import WAREHOUSE_ERRORS, Warehouse, WarehouseBusy, WarehouseMissing

    busy_or_database_errors: tuple[type[Exception], ...] = (WarehouseBusy, *WAREHOUSE_ERRORS)
    warehouse = Warehouse(args.warehouse or settings.warehouse_path())
    if not warehouse.exists():
        print(f"hema models: no warehouse at {warehouse.description} (check --warehouse or HEMA_WAREHOUSE)", file=sys.stderr)
        return 2
    try:
        if args.action == "list":
            with warehouse.connect_existing() as connection:
                # `champion` comes from the promotion log (model_champions), the one definition of it; `status`
                # is each model's last recorded decision.
                models = connection.execute(
                    "select m.*, c.model_version is not null as champion from models m "
                    "left join model_champions c on c.model_version = m.model_version and c.task = m.task "
                    "order by m.task, m.created_at"
                ).df()
            if args.task:
                models = models[models["task"] == args.task]
            shown = models[[column for column in MODEL_LIST_COLUMNS if column in models.columns]]
            with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
                print(shown.to_string(index=False) if not shown.empty else "no models registered")
            return 0
        if args.action == "show":
            return _show_model(warehouse, args.model_version, as_json=args.json)
        from hema_pipeline.modeling.promotion import promote_by_operator, rollback

        if args.action == "promote":
            decision = promote_by_operator(warehouse, args.task, args.model_version, args.reason)
        else:
            if not args.reason.strip():
                raise ValueError("give a reason: it is recorded in the promotion log")
            decision = rollback(warehouse, args.task, reason=f"by operator: {args.reason.strip()}")
        print(
            json.dumps(
                {
                    "task": decision.task,
                    "action": decision.action,
                    "champion": decision.model_version,
                    "previous_champion": decision.previous_champion,
                    "reason": decision.reason,
                },
                indent=2,
            )
        )
        return 0
    except (LookupError, ValueError) as error:
        print(f"hema models: {error}", file=sys.stderr)
        return 1
    except WarehouseMissing as error:
        print(f"hema models: {error}", file=sys.stderr)
        return 2
    except busy_or_database_errors as error:
        print(f"hema models: {error}", file=sys.stderr)
        return 1


def _show_model(warehouse, model_version: str, as_json: bool) -> int:  # warehouse: storage.warehouse.Warehouse
    """A model's card, read from the lake and checked against the registry: what it is, where it came from,
    how it scored and what its referral threshold guarantees."""

    from hema_pipeline import settings
    from hema_pipeline.modeling.registry import read_card
    from hema_pipeline.storage.object_store import open_object_store

    with warehouse.connect_existing() as connection:
        rows = connection.execute(
            "select m.card_key, case when c.model_version is null then m.status else 'champion' end from models m "
            "left join model_champions c on c.model_version = m.model_version and c.task = m.task "
            "where m.model_version = ?",
            [model_version],
        ).fetchall()
        if not rows:
            raise LookupError(f"no model {model_version!r} is registered")
        [(card_key, status)] = rows
        history = connection.execute(
            "select sequence, action, model_version, previous_champion, reason, decided_at from model_promotions "
            "where model_version = ? or previous_champion = ? order by task, sequence",
            [model_version, model_version],
        ).fetchall()
    card = read_card(open_object_store(settings.lake_url(), endpoint_url=settings.s3_endpoint_url() or None), card_key)
    if as_json:
        print(card.to_json())
        return 0
    metrics = card.metrics
    pretrained = card.architecture.get("pretrained") or {}
    lines = [
        f"model {card.model_version} ({card.task}), status {status}",
        f"  dataset          {card.dataset_version}",
        f"  network          {card.architecture.get('name')} at {card.input_size} px, crop {card.crop_fraction}, "
        f"{card.test_time_views} test-time view(s), ensemble of {card.architecture.get('ensemble_members', 1)}",
        "  initial weights  "
        + (
            f"{pretrained['package']} {pretrained['version']} (sha256 {pretrained['sha256'][:16]}...)"
            if pretrained
            else "from scratch"
        ),
        f"  training         {card.training.get('epochs_run', '?')} epochs on {card.training_device} in "
        f"{card.training_seconds:.0f} s, peak learning rate {card.training.get('learning_rate')}",
        f"  test split       {metrics.get('cells')} cells: accuracy {metrics.get('accuracy'):.4f}, macro F1 "
        f"{metrics.get('macro_f1'):.4f}, ECE {metrics.get('ece_after'):.4f} after temperature {card.temperature:.3f}",
        f"  referral         {card.referral_policy().describe_guarantee()}",
        f"                   test coverage {metrics.get('referral_coverage'):.4f}, accepted-cell accuracy "
        f"{metrics.get('referral_accepted_accuracy')}",
        f"  unfamiliar cells {card.ood['method'] + ' > ' + format(card.ood['threshold'], '.4f') if card.ood else 'no threshold'}",
        f"  code             {card.code_version}",
        "  promotion log    " + ("none" if not history else ""),
    ]
    lines += [
        f"    #{sequence} {action} {version} (was {previous}): {reason} at {decided}"
        for sequence, action, version, previous, reason, decided in history
    ]
    print("\n".join(lines))
    return 0


def _classify(args: argparse.Namespace) -> int:
    if not args.file and not args.directory:
        print("hema classify: give -f FILE or -d DIRECTORY", file=sys.stderr)
        return 2
    start_tensorflow_quietly()
    from hema_pipeline import settings
    from hema_pipeline.inference.classify import classify_files, collect_image_files
    from hema_pipeline.inference.predict import CellClassifier
    from hema_pipeline.modeling.promotion import load_champion
    from hema_pipeline.modeling.registry import load_model
    from hema_pipeline.storage.object_store import open_object_store
    from hema_pipeline.storage.warehouse import Warehouse

    paths = collect_image_files(args.file or (), args.directory or (), recursive=args.recursive)
    if not paths:
        print("hema classify: no image files found", file=sys.stderr)
        return 2
    warehouse = Warehouse(args.warehouse or settings.warehouse_path())
    if not warehouse.exists():
        # Opening a mistyped path would create an empty warehouse beside the real one.
        print(f"hema classify: no warehouse at {warehouse.description} (check --warehouse or HEMA_WAREHOUSE)", file=sys.stderr)
        return 2
    lake = open_object_store(settings.lake_url(), endpoint_url=settings.s3_endpoint_url() or None)
    try:
        loaded = (
            load_champion(lake, warehouse, args.task)
            if args.model is None
            else load_model(lake, warehouse, args.task, args.model)
        )
    except (KeyError, LookupError, ValueError) as error:
        print(f"hema classify: {error}", file=sys.stderr)
        return 2
    outcome = classify_files(paths, CellClassifier(loaded.model, loaded.card.contract()), args.output, progress=not args.quiet)
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
    classify.add_argument(
        "--warehouse", help="DuckDB file or postgresql:// URL (default: HEMA_WAREHOUSE or .hema/warehouse.duckdb)"
    )
    classify.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    classify.set_defaults(handler=_classify)

    models = commands.add_parser("models", help="list, show, promote or roll back registered models")
    model_actions = models.add_subparsers(dest="action", required=True)
    listing = model_actions.add_parser("list", help="every registered model (or one task's), with its scores")
    listing.add_argument("--task")
    show = model_actions.add_parser("show", help="one model's card: origin, scores, referral guarantee, promotions")
    show.add_argument("model_version")
    show.add_argument("--json", action="store_true", help="the whole card as JSON")
    promote = model_actions.add_parser("promote", help="make a registered model champion (recorded, with the reason)")
    promote.add_argument("task")
    promote.add_argument("model_version")
    promote.add_argument("--reason", required=True)
    roll_back = model_actions.add_parser("rollback", help="restore the task's previous champion (recorded)")
    roll_back.add_argument("task")
    roll_back.add_argument("--reason", required=True)
    for parser_ in (listing, show, promote, roll_back):
        parser_.add_argument(
            "--warehouse", help="DuckDB file or postgresql:// URL (default: HEMA_WAREHOUSE or .hema/warehouse.duckdb)"
        )
    models.set_defaults(handler=_models)

    thresholds = commands.add_parser("thresholds", help="fit or list the smear-level flag thresholds")
    threshold_actions = thresholds.add_subparsers(dest="action", required=True)
    fit = threshold_actions.add_parser(
        "fit",
        help="fit the dysplastic-neutrophil share threshold on labelled smears (recorded; the flag thresholds "
        "asset uses the newest fit)",
    )
    fit.add_argument("--labels", type=Path, required=True, help="CSV with columns smear_id (pseudonym), myelodysplasia (yes/no)")
    fit.add_argument("--reason", required=True, help="why: who asked, which study (recorded with the fit)")
    fit.add_argument("--dry-run", action="store_true", help="print the fit without recording it")
    history = threshold_actions.add_parser("list", help="every recorded fit, newest first")
    for parser_ in (fit, history):
        parser_.add_argument(
            "--warehouse", help="DuckDB file or postgresql:// URL (default: HEMA_WAREHOUSE or .hema/warehouse.duckdb)"
        )
    thresholds.set_defaults(handler=_thresholds)

    query = commands.add_parser(
        "query",
        help="run SQL against the warehouse (read-only; no file, extension or settings access)",
    )
    query.add_argument("sql")
    query.add_argument("--warehouse", help="DuckDB file or postgresql:// URL (default: HEMA_WAREHOUSE or .hema/warehouse.duckdb)")
    query.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    query.add_argument("--max-rows", type=int, default=200)
    query.set_defaults(handler=_query)
    return parser


def quiet_library_noise() -> None:
    """Keep a lab user's terminal to what this tool says: TensorFlow's start-up chatter and Keras's
    retracing notices (about Keras's own training loop) and Dagster's notice that `Output(data_version=...)`
    is a beta parameter say nothing a user can act on. Errors still show."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"Parameter `data_version` of initializer `Output.__init__` is currently in beta")


def main(argv: list[str] | None = None) -> int:
    quiet_library_noise()
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
