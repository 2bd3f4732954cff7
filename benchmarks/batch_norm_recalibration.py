"""Experiment: does re-estimating batch-norm statistics after training ("precise BN") raise accuracy?

    .venv/bin/python benchmarks/batch_norm_recalibration.py --image-size 64 --epochs 12

The hypothesis it tests: during training the moving statistics (momentum 0.9) describe only the last
~10 augmented, class-balanced batches, so a model is evaluated with noisy statistics. The script trains
the ``standard`` network as ``crop_and_views_ablation.py`` does (same split, crop 0.75), scores
validation and test with 1 and 8 views, then replaces the statistics of that same model by the plain
mean of per-batch statistics over (a) 200 batches of the training stream (augmented, class-balanced)
and (b) one pass over the un-augmented training images in their natural class proportions, and scores
again. One JSON line per variant; the result is in ``benchmarks/RESULTS.md``. The product does not do
this: the measured change was within noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import keras
import tensorflow as tf
from crop_and_views_ablation import random_split

from hema_pipeline.settings import shared_data_dir


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    found: list[keras.layers.BatchNormalization] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(batch_norm_layers(layer))
        elif isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            found.append(layer)
    return found


def recalibrate_batch_norm(model: keras.Model, batches: tf.data.Dataset, steps: int) -> int:
    """Moving mean and variance := plain mean of the per-batch statistics over ``steps`` batches."""
    layers = batch_norm_layers(model)
    momenta = [layer.momentum for layer in layers]
    used = 0
    try:
        for element in batches.take(steps):
            images = element[0] if isinstance(element, tuple) else element
            used += 1
            for layer in layers:  # momentum (k-1)/k at batch k: a running mean, the first batch overwrites
                layer.momentum = (used - 1) / used
            model(images, training=True)  # eager: a traced call would freeze the first momentum
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    return used


def main() -> None:
    from hema_pipeline.datasets.input_pipeline import evaluation_dataset, training_stream
    from hema_pipeline.modeling.networks import architecture_preset, predict_outputs
    from hema_pipeline.modeling.training import TrainingConfig, train_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--crop", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pbc", type=Path, default=None, help="PBC folder (default: HEMA_SHARED_DATA/pbc)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pbc_root = args.pbc or shared_data_dir() / "pbc"
    if not pbc_root.is_dir():
        sys.exit(f"PBC images not found at {pbc_root} (set HEMA_SHARED_DATA)")
    size, crop = args.image_size, args.crop
    classes, parts = random_split(pbc_root, args.seed)
    arch = replace(architecture_preset("standard", size), pixel_range=1.0)
    config = TrainingConfig(epochs=args.epochs, early_stopping_patience=args.epochs, augment=False)
    stream = training_stream(*parts["train"], len(classes), image_size=size, crop_fraction=crop, seed=args.seed)
    validation = evaluation_dataset(*parts["validation"], image_size=size, crop_fraction=crop)
    test = evaluation_dataset(*parts["test"], image_size=size, crop_fraction=crop, cache=False)
    natural = evaluation_dataset(*parts["train"], image_size=size, crop_fraction=crop, cache=False)
    with tempfile.TemporaryDirectory() as checkpoints:
        result = train_model(
            arch, config, stream.dataset, validation, classes, checkpoints, steps_per_epoch=stream.steps_per_epoch
        )
        trained_path = Path(checkpoints) / "trained.keras"
        result.model.save(trained_path)

        def score(model: keras.Model, variant: str, batches: int) -> None:
            row = {"variant": variant, "batches": batches}
            for name, data in (("val", validation), ("test", test)):
                for views in (1, 8):
                    outputs = predict_outputs(model, data, test_time_views=views)
                    row[f"{name}_accuracy_{views}_views"] = round(float((outputs.logits.argmax(1) == outputs.labels).mean()), 4)
            print(json.dumps(row), flush=True)

        score(result.model, "as trained (momentum 0.9)", 0)
        model = keras.models.load_model(trained_path)
        score(model, "training stream, augmented and balanced", recalibrate_batch_norm(model, stream.dataset, 200))
        model = keras.models.load_model(trained_path)
        shuffled = natural.unbatch().shuffle(8192, seed=args.seed).batch(64)
        score(model, "training images, plain, natural proportions", recalibrate_batch_norm(model, shuffled, 10_000))


if __name__ == "__main__":
    main()
