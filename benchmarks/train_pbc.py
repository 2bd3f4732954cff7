"""Real-data benchmark: the pbc8 model trained, calibrated and evaluated on the PBC images, end to end
through the project's own code.

    .venv/bin/python benchmarks/train_pbc.py --out /tmp/pbc8.json [--image-size 96] [--epochs 70]
        [--patience 25] [--crop-fraction 0.75] [--test-time-views 8] [--ensemble-members 1]
        [--max-per-class 200] [--seed 0]

Every setting left out takes the Dagster asset's default (shown above).

Steps, each the project's real code path:

1. ``export_pbc_as_smears``: the PBC class folders -> pseudo-smears of fake patients (100 cells each) in a
   temporary inbox, in the CellaVision-style export format.
2. ``import_smear`` for every smear (parse, pseudonymise, strip and verify each JPEG, content-addressed
   store, DuckDB upsert, Parquet mirrors), into a temporary lake and warehouse.
3. The cell table as the ``cell_table`` asset snapshots it (``select * from cells``), then
   ``build_dataset`` + ``write_dataset`` with the ``pbc8_dataset`` asset's default configuration
   (60/15/10/15 patient-grouped split, default augmentation, class-balanced sampling), and the two
   leakage checks of ``pbc8_dataset_leakage_checks`` (no patient in two splits;
   ``cross_split_near_duplicates_in_manifest``).
4. The model stage's domain functions, the ones the ``pbc8_trained_model``, ``pbc8_calibration`` and
   ``pbc8_model`` assets call (``modeling.stage``): ``train_for_dataset`` (training stream, early stopping
   on validation), ``calibrate`` (temperature, referral thresholds at the 99.5% target and the energy OOD
   threshold, fitted on the calibration split), ``evaluate_and_register`` (test split, registration in the
   temporary model registry).

Everything is written under a temporary folder that is deleted at the end; the PBC tree is only read.
Prints a Markdown table and writes every figure to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hema_pipeline.modeling.networks import ARCHITECTURE_PRESETS
from hema_pipeline.settings import shared_data_dir

LOG = logging.getLogger("train_pbc")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def setup_logging(log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", handlers=handlers, force=True)
    # The training module reports each epoch at INFO; keep TensorFlow's own chatter down.
    logging.getLogger("hema_pipeline.modeling.training").setLevel(logging.INFO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass
class PreparedData:
    """A temporary lake + warehouse holding the imported PBC pseudo-smears and one pbc8 dataset."""

    work: Path
    lake_url: str
    quarantine_url: str
    warehouse_path: str
    dataset: object  # hema_pipeline.datasets.versioning.DatasetHandle
    record: object  # hema_pipeline.datasets.versioning.DatasetRecord
    facts: dict


def prepare_pbc8(
    work: Path,
    pbc_root: Path,
    image_size: int | None,
    seed: int,
    max_per_class: int | None,
    cells_per_smear: int = 100,
    near_duplicate_check: bool = True,
    crop_fraction: float | None = None,
    task: str = "pbc8",
) -> PreparedData:
    """Export -> import -> cell table -> the task's dataset (+ leakage checks), as the pipeline does it."""
    from hema_pipeline.anonymise.pseudonymise import PseudonymKey
    from hema_pipeline.datasets.near_duplicates import DEFAULT_MAX_DISTANCE, cross_split_near_duplicates_in_manifest
    from hema_pipeline.datasets.versioning import DatasetBuildSettings, DatasetHandle, build_dataset, write_dataset
    from hema_pipeline.export.pbc import PbcExportSpec, export_pbc_as_smears
    from hema_pipeline.ingest.inbox import Inbox
    from hema_pipeline.ingest.smear_import import ImportTargets, import_smear
    from hema_pipeline.storage.object_store import LocalObjectStore
    from hema_pipeline.storage.warehouse import Warehouse

    facts: dict = {}
    inbox_dir, lake_dir, quarantine_dir = work / "inbox", work / "lake", work / "quarantine"
    warehouse_path = work / "warehouse.duckdb"

    started = time.perf_counter()
    export = export_pbc_as_smears(
        pbc_root, inbox_dir, PbcExportSpec(cells_per_smear=cells_per_smear, max_per_class=max_per_class, seed=seed)
    )
    facts["export_seconds"] = time.perf_counter() - started
    facts["smears"] = len(export.smears)
    LOG.info("exported %d pseudo-smears in %.1f s", len(export.smears), facts["export_seconds"])

    started = time.perf_counter()
    # A fixed benchmark key: pseudonyms, and so the patient-grouped split (which orders patients by
    # pseudonym), are the same on every run with the same seed.
    key = PseudonymKey(hashlib.sha256(f"hema-pipeline PBC benchmark key, seed {seed}".encode()).digest())
    inbox = Inbox(LocalObjectStore(inbox_dir), settle_seconds=0)
    lake = LocalObjectStore(lake_dir)
    warehouse = Warehouse(warehouse_path)
    targets = ImportTargets(lake, LocalObjectStore(quarantine_dir), warehouse)
    imported = quarantined = 0
    for smear in inbox.ready_smears():
        result = import_smear(inbox.store, smear, key, targets)
        imported += result.cells_imported
        quarantined += result.cells_quarantined
    facts["import_seconds"] = time.perf_counter() - started
    facts["cells_imported"] = imported
    facts["cells_quarantined"] = quarantined
    LOG.info("imported %d cells (%d quarantined) in %.1f s", imported, quarantined, facts["import_seconds"])

    # The cell_table asset's snapshot: every row of `cells`.
    cells = warehouse.query("select * from cells order by cell_uid")
    # The dataset asset's default build settings, except seed and (if given) image size and crop.
    defaults = DatasetBuildSettings(seed=seed, image_size=image_size)
    if crop_fraction is not None:
        defaults = dataclasses.replace(defaults, crop_fraction=crop_fraction)
    dataset_config = defaults.dataset_config(task)
    started = time.perf_counter()
    built = build_dataset(cells, dataset_config, defaults.min_cells_per_class, defaults.min_patients_per_class)
    record = write_dataset(built, lake, warehouse)
    facts["dataset_seconds"] = time.perf_counter() - started
    handle = DatasetHandle.of(record)
    facts["dataset_version"] = record.dataset_version
    facts["patients"] = record.patient_count
    facts["split_counts"] = record.split_counts
    facts["cells_in_dataset"] = record.cell_count
    LOG.info("dataset %s: %d cells, %d pseudo-patients", record.dataset_version, record.cell_count, record.patient_count)

    # pbc8_dataset_leakage_checks
    manifest = handle.manifest(lake)
    splits_per_patient = manifest.groupby("patient_id")["split"].nunique()
    facts["patients_in_several_splits"] = int((splits_per_patient > 1).sum())
    if near_duplicate_check:
        started = time.perf_counter()
        with warehouse.connect() as connection:
            pairs = cross_split_near_duplicates_in_manifest(connection, lake, manifest, DEFAULT_MAX_DISTANCE)
        facts["near_duplicate_seconds"] = time.perf_counter() - started
        facts["near_duplicate_max_hamming"] = DEFAULT_MAX_DISTANCE
        facts["near_duplicate_pairs"] = int(len(pairs))
        labels = dict(zip(manifest["cell_uid"], manifest["label"], strict=True))
        facts["near_duplicate_examples"] = [
            {
                **{k: (int(v) if k == "distance" else str(v)) for k, v in row.items()},
                "label_a": labels[row["cell_uid_a"]],
                "label_b": labels[row["cell_uid_b"]],
            }
            for row in pairs.head(10).to_dict(orient="records")
        ]
        LOG.info(
            "near-duplicate check: %d cross-split pairs within %d pHash bits (dHash-confirmed) in %.1f s",
            len(pairs),
            DEFAULT_MAX_DISTANCE,
            facts["near_duplicate_seconds"],
        )
    return PreparedData(
        work=work,
        lake_url=str(lake_dir),
        quarantine_url=str(quarantine_dir),
        warehouse_path=str(warehouse_path),
        dataset=handle,
        record=record,
        facts=facts,
    )


