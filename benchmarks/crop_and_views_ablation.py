"""Ablation: what the centred crop and the dihedral test-time views each add, on the PBC images.

    .venv/bin/python benchmarks/crop_and_views_ablation.py --image-size 64 --epochs 12 --crops 0.75 1.0

A short, cheap comparison (not the headline benchmark, which is ``train_pbc.py``): for each crop, the
project's own ``training_stream`` (default augmentation, class-balanced) trains the ``standard`` network
with ``train_model``; ``predict_outputs`` then scores the held-out images with 1, 2, 4 and 8 views. Every
crop sees the same images in the same split: a per-class random 60/15/25 split of the PBC files (the
public images have no patients; this ablation compares settings, it does not claim a leak-proof figure).
Prints one JSON line per crop and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from hema_pipeline.settings import shared_data_dir
from hema_pipeline.taxonomy import PBC_FOLDER_TO_CLASS

VIEWS = (1, 2, 4, 8)


def random_split(pbc_root: Path, seed: int) -> tuple[list[str], dict[str, tuple[list[str], list[int]]]]:
    """(class names, {"train" | "validation" | "test": (paths, labels)}), per class 60/15/25."""
    classes = list(PBC_FOLDER_TO_CLASS.values())  # the pbc8 order
    rng = np.random.default_rng(seed)
    parts: dict[str, tuple[list[str], list[int]]] = {name: ([], []) for name in ("train", "validation", "test")}
    for label, folder_name in enumerate(PBC_FOLDER_TO_CLASS):
        files = sorted(str(path) for path in (pbc_root / folder_name).glob("*.jpg"))
        rng.shuffle(files)
        cut_train, cut_validation = int(0.6 * len(files)), int(0.75 * len(files))
        for name, chosen in (
            ("train", files[:cut_train]),
            ("validation", files[cut_train:cut_validation]),
            ("test", files[cut_validation:]),
        ):
            parts[name][0].extend(chosen)
            parts[name][1].extend([label] * len(chosen))
    return classes, parts


def run_one(classes, parts, image_size: int, crop: float, epochs: int, seed: int) -> dict:
    from hema_pipeline.datasets.input_pipeline import evaluation_dataset, training_stream
    from hema_pipeline.modeling.networks import architecture_preset, predict_outputs
    from hema_pipeline.modeling.training import TrainingConfig, train_model

    arch = replace(architecture_preset("standard", image_size), pixel_range=1.0)  # the stream yields [0, 1]
    # The training seed stays TrainingConfig's default, as in the model assets; `seed` drives split and stream.
    config = TrainingConfig(epochs=epochs, early_stopping_patience=epochs, augment=False)
    stream = training_stream(*parts["train"], len(classes), image_size=image_size, crop_fraction=crop, seed=seed)
    validation = evaluation_dataset(*parts["validation"], image_size=image_size, crop_fraction=crop)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as checkpoints:
        result = train_model(
            arch, config, stream.dataset, validation, classes, checkpoints, steps_per_epoch=stream.steps_per_epoch
        )
    row: dict = {
        "image_size": image_size,
        "crop_fraction": crop,
        "epochs": epochs,
        "training_seconds": round(time.perf_counter() - started, 1),
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "test_images": len(parts["test"][0]),
    }
    test = evaluation_dataset(*parts["test"], image_size=image_size, crop_fraction=crop, cache=False)
    for views in VIEWS:
        outputs = predict_outputs(result.model, test, test_time_views=views)
        row[f"test_accuracy_{views}_views"] = float((outputs.logits.argmax(axis=1) == outputs.labels).mean())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--crops", type=float, nargs="+", default=[0.75, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pbc", type=Path, default=None, help="PBC folder (default: HEMA_SHARED_DATA/pbc)")
    parser.add_argument("--out", type=Path, default=Path("crop_and_views_ablation.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pbc_root = args.pbc or shared_data_dir() / "pbc"
    if not pbc_root.is_dir():
        sys.exit(f"PBC images not found at {pbc_root} (set HEMA_SHARED_DATA)")
    classes, parts = random_split(pbc_root, args.seed)
    rows = []
    for crop in args.crops:
        rows.append(run_one(classes, parts, args.image_size, crop, args.epochs, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
