"""Join the networks of several kept ``train_pbc.py`` runs on the same dataset into one ensemble, then
calibrate and register it as the model stage would (``calibrate``, ``evaluate_and_register``).

    .venv/bin/python benchmarks/ensemble_kept_runs.py --keep /tmp/bench/run1 --keep /tmp/bench/run2 \\
        --out /tmp/bench/ensemble.json [--test-time-views 8]

What an ensemble of n independently trained networks would score, without training them again: the runs
must have used the same dataset version (same split, image size and crop) and the same architecture. The
ensemble is ``networks.combine_members`` of their trained networks, the model that ``ensemble_members`` n
would store, with one difference: ``ensemble_members`` also gives each member its own training-stream
order (dataset seed + member), where kept runs of one dataset drew the same order and differ by weight
seed. Its training seconds are the members' sum; its validation accuracy is measured here, as
``train_ensemble`` measures it. It is calibrated and registered in the first run's folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recalibrate_pbc import load_kept_run  # noqa: E402
from train_pbc import machine_description, register  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, action="append", required=True, help="a kept run folder (two or more)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--test-time-views", type=int, default=None)
    args = parser.parse_args()
    if len(args.keep) < 2:
        parser.error("an ensemble needs at least two --keep folders")
    runs = [load_kept_run(folder) for folder in args.keep]
    first = runs[0]
    versions = {run.dataset.dataset_version for run in runs}
    if len(versions) != 1:
        parser.error(f"the runs used different datasets: {sorted(versions)}")

    import numpy as np

    from hema_pipeline.datasets.splits import VALIDATION
    from hema_pipeline.modeling.networks import ArchitectureConfig, combine_members, member_architecture
    from hema_pipeline.modeling.stage import CalibrationSettings, SplitReader, calibrate, load_trained, store_trained

    member_arch = ArchitectureConfig.from_dict(first.trained.architecture)
    for run in runs[1:]:
        other = ArchitectureConfig.from_dict(run.trained.architecture)
        if member_architecture(other) != member_architecture(member_arch):
            parser.error(f"the runs trained different networks: {member_arch} and {other}")
    arch = dataclasses.replace(member_arch, ensemble_members=len(runs))
    members = [load_trained(run.lake, run.trained) for run in runs]
    ensemble = combine_members(arch, members)
    key = store_trained(first.lake, first.dataset.task, ensemble)
    validation = SplitReader(first.dataset, first.lake).outputs(ensemble, VALIDATION, test_time_views=1)
    trained = dataclasses.replace(
        first.trained,
        best_val_accuracy=float(np.mean(validation.logits.argmax(axis=1) == validation.labels)),
        model_key=key,
        architecture=dataclasses.asdict(arch),
        training_seconds=sum(run.trained.training_seconds for run in runs),
        epochs_run=sum(run.trained.epochs_run for run in runs),
    )
    settings = (
        CalibrationSettings() if args.test_time_views is None else CalibrationSettings(test_time_views=args.test_time_views)
    )
    started = time.perf_counter()
    calibrated = calibrate(first.dataset, first.lake, trained, settings).handle
    registered = register(first.prepared, trained, calibrated).card
    # As registered by their own runs (same test split, views and preprocessing).
    member_accuracies = [float(run.card.metrics["accuracy"]) for run in runs]
    metrics = registered.metrics
    summary = {
        "command": " ".join(sys.argv),
        "machine": machine_description(),
        "members": [
            {"model_version": run.card.model_version, "training_seconds": run.trained.training_seconds, "test_accuracy": accuracy}
            for run, accuracy in zip(runs, member_accuracies, strict=True)
        ],
        "model_version": registered.model_version,
        "architecture": arch.name,
        "image_size": arch.input_size,
        "training_seconds": trained.training_seconds,
        "temperature": calibrated.temperature,
        "referral_policy": calibrated.referral_policy,
        "metrics": metrics,
        "per_class": registered.per_class_metrics,
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str))
    guarantee = calibrated.referral_policy.get("guarantee") or {}
    print(f"members' test accuracy: {', '.join(f'{accuracy:.4f}' for accuracy in member_accuracies)}")
    print(f"ensemble {registered.model_version}: test accuracy {metrics['accuracy']:.4f}, ECE after {metrics['ece_after']:.4f}")
    print(f"referral: {guarantee.get('statement', calibrated.referral_policy['sources'][0])}")
    print(f"test coverage {metrics['referral_coverage']:.4f}, accepted-cell accuracy {metrics['referral_accepted_accuracy']}")


if __name__ == "__main__":
    main()
