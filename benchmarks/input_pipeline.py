"""Training input throughput: this project's tf.data stream versus the loop the seed projects used.

The seed projects fed Keras from ``ImageDataGenerator.flow_from_directory(...)`` with augmentation:
per image, PIL load + resize (``load_img``, nearest neighbour by default), a random affine transform with
``scipy.ndimage.affine_transform`` per channel, random flips and a PIL brightness change, then batch
assembly, all in one Python thread (Keras 2's ``fit`` default: workers=1, no multiprocessing).
``ImageDataGenerator`` is gone from Keras 3, so ``image_data_generator_epoch`` below is that loop written
out with the same operations and parameter draws.

The tf.data stream (``hema_pipeline.datasets.input_pipeline.training_stream``) does more per image: area-
averaged (antialiased) resize, class-balanced sampling, and contrast, saturation and hue jitter besides the
same geometry and brightness. It decodes each image once (cache) and augments whole batches.

    python benchmarks/input_pipeline.py --images ../shared/data/pbc --count 2000 --image-size 64 --epochs 5
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

# runnable from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hema_pipeline.datasets.augmentation import AugmentationConfig  # noqa: E402
from hema_pipeline.taxonomy import PBC_FOLDER_TO_CLASS  # noqa: E402


def pick_images(root: Path, count: int, seed: int) -> tuple[list[str], list[int]]:
    """``count`` images spread evenly over the class folders, chosen reproducibly."""
    folders = sorted(folder for folder in PBC_FOLDER_TO_CLASS if (root / folder).is_dir())
    if not folders:
        raise SystemExit(f"no PBC class folders under {root}")
    rng = np.random.default_rng(seed)
    per_class = -(-count // len(folders))
    paths: list[str] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = sorted((root / folder).glob("*.jpg"))
        chosen = rng.choice(len(files), size=min(per_class, len(files)), replace=False)
        paths += [str(files[index]) for index in sorted(chosen)]
        labels += [label] * len(chosen)
    order = rng.permutation(len(paths))[:count]
    return [paths[index] for index in order], [labels[index] for index in order]


# --- the ImageDataGenerator-style loop ---------------------------------------------------------------------


def _transform_matrix_offset_center(matrix: np.ndarray, height: int, width: int) -> np.ndarray:
    o_x = float(height) / 2 - 0.5
    o_y = float(width) / 2 - 0.5
    offset_matrix = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset_matrix = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    return offset_matrix @ matrix @ reset_matrix


def _apply_affine_transform(
    image: np.ndarray, theta: float, tx: float, ty: float, shear: float, zx: float, zy: float
) -> np.ndarray:
    """Keras 2's ``apply_affine_transform`` (channels last): one 3x3 matrix, scipy resampling per channel."""
    import scipy.ndimage

    theta, shear = np.deg2rad(theta), np.deg2rad(shear)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    shear_matrix = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
    zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    matrix = _transform_matrix_offset_center(rotation @ shift @ shear_matrix @ zoom, image.shape[0], image.shape[1])
    channels = [
        scipy.ndimage.affine_transform(image[..., channel], matrix[:2, :2], matrix[:2, 2], order=1, mode="reflect", cval=0.0)
        for channel in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def _random_transform(image: np.ndarray, config: AugmentationConfig, rng: np.random.Generator) -> np.ndarray:
    """``ImageDataGenerator.random_transform`` + brightness: the parameter draws in Keras 2's order."""
    size_y, size_x = image.shape[:2]
    theta = rng.uniform(-config.rotation_degrees, config.rotation_degrees)
    tx = rng.uniform(-config.height_shift, config.height_shift) * size_y
    ty = rng.uniform(-config.width_shift, config.width_shift) * size_x
    shear = rng.uniform(-config.shear_degrees, config.shear_degrees)
    zx, zy = rng.uniform(1 - config.zoom, 1 + config.zoom, 2)
    image = _apply_affine_transform(image, theta, tx, ty, shear, zx, zy)
    if config.horizontal_flip and rng.random() < 0.5:
        image = image[:, ::-1]
    if config.vertical_flip and rng.random() < 0.5:
        image = image[::-1]
    # Keras 2's apply_brightness_shift: back to PIL, ImageEnhance.Brightness, back to an array
    factor = rng.uniform(1 - config.brightness, 1 + config.brightness)
    enhanced = ImageEnhance.Brightness(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))).enhance(factor)
    return np.asarray(enhanced, dtype=np.float32)


