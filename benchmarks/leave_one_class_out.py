"""Unseen cell types, measured honestly on real images: leave one PBC class out of training, then count how
many cells of that class the trained model refers as unfamiliar, against how many known cells it refers.

    .venv/bin/python benchmarks/leave_one_class_out.py --held-out basophil monocyte --out /tmp/pbc_loco.json

Without ``--architecture``, ``--image-size``, ``--epochs`` and ``--patience`` each is the product default
(the task's architecture hint and image size, the launchpad's training settings).

Data path: the same as ``benchmarks/train_pbc.py`` (PBC -> pseudo-smears -> ``import_smear`` ->
``build_dataset`` for pbc8, patient-grouped 60/15/10/15). For each held-out class the pbc8 manifest is cut
to the seven other classes in every split (label indices renumbered in task order) and written to the
temporary lake as a derived dataset version; the ``pbc8_trained_model`` and ``pbc8_calibration`` asset
bodies then train on it and fit, on the seven-class calibration split, the temperature, the referral
thresholds and the energy threshold that keeps 95% of known cells. The model never sees a cell of the
held-out class in training, validation or calibration.

Reported per held-out class (``leave_one_class_out_report`` plus the baselines):
- the share of known test cells and of held-out cells (test split, and every held-out cell in the set)
  referred as unfamiliar by the energy score, and the score's ROC AUC held-out vs known;
- the same with a Mahalanobis score (tied covariance on training-split features, threshold keeping 95% of
  calibration cells), for comparison;
- the thesis's rule "top probability <= 0.5 -> other" (uncalibrated softmax, and after temperature);
- the full triage (unfamiliar, else referral thresholds at 99.5%): share of held-out cells that reach a
  technologist one way or the other, and what the model calls the held-out cells.

Why a derived manifest and not ``build_dataset``: tasks are a fixed registry (``TASKS``) and pbc8 requires
all eight classes; there is no seven-class task to build. Cutting the eight-class split keeps its patient
grouping.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_pbc import (  # noqa: E402  (benchmarks/ is not a package)
    machine_description,
    prepare_pbc8,
    setup_logging,
    train_and_calibrate,
)

from hema_pipeline.settings import shared_data_dir  # noqa: E402

LOG = logging.getLogger("leave_one_class_out")
PBC_FOLDER_NAMES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")


def derived_handle(prepared, held_out_class: str):
    """The pbc8 dataset without ``held_out_class``: same cells, same patient-grouped splits, seven classes."""
    from hema_pipeline.datasets.versioning import DatasetHandle, manifest_key
    from hema_pipeline.storage.object_store import LocalObjectStore

    lake = LocalObjectStore(prepared.lake_url)
    full = prepared.dataset.manifest(lake)
    classes = tuple(name for name in prepared.dataset.classes if name != held_out_class)
    kept = full.loc[full["label"] != held_out_class].copy()
    kept["label_index"] = kept["label"].map(classes.index).astype("int32")
    digest = hashlib.sha256(f"{prepared.dataset.dataset_version}\nwithout {held_out_class}".encode()).hexdigest()[:12]
    version = f"pbc8-without-{held_out_class.replace('_', '-')}-{digest}"
    kept["dataset_version"] = version
    buffer = io.BytesIO()
    kept.to_parquet(buffer, index=False)
    key = manifest_key("pbc8", version)
    lake.put_bytes(key, buffer.getvalue())
    handle = DatasetHandle(
        dataset_version=version,
        task="pbc8",
        classes=classes,
        manifest_key=key,
        config_json=prepared.dataset.config_json,
    )
    held_out_rows = full.loc[full["label"] == held_out_class]
    return handle, held_out_rows


def outputs_for_rows(model, lake, rows, image_size: int, crop_fraction: float, test_time_views: int):
    from hema_pipeline.datasets.input_pipeline import evaluation_dataset, resolve_local_image_paths
    from hema_pipeline.modeling.networks import predict_outputs

    rows = rows.sort_values("cell_uid")
    paths = resolve_local_image_paths(lake, list(rows["image_key"]), Path(tempfile.gettempdir()))
    dataset = evaluation_dataset(paths, [0] * len(paths), image_size=image_size, cache=False, crop_fraction=crop_fraction)
    return predict_outputs(model, dataset, test_time_views=test_time_views)


def run_one(prepared, held_out_class: str, args) -> dict:
    from hema_pipeline.datasets.splits import CALIBRATION, TEST, TRAIN
    from hema_pipeline.modeling.calibration import ReferralPolicy, softmax
    from hema_pipeline.modeling.contract import triage_cells
    from hema_pipeline.modeling.evaluation import evaluate_logits
    from hema_pipeline.modeling.ood import (
        MahalanobisScorer,
        OodThreshold,
        energy_score,
        fit_ood_threshold,
        leave_one_class_out_report,
    )
    from hema_pipeline.modeling.stage import SplitReader, load_trained
    from hema_pipeline.storage.object_store import LocalObjectStore

    lake = LocalObjectStore(prepared.lake_url)
    handle, held_out_rows = derived_handle(prepared, held_out_class)
    LOG.info("%s held out: %d known cells, %d held-out cells", held_out_class, len(handle.manifest(lake)), len(held_out_rows))
    started = time.perf_counter()
    trained_model, calibration = train_and_calibrate(
        prepared, handle, args.architecture, args.epochs, args.patience, args.train_seed
    )
    trained, calibrated = trained_model.handle, calibration.handle
    model = load_trained(lake, trained)
    reader = SplitReader(handle, lake)
    # Every output as calibration computed its own: the dataset's crop, the calibrated views.
    views, crop = calibrated.test_time_views, handle.config.crop_fraction
    known_test = reader.outputs(model, TEST, views)
    known_calibration = reader.outputs(model, CALIBRATION, views)
    known_train = reader.outputs(model, TRAIN, views)
    held_test_rows = held_out_rows.loc[held_out_rows["split"] == TEST]
    image_size = handle.config.image_size
    held_all = outputs_for_rows(model, lake, held_out_rows, image_size, crop, views)
    held_test = outputs_for_rows(model, lake, held_test_rows, image_size, crop, views)

    temperature = calibrated.temperature
    evaluation = evaluate_logits(known_test.logits, known_test.labels, handle.classes, temperature)
    energy_threshold = OodThreshold.from_dict(calibrated.ood_threshold)
    groups = {f"{held_out_class} (test split)": held_test, f"{held_out_class} (all cells)": held_all}
    energy = leave_one_class_out_report(
        energy_score(known_test.logits, temperature),
        {name: energy_score(out.logits, temperature) for name, out in groups.items()},
        energy_threshold,
    )
    scorer = MahalanobisScorer.fit(known_train.features, known_train.labels, len(handle.classes))
    mahalanobis_threshold = fit_ood_threshold(scorer.score(known_calibration.features), "mahalanobis", 0.95)
    mahalanobis = leave_one_class_out_report(
        scorer.score(known_test.features),
        {name: scorer.score(out.features) for name, out in groups.items()},
        mahalanobis_threshold,
    )

    def top_probability_rule(logits: np.ndarray, t: float) -> float:
        return float((softmax(logits, t).max(axis=1) <= 0.5).mean())

    policy = ReferralPolicy.from_dict(calibrated.referral_policy)

    def triage_shares(logits: np.ndarray) -> dict:
        decisions = triage_cells(
            logits, temperature, policy.thresholds, energy_score(logits, temperature), energy_threshold.threshold
        ).decisions
        return {name: float((decisions == name).mean()) for name in ("accepted", "low_confidence", "unfamiliar")}

    predicted = softmax(held_all.logits, temperature).argmax(axis=1)
    called = {handle.classes[i]: int(n) for i, n in zip(*np.unique(predicted, return_counts=True), strict=True)}
    result = {
        "held_out_class": held_out_class,
        "dataset_version": handle.dataset_version,
        "known_classes": list(handle.classes),
        "architecture": trained.architecture,
        "image_size": image_size,
        "training_config": trained.training_config,
        "training_seconds": trained.training_seconds,
        "epochs_run": trained.epochs_run,
        "best_val_accuracy": trained.best_val_accuracy,
        "known_test_accuracy": evaluation.accuracy,
        "known_test_macro_f1": evaluation.macro_f1,
        "temperature": temperature,
        "energy_threshold": energy_threshold.to_dict(),
        "energy_report": energy.to_dict(orient="records"),
        "mahalanobis_threshold": mahalanobis_threshold.to_dict(),
        "mahalanobis_report": mahalanobis.to_dict(orient="records"),
        "top_probability_le_0_5": {
            "known test, T=1": top_probability_rule(known_test.logits, 1.0),
            "held-out (all), T=1": top_probability_rule(held_all.logits, 1.0),
            "known test, calibrated T": top_probability_rule(known_test.logits, temperature),
            "held-out (all), calibrated T": top_probability_rule(held_all.logits, temperature),
        },
        "triage_known_test": triage_shares(known_test.logits),
        "triage_held_out_all": triage_shares(held_all.logits),
        "held_out_called_as": called,
        "seconds": time.perf_counter() - started,
    }
    LOG.info("%s: %s", held_out_class, json.dumps({k: result[k] for k in ("known_test_accuracy", "top_probability_le_0_5")}))
    return result


def markdown(results: list[dict], machine: str) -> str:
    # Every held-out class is trained with the same settings: the first result's stand for all.
    first = results[0]
    training = first["training_config"]
    lines = [
        f"Model per held-out class: {first['architecture']['name']} at {first['image_size']} px, up to "
        f"{training['epochs']} epochs (patience {training['early_stopping_patience']}); {machine}.",
        "",
        "| held-out class | known-class test acc. | known test cells referred (energy) | held-out referred (energy): test split / all | energy ROC AUC (all) | Mahalanobis: known / held-out (all), AUC | top p ≤ 0.5, T=1: known / held-out | top p ≤ 0.5, calibrated: known / held-out | triage: held-out reaching a technologist | training s (epochs) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        e = {row["group"]: row for row in r["energy_report"]}
        m = {row["group"]: row for row in r["mahalanobis_report"]}
        c = r["held_out_class"]
        test_row, all_row = e[f"{c} (test split)"], e[f"{c} (all cells)"]
        m_all = m[f"{c} (all cells)"]
        top = r["top_probability_le_0_5"]
        triage = r["triage_held_out_all"]
        triage_known = r["triage_known_test"]
        lines.append(
            f"| {c} | {r['known_test_accuracy']:.4f} | {e['known']['referred_share']:.1%} ({e['known']['referred']}/{e['known']['cells']}) | "
            f"{test_row['referred_share']:.1%} ({test_row['referred']}/{test_row['cells']}) / {all_row['referred_share']:.1%} ({all_row['referred']}/{all_row['cells']}) | "
            f"{all_row['roc_auc_vs_known']:.3f} | {m['known']['referred_share']:.1%} / {m_all['referred_share']:.1%}, {m_all['roc_auc_vs_known']:.3f} | "
            f"{top['known test, T=1']:.1%} / {top['held-out (all), T=1']:.1%} | "
            f"{top['known test, calibrated T']:.1%} / {top['held-out (all), calibrated T']:.1%} | "
            f"{1 - triage['accepted']:.1%} (known: {1 - triage_known['accepted']:.1%}) | "
            f"{r['training_seconds']:.0f} ({r['epochs_run']}) |"
        )
    lines.append("")
    for r in results:
        called = ", ".join(
            f"{name} {count}" for name, count in sorted(r["held_out_called_as"].items(), key=lambda item: -item[1])
        )
        lines.append(f"- {r['held_out_class']} cells (all {sum(r['held_out_called_as'].values())}) called: {called}")
    return "\n".join(lines)


def main() -> None:
    from hema_pipeline.modeling.networks import ARCHITECTURE_PRESETS
    from hema_pipeline.taxonomy import PBC_FOLDER_TO_CLASS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", nargs="+", default=["basophil"], choices=PBC_FOLDER_NAMES, help="PBC class folders")
    parser.add_argument("--image-size", type=int, default=None, help="the task's image size (DatasetBuildConfig default)")
    parser.add_argument(
        "--architecture", default="", choices=["", *sorted(ARCHITECTURE_PRESETS)], help="default: the task's hint"
    )
    parser.add_argument("--epochs", type=int, default=None, help="TrainingSettings default")
    parser.add_argument("--patience", type=int, default=None, help="early-stopping patience (TrainingSettings default)")
    parser.add_argument("--max-per-class", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-seed", type=int, default=20260101)
    parser.add_argument("--pbc", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("pbc_leave_one_class_out.json"))
    parser.add_argument("--log-file", default=None)
    args = parser.parse_args()
    setup_logging(args.log_file)
    pbc_root = args.pbc or shared_data_dir() / "pbc"
    if not pbc_root.is_dir():
        sys.exit(f"PBC images not found at {pbc_root} (set HEMA_SHARED_DATA)")
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="pbc-loco-") as temporary:
        work = Path(temporary)
        os.environ["HEMA_HOME"] = str(work / "home")
        prepared = prepare_pbc8(work, pbc_root, args.image_size, args.seed, args.max_per_class, near_duplicate_check=False)
        for folder in args.held_out:
            results.append(run_one(prepared, PBC_FOLDER_TO_CLASS[folder], args))
    machine = machine_description()
    summary = {
        "command": " ".join(sys.argv),
        "machine": machine,
        "data": prepared.facts,
        "results": results,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str))
    print()
    print(markdown(results, machine))
    print(f"\nwall time {summary['wall_seconds']:.0f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