def lake_and_warehouse(prepared: PreparedData):
    from hema_pipeline.storage.object_store import LocalObjectStore
    from hema_pipeline.storage.warehouse import Warehouse

    return LocalObjectStore(prepared.lake_url), Warehouse(prepared.warehouse_path)


def train_and_calibrate(
    prepared: PreparedData,
    dataset,
    architecture: str,
    epochs: int | None,
    patience: int | None,
    train_seed: int,
    test_time_views: int | None = None,
    ensemble_members: int | None = None,
    learning_rate: float | None = None,
    frozen_blocks: int | None = None,
):
    """``train_for_dataset`` then ``calibrate`` on ``dataset`` (a DatasetHandle), as the model assets run them;
    a setting left as None takes the launchpad's default."""
    from hema_pipeline.modeling.stage import CalibrationSettings, TrainingSettings, calibrate, train_for_dataset

    lake, _ = lake_and_warehouse(prepared)
    training = TrainingSettings(
        architecture=architecture,
        seed=train_seed,
        **{
            name: value
            for name, value in (
                ("epochs", epochs),
                ("early_stopping_patience", patience),
                ("ensemble_members", ensemble_members),
                ("learning_rate", learning_rate),
                ("frozen_blocks", frozen_blocks),
            )
            if value is not None
        },
    )
    calibration = CalibrationSettings() if test_time_views is None else CalibrationSettings(test_time_views=test_time_views)
    trained = train_for_dataset(dataset, lake, training, progress=lambda line: LOG.info("%s: %s", dataset.task, line))
    return trained, calibrate(dataset, lake, trained.handle, calibration)