def image_data_generator_epoch(
    paths: list[str],
    labels: list[int],
    image_size: int,
    batch_size: int,
    config: AugmentationConfig,
    rng: np.random.Generator,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    order = rng.permutation(len(paths))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        batch_images = []
        for index in order[start : start + batch_size]:
            with Image.open(paths[index]) as image:  # keras.utils.load_img(target_size=..., interpolation="nearest")
                resized = image.convert("RGB").resize((image_size, image_size), Image.Resampling.NEAREST)
            array = np.asarray(resized, dtype=np.float32)  # img_to_array
            batch_images.append(_random_transform(array, config, rng) / 255.0)  # rescale=1/255
        yield (
            np.stack(batch_images),
            np.asarray([labels[index] for index in order[start : start + batch_size]], dtype=np.int32),
        )


# --- measurement -------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import tensorflow as tf

    return {
        "CPU": model,
        "CPU cores usable": str(usable),
        "Python": platform.python_version(),
        "TensorFlow": tf.__version__,
        "OS": platform.platform(terse=True),
    }


def run(images_dir: Path, count: int, image_size: int, epochs: int, batch_size: int, seed: int) -> None:
    import scipy.ndimage  # noqa: F401  imported before timing: library import time is not throughput
    import tensorflow as tf  # noqa: F401

    from hema_pipeline.datasets.input_pipeline import training_stream

    paths, labels = pick_images(images_dir, count, seed)
    for path in paths:  # both pipelines then read the files from the OS page cache, not from a cold disk
        Path(path).read_bytes()
    config = AugmentationConfig()
    steps = len(paths) // batch_size
    rows: list[tuple[str, str, float, float]] = []

    rng = np.random.default_rng(seed)
    baseline_seconds = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        produced = sum(
            len(batch_labels)
            for _, batch_labels in image_data_generator_epoch(paths, labels, image_size, batch_size, config, rng)
        )
        elapsed = time.perf_counter() - started
        baseline_seconds.append(elapsed)
        rows.append(("ImageDataGenerator-style loop (1 thread)", str(epoch), produced / elapsed, elapsed))

    started = time.perf_counter()
    stream = training_stream(
        paths,
        labels,
        num_classes=max(labels) + 1,
        image_size=image_size,
        batch_size=batch_size,
        augmentation=config,
        seed=seed,
    )
    iterator = iter(stream.dataset)
    setup = time.perf_counter() - started
    ours_seconds = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        produced = 0
        for _ in range(steps):
            images, _ = next(iterator)
            produced += int(images.shape[0])
        elapsed = time.perf_counter() - started + (setup if epoch == 1 else 0.0)
        ours_seconds.append(elapsed)
        rows.append(
            (
                "tf.data training_stream",
                f"{epoch}{' (cold: decode + cache)' if epoch == 1 else ''}",
                produced / elapsed,
                elapsed,
            )
        )

    images_per_epoch = steps * batch_size
    baseline_rate = images_per_epoch * epochs / sum(baseline_seconds)
    ours_rate = images_per_epoch * epochs / sum(ours_seconds)
    warm_rate = images_per_epoch * (epochs - 1) / sum(ours_seconds[1:]) if epochs > 1 else float("nan")

    print(f"## Input pipeline: {len(paths)} PBC images from {images_dir}, {image_size} px, batch {batch_size}, {epochs} epochs\n")
    print("| pipeline | epoch | images/s | seconds |")
    print("|---|---|---:|---:|")
    for name, epoch, rate, seconds in rows:
        print(f"| {name} | {epoch} | {rate:,.0f} | {seconds:.2f} |")
    print()
    print("| summary | images/s | speed-up |")
    print("|---|---:|---:|")
    print(f"| ImageDataGenerator-style loop, all epochs | {baseline_rate:,.0f} | 1.0x |")
    print(f"| tf.data, all epochs (first includes decoding) | {ours_rate:,.0f} | {ours_rate / baseline_rate:.1f}x |")
    print(f"| tf.data, epochs 2-{epochs} (decoded images cached) | {warm_rate:,.0f} | {warm_rate / baseline_rate:.1f}x |")
    print()
    print("| machine | |")
    print("|---|---|")
    for key, value in machine_info().items():
        print(f"| {key} | {value} |")


def main() -> None:
    default_images = Path(os.environ.get("HEMA_SHARED_DATA", "../shared/data")) / "pbc"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=Path, default=default_images, help="folder with PBC class folders (default: %(default)s)"
    )
    parser.add_argument("--count", type=int, default=2000, help="images to use (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="training resolution in pixels (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per pipeline (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    arguments = parser.parse_args()
    if not arguments.images.is_dir():
        raise SystemExit(f"no images at {arguments.images}: pass --images or set HEMA_SHARED_DATA")
    if arguments.count < arguments.batch_size or arguments.epochs < 1:
        raise SystemExit("need at least one batch of images and one epoch")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run(
        arguments.images.resolve(),
        arguments.count,
        arguments.image_size,
        arguments.epochs,
        arguments.batch_size,
        arguments.seed,
    )


if __name__ == "__main__":
    main()
