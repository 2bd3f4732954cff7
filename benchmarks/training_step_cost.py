"""What one CPU training step of a pretrained EfficientNet-Lite0 costs, by input size and frozen blocks.

    .venv/bin/python benchmarks/training_step_cost.py 128:0 128:3 160:0 160:5 [--batch 64] [--steps 6]

Each ``SIZE:FROZEN`` builds the network from its ImageNet weights at SIZE px, freezes the stem and the
first FROZEN blocks (``networks.freeze_leading_blocks``, as ``frozen_blocks`` does in training), and
times ``model.fit`` over ``--steps`` batches of random images after two warm-up steps. Random pixels
cost what real ones do; the input pipeline is left out, so this is the network's share of a step.
"""

from __future__ import annotations

import argparse
import time


def step_seconds(size: int, frozen_blocks: int, batch: int, steps: int) -> float:
    import keras
    import numpy as np

    from hema_pipeline.modeling import networks

    arch = networks.efficientnet_lite0(input_size=size)
    model = networks.build_model(arch, 8)
    networks.freeze_leading_blocks(model, arch, frozen_blocks)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch * steps, size, size, 3)).astype("float32")
    targets = keras.utils.to_categorical(rng.integers(0, 8, batch * steps), 8)
    model.fit(images[: batch * 2], targets[: batch * 2], batch_size=batch, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(images, targets, batch_size=batch, epochs=1, verbose=0)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configurations", nargs="+", help="SIZE:FROZEN_BLOCKS, e.g. 160:5")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    print("| input | blocks frozen | s/step | img/s |\n|---:|---:|---:|---:|")
    for configuration in args.configurations:
        size, frozen = (int(part) for part in configuration.split(":"))
        seconds = step_seconds(size, frozen, args.batch, args.steps)
        print(f"| {size} px | {frozen} | {seconds:.2f} | {args.batch / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