def test_accuracies(prepared: PreparedData, models: list, test_time_views: int) -> list[float]:
    """Each model's test accuracy, through the same reader, preprocessing and views that ``evaluate_and_register``
    evaluates the registered model with."""
    import numpy as np

    from hema_pipeline.datasets.splits import TEST
    from hema_pipeline.modeling.stage import SplitReader

    lake, _ = lake_and_warehouse(prepared)
    reader = SplitReader(prepared.dataset, lake)
    accuracies = []
    for model in models:
        outputs = reader.outputs(model, TEST, test_time_views)
        accuracies.append(float(np.mean(outputs.logits.argmax(axis=1) == outputs.labels)))
    return accuracies


def register(prepared: PreparedData, trained, calibrated):
    """``evaluate_and_register``: test evaluation, calibration report, referral outcome, registration."""
    from hema_pipeline.modeling.stage import evaluate_and_register

    lake, warehouse = lake_and_warehouse(prepared)
    return evaluate_and_register(prepared.dataset, lake, warehouse, trained, calibrated)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_report(summary: dict) -> str:
    m = summary["metrics"]
    epochs_per_member = ", ".join(f"{member['epochs_run']} ({member['best_epoch']})" for member in summary["members"])
    val_accuracy_per_member = ", ".join(f"{member['best_val_accuracy']:.4f}" for member in summary["members"])
    test_accuracy_per_member = (
        ", ".join(f"{member['test_accuracy']:.4f}" for member in summary["members"] if "test_accuracy" in member)
        or "n/a (one network)"
    )
    lines = [
        "| figure | value |",
        "|---|---:|",
        f"| test cells | {m['cells']} |",
        f"| **test accuracy** | **{m['accuracy']:.4f}** |",
        f"| macro F1 | {m['macro_f1']:.4f} |",
        f"| macro ROC AUC | {_fmt(m.get('macro_auc'))} |",
        f"| ECE before calibration (T = 1) | {m['ece_before']:.4f} |",
        f"| **ECE after temperature scaling** | **{m['ece_after']:.4f}** |",
        f"| MCE after | {m['mce_after']:.4f} |",
        f"| NLL before / after | {m['nll_before']:.4f} / {m['nll_after']:.4f} |",
        f"| temperature (fitted on calibration split) | {summary['temperature']:.4f} |",
        f"| coverage at {m['referral_target']:.3f} target | {m['referral_coverage']:.4f} |",
        f"| accepted-cell accuracy | {_fmt(m['referral_accepted_accuracy'])} |",
        f"| energy OOD threshold (keeps 95% of calibration cells) | {summary['ood']['threshold']:.4f} |",
        f"| training seconds | {summary['training_seconds']:.0f} |",
        f"| ensemble members | {summary['ensemble_members']} |",
        f"| epochs run (best epoch), per member | {epochs_per_member} |",
        f"| best validation accuracy, per member | {val_accuracy_per_member} |",
        f"| test accuracy of each member alone | {test_accuracy_per_member} |",
        f"| validation accuracy of the stored model | {summary['best_val_accuracy']:.4f} |",
        f"| architecture / image size / parameters | {summary['architecture']} / {summary['image_size']} px / {summary['parameters']:,} |",
        f"| centre crop / test-time views | {summary['crop_fraction']} / {summary['test_time_views']} |",
        f"| device | {summary['device']} |",
        f"| machine | {summary['machine']} |",
        "",
        "| class | support | precision | recall | F1 | ROC AUC | referral threshold | coverage | accepted acc. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["per_class"]:
        lines.append(
            f"| {row['class_name']} | {row['support']} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | "
            f"{_fmt(row['f1'])} | {_fmt(row['roc_auc'])} | {_fmt(row.get('referral_threshold'))} | "
            f"{_fmt(row.get('referral_coverage'))} | {_fmt(row.get('referral_accepted_accuracy'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=None, help="the task's image size (DatasetBuildConfig default)")
    parser.add_argument(
        "--architecture", default="", choices=["", *sorted(ARCHITECTURE_PRESETS)], help="default: the task's hint"
    )
    parser.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (TrainingSettings default)")
    parser.add_argument("--epochs", type=int, default=None, help="TrainingSettings default")
    parser.add_argument(
        "--frozen-blocks", type=int, default=None, help="pretrained stem and leading blocks kept (TrainingSettings default)"
    )
    parser.add_argument("--patience", type=int, default=None, help="early-stopping patience (TrainingSettings default)")
    parser.add_argument("--max-per-class", type=int, default=None, help="cap images per class (quick runs)")
    parser.add_argument("--crop-fraction", type=float, default=None, help="centre crop (DatasetBuildConfig default)")
    parser.add_argument("--test-time-views", type=int, default=None, help="dihedral views averaged (CalibrationSettings default)")
    parser.add_argument(
        "--ensemble-members", type=int, default=None, help="networks averaged in the model (TrainingSettings default)"
    )
    parser.add_argument("--seed", type=int, default=0, help="export, split and training-stream seed")
    parser.add_argument("--train-seed", type=int, default=20260101, help="weight-initialisation seed (TrainingSettings)")
    parser.add_argument("--skip-near-duplicates", action="store_true")
    parser.add_argument("--pbc", type=Path, default=None, help="PBC folder (default: HEMA_SHARED_DATA/pbc)")
    parser.add_argument("--out", type=Path, default=Path("pbc8_benchmark.json"))
    parser.add_argument("--log-file", default=None)
    parser.add_argument(
        "--task", default="pbc8", choices=["pbc8", "wbc4", "mono_poly"], help="a task the PBC images can train (default pbc8)"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="work in this (new) folder and keep it: lake with the model and images, warehouse, for re-analysis",
    )
    args = parser.parse_args()
    setup_logging(args.log_file)

    pbc_root = args.pbc or shared_data_dir() / "pbc"
    if not pbc_root.is_dir():
        sys.exit(f"PBC images not found at {pbc_root} (set HEMA_SHARED_DATA)")
    wall_started = time.perf_counter()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=False)
    with tempfile.TemporaryDirectory(prefix="pbc8-bench-") as temporary:
        work = args.keep.resolve() if args.keep is not None else Path(temporary)
        os.environ["HEMA_HOME"] = str(work / "home")  # the image cache SplitReader would use for S3 lakes
        prepared = prepare_pbc8(
            work,
            pbc_root,
            args.image_size,
            args.seed,
            args.max_per_class,
            near_duplicate_check=not args.skip_near_duplicates,
            crop_fraction=args.crop_fraction,
            task=args.task,
        )
        trained_model, calibration = train_and_calibrate(
            prepared,
            prepared.dataset,
            args.architecture,
            args.epochs,
            args.patience,
            args.train_seed,
            args.test_time_views,
            args.ensemble_members,
            args.learning_rate,
            args.frozen_blocks,
        )
        trained, calibrated = trained_model.handle, calibration.handle
        started = time.perf_counter()
        card = register(prepared, trained, calibrated).card
        evaluate_seconds = time.perf_counter() - started
        members = [member.model for member in trained_model.result.members]
        member_accuracies = test_accuracies(prepared, members, calibrated.test_time_views) if len(members) > 1 else []
        member_summaries = trained_model.result.member_summaries()
    summary = {
        "task": args.task,
        "command": " ".join(sys.argv),
        "machine": machine_description(),
        "device": trained.device,
        "architecture": args.architecture,
        "image_size": prepared.dataset.config.image_size,
        "crop_fraction": prepared.dataset.config.crop_fraction,
        "test_time_views": calibrated.test_time_views,
        "parameters": trained_model.parameters,
        "epochs_requested": trained.training_config["epochs"],
        "ensemble_members": trained.architecture["ensemble_members"],
        # Per member: seed, epochs run, best epoch, validation accuracy (and, in an ensemble, its own test accuracy).
        "members": [
            {**member, **({"test_accuracy": accuracy} if accuracy is not None else {})}
            for member, accuracy in zip(member_summaries, member_accuracies or [None] * len(member_summaries), strict=True)
        ],
        "best_val_accuracy": trained.best_val_accuracy,
        "training_seconds": trained.training_seconds,
        "max_per_class": args.max_per_class,
        "seed": args.seed,
        "train_seed": args.train_seed,
        "data": prepared.facts,
        "temperature": calibrated.temperature,
        "ood": calibrated.ood_threshold,
        "referral_policy": calibrated.referral_policy,
        "metrics": card.metrics,
        "per_class": card.per_class_metrics,
        "model_version": card.model_version,
        "evaluate_register_seconds": evaluate_seconds,
        "wall_seconds": time.perf_counter() - wall_started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str, allow_nan=True))
    facts = prepared.facts
    print()
    print(
        f"PBC pseudo-smears: {facts['cells_imported']} cells in {facts['smears']} smears, dataset "
        f"{facts['dataset_version']} ({facts['patients']} pseudo-patients); split counts "
        f"{ {split: sum(counts.values()) for split, counts in facts['split_counts'].items()} }; patients in "
        f"several splits: {facts['patients_in_several_splits']}; cross-split near-duplicate pairs: "
        f"{facts.get('near_duplicate_pairs', 'not checked')}"
    )
    print()
    print(markdown_report(summary))
    print(f"\nwall time {summary['wall_seconds']:.0f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
