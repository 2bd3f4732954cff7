"""How many cells per second the network alone can classify on this machine: the ceiling on ``hema classify``
and the per-smear prediction asset, whatever their decoding and bookkeeping cost.

    .venv/bin/python benchmarks/forward_pass_ceiling.py --keep /tmp/bench/lite0_128_e9_s1 --out /tmp/forward.json

``--keep`` is a folder kept by ``benchmarks/train_pbc.py --keep``. Its registered network runs through the
product's own compiled forward pass (``CellClassifier``, the contract's pixel scaling and dihedral views) on
random uint8 images already in memory, batch after batch for ``--seconds``, with 1, 2 and the contract's test-time
views. Beside it, engines the product does not use, to show whether they are levers here:

- the same forward pass compiled by XLA (``jit_compile=True``), one view;
- the network converted to TensorFlow Lite (float32, no quantisation) and run by TensorFlow's own
  ``tf.lite.Interpreter`` with its default XNNPACK CPU delegate on the machine's cores, one view and the
  contract's views (the product's ``dihedral_view`` inside the timed loop, one interpreter call per view,
  logits averaged), with the largest difference from the product's logits on the same images;
- the network with its batch-norm layers made identities: not a valid network, but an upper bound on what
  folding batch norm into the convolutions (one multiply-add less per activation) could gain.

Nothing else should run on the machine while it measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recalibrate_pbc import load_kept_run  # noqa: E402  (benchmarks/ is not a package)
from train_pbc import machine_description  # noqa: E402


def cells_per_second(run_batch: Callable[[], object], batch: int, seconds: float) -> float:
    run_batch()  # traces
    run_batch()
    started = time.perf_counter()
    cells = 0
    while time.perf_counter() - started < seconds:
        run_batch()
        cells += batch
    return cells / (time.perf_counter() - started)


def tflite_rows(model, contract, images: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """The TensorFlow Lite rows: conversion time, cells/s with 1 and the contract's views, and the largest
    logit difference from the product's forward pass."""
    import os

    import tensorflow as tf

    from hema_pipeline.inference.predict import CellClassifier
    from hema_pipeline.modeling.networks import dihedral_view

    started = time.perf_counter()
    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    conversion_s = time.perf_counter() - started
    interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=os.cpu_count())
    [model_input] = interpreter.get_input_details()
    interpreter.resize_tensor_input(model_input["index"], list(images.shape))
    interpreter.allocate_tensors()
    logits_output = interpreter.get_output_details()[0]["index"]
    scaled = tf.constant(images.astype(np.float32) * np.float32(CellClassifier(model, contract).pixel_range / 255.0))

    def logits(views: int) -> np.ndarray:
        total = np.zeros((len(images), len(contract.class_names)), np.float64)
        for index in range(views):
            interpreter.set_tensor(model_input["index"], np.ascontiguousarray(dihedral_view(scaled, index).numpy()))
            interpreter.invoke()
            total += interpreter.get_tensor(logits_output)
        return total / views

    rows = []
    for views in sorted({1, contract.test_time_views}):
        rate = cells_per_second(lambda views=views: logits(views), args.batch, args.seconds)
        difference = float(
            np.abs(
                logits(views) - CellClassifier(model, dataclasses.replace(contract, test_time_views=views)).logits(images)
            ).max()
        )
        rows.append(
            {
                "engine": "TensorFlow Lite, XNNPACK (float32)",
                "views": views,
                "cells_per_second": rate,
                "max_abs_logit_difference": difference,
                "conversion_seconds": conversion_s,
            }
        )
        print(
            f"TensorFlow Lite, {views} view(s): {rate:.1f} cells/s, {rate * views:.0f} network passes/s; "
            f"largest logit difference from the product {difference:.2e}; conversion {conversion_s:.1f} s",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, required=True, help="a folder kept by train_pbc.py --keep")
    parser.add_argument("--batch", type=int, default=64, help="cells per forward call (the prediction batch size)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per engine")
    parser.add_argument("--out", type=Path, default=Path("forward_pass_ceiling.json"))
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from hema_pipeline.inference.predict import CellClassifier
    from hema_pipeline.modeling.stage import load_trained

    run = load_kept_run(args.keep)
    model = load_trained(run.lake, run.trained)
    contract = run.card.contract()
    size = contract.input_size
    images = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
    rows = []

    for views in sorted({1, 2, contract.test_time_views}):
        classifier = CellClassifier(model, dataclasses.replace(contract, test_time_views=views))
        rate = cells_per_second(lambda classifier=classifier: classifier.logits(images), args.batch, args.seconds)
        rows.append({"engine": "product forward pass", "views": views, "cells_per_second": rate})
        print(f"product forward pass, {views} view(s): {rate:.1f} cells/s, {rate * views:.0f} network passes/s", flush=True)

    scale = np.float32(CellClassifier(model, contract).pixel_range / 255.0)

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)], jit_compile=True)
    def xla_forward(batch: tf.Tensor) -> tf.Tensor:
        return model(tf.cast(batch, tf.float32) * scale, training=False)

    rate = cells_per_second(lambda: xla_forward(images).numpy(), args.batch, args.seconds)
    rows.append({"engine": "XLA (jit_compile)", "views": 1, "cells_per_second": rate})
    print(f"XLA, 1 view: {rate:.1f} cells/s", flush=True)

    rows.extend(tflite_rows(model, contract, images, args))

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.call = lambda inputs, training=None, mask=None: inputs
    classifier = CellClassifier(model, dataclasses.replace(contract, test_time_views=1))
    rate = cells_per_second(lambda: classifier.logits(images), args.batch, args.seconds)
    rows.append({"engine": "batch norm removed (upper bound of folding)", "views": 1, "cells_per_second": rate})
    print(f"batch norm removed, 1 view: {rate:.1f} cells/s", flush=True)

    summary = {
        "command": " ".join(sys.argv),
        "machine": machine_description(),
        "model_version": contract.model_version,
        "architecture": run.card.architecture.get("name"),
        "input_size": size,
        "batch": args.batch,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
