"""Calibrate and register again, with the current code, the model of a kept ``train_pbc.py`` run.

    .venv/bin/python benchmarks/recalibrate_pbc.py --keep /tmp/bench/run1 --out /tmp/bench/run1_recalibrated.json
        [--test-time-views 8] [--target-accuracy 0.995] [--referral-confidence 0.95]

``train_pbc.py --keep DIR`` leaves its lake (images, the trained model), warehouse (dataset version,
registered model) and image cache in DIR. This runs ``calibrate`` and ``evaluate_and_register`` (what the
``pbc8_calibration`` and ``pbc8_model`` assets call) again on that same trained model and dataset: a change to calibration or referral (or another
target) is measured on exactly the network it is meant for, without training it again. The trained
network is the registered one (its bytes are checked against the card's hash when loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_pbc import PreparedData, machine_description, register  # noqa: E402


@dataclass(frozen=True)
class KeptRun:
    """What a ``train_pbc.py --keep`` folder holds: the dataset, the lake, and the first registered model
    (the network as trained) with its training handle."""

    dataset: Any
    lake: Any
    card: Any
    trained: Any
    prepared: PreparedData


def load_kept_run(folder: Path) -> KeptRun:
    """The run kept in ``folder``. Points ``HEMA_HOME`` (the image cache) at the folder only if it is unset,
    so a script loading several runs keeps the first one's."""
    work = folder.resolve()
    os.environ.setdefault("HEMA_HOME", str(work / "home"))

    from hema_pipeline.datasets.tasks import TASKS
    from hema_pipeline.datasets.versioning import DatasetHandle
    from hema_pipeline.modeling.registry import read_card
    from hema_pipeline.modeling.stage import TrainedModelHandle
    from hema_pipeline.storage.object_store import LocalObjectStore
    from hema_pipeline.storage.warehouse import Warehouse

    warehouse = Warehouse(work / "warehouse.duckdb")
    [dataset_row] = warehouse.query("select task, dataset_version, config_json, manifest_key from dataset_versions").itertuples(
        index=False
    )
    task = dataset_row.task
    # The first registration of the run is the model as trained_pbc.py registered it.
    [card_key] = warehouse.query("select card_key from models where task = ? order by created_at limit 1", [task]).card_key
    lake = LocalObjectStore(work / "lake")
    card = read_card(lake, card_key)
    dataset = DatasetHandle(
        dataset_version=dataset_row.dataset_version,
        task=task,
        classes=TASKS[task].classes,
        manifest_key=dataset_row.manifest_key,
        config_json=dataset_row.config_json,
    )
    trained = TrainedModelHandle(
        task=task,
        dataset_version=dataset.dataset_version,
        model_key=card.artifact_key,
        architecture=card.architecture,
        training_config={key: value for key, value in card.training.items() if key in _training_fields()},
        training_seconds=card.training_seconds,
        device=card.training_device,
        epochs_run=int(card.training.get("epochs_run", 0) or 0),
        best_val_accuracy=float(card.training.get("best_val_accuracy", float("nan"))),
    )
    prepared = PreparedData(
        work=work,
        lake_url=str(work / "lake"),
        quarantine_url=str(work / "quarantine"),
        warehouse_path=str(work / "warehouse.duckdb"),
        dataset=dataset,
        record=None,
        facts={},
    )
    return KeptRun(dataset=dataset, lake=lake, card=card, trained=trained, prepared=prepared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, required=True, help="the folder a train_pbc.py --keep run left")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--test-time-views", type=int, default=None)
    parser.add_argument("--target-accuracy", type=float, default=None)
    parser.add_argument("--referral-confidence", type=float, default=None)
    args = parser.parse_args()
    run = load_kept_run(args.keep)
    dataset, lake, card, trained, prepared = run.dataset, run.lake, run.card, run.trained, run.prepared
    from hema_pipeline.modeling.stage import CalibrationSettings, calibrate

    overrides = {
        name: value
        for name, value in (
            ("test_time_views", args.test_time_views),
            ("target_accuracy", args.target_accuracy),
            ("referral_confidence", args.referral_confidence),
        )
        if value is not None
    }
    started = time.perf_counter()
    calibrated = calibrate(dataset, lake, trained, CalibrationSettings(**overrides)).handle
    registered = register(prepared, trained, calibrated).card
    summary = {
        "command": " ".join(sys.argv),
        "machine": machine_description(),
        "trained_model_version": card.model_version,
        "model_version": registered.model_version,
        "architecture": card.architecture.get("name"),
        "image_size": card.input_size,
        "training_seconds": card.training_seconds,
        "temperature": calibrated.temperature,
        "referral_policy": calibrated.referral_policy,
        "metrics": registered.metrics,
        "per_class": registered.per_class_metrics,
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str))
    metrics = registered.metrics
    guarantee = calibrated.referral_policy.get("guarantee") or {}
    print(f"model {registered.model_version} (network of {card.model_version})")
    print(f"test accuracy {metrics['accuracy']:.4f}, ECE after {metrics['ece_after']:.4f}")
    print(f"referral: {guarantee.get('statement', calibrated.referral_policy['sources'][0])}")
    print(f"test coverage {metrics['referral_coverage']:.4f}, accepted-cell accuracy {metrics['referral_accepted_accuracy']}")


def _training_fields() -> set[str]:
    from dataclasses import fields

    from hema_pipeline.modeling.training import TrainingConfig

    return {field.name for field in fields(TrainingConfig)}


if __name__ == "__main__":
    main()
