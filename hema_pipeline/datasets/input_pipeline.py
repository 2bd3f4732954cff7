"""``tf.data`` input pipelines for training and evaluation, and the local image cache they read from.

Training stream: file paths and labels -> parallel ``read_file`` + ``decode_jpeg`` (downscaled in the DCT
domain where the JPEG is large enough) + area-averaged resize to the training resolution -> cache of the
decoded, resized uint8 images -> shuffle, or class-balanced sampling (one stream per class, drawn with
equal weights by ``sample_from_datasets``) -> batch -> augmentation of the whole batch -> prefetch.
Augmentation runs after the cache, so every epoch sees new variants while decoding happens once.
The stream repeats forever; train for ``steps_per_epoch`` steps per epoch.

Evaluation dataset: the same decode and resize, no augmentation, no shuffling: batches come in input order.

Images are float32 in [0, 1], labels int32 class indices.

TensorFlow reads local files only (it has no S3 file system): ``resolve_local_image_paths`` gives the
files of a ``LocalObjectStore`` directly and copies other stores' images into a local, content-addressed
cache first (``materialise_local_image_cache``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import pandas as pd

from hema_pipeline.datasets.augmentation import AugmentationConfig, build_batch_augmenter
from hema_pipeline.storage.object_store import LocalObjectStore, ObjectStore

if TYPE_CHECKING:
    import tensorflow as tf

DEFAULT_IMAGE_SIZE: Final = 96
DEFAULT_BATCH_SIZE: Final = 64
# decode_jpeg can shrink by these factors while decoding, far faster than resizing the full image
_JPEG_DECODE_RATIOS: Final = (1, 2, 4, 8)
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")


class ImageCacheError(RuntimeError):
    pass


def _key_path(cache_dir: Path, key: str) -> Path:
    parts = [part for part in key.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"invalid object key {key!r}")
    return cache_dir.joinpath(*parts)


def _fetch_into_cache(store: ObjectStore, key: str, target: Path) -> Path:
    if target.is_file():
        return target
    data = store.get_bytes(key)
    # The importer names images by the SHA-256 of their bytes: verify it, so a corrupt or truncated
    # download never enters the cache (where it would be trusted on every later run).
    expected = target.stem
    if _SHA256_NAME.match(expected) and hashlib.sha256(data).hexdigest() != expected:
        raise ImageCacheError(f"{key}: content does not match the SHA-256 in its name")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def materialise_local_image_cache(
    store: ObjectStore,
    keys: Sequence[str],
    cache_dir: str | os.PathLike[str],
    max_workers: int = 16,
) -> list[Path]:
    """Copy the images under ``keys`` into ``cache_dir`` (mirroring the keys) and return their local
    paths, in the order of ``keys``. Incremental: files already cached are not fetched again, which is safe
    because image keys are content-addressed (``images/ab/<sha256>.jpg``) and checked on download.
    Writes are atomic, so an interrupted sync leaves no partial files."""
    root = Path(cache_dir).resolve()
    targets = [_key_path(root, key) for key in keys]
    # Object-store reads are network-bound: threads overlap the round trips.
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        return list(pool.map(lambda pair: _fetch_into_cache(store, pair[0], pair[1]), zip(keys, targets, strict=True)))


def resolve_local_image_paths(
    store: ObjectStore,
    keys: Sequence[str],
    cache_dir: str | os.PathLike[str],
    max_workers: int = 16,
) -> list[Path]:
    """Local files for ``keys``: a ``LocalObjectStore``'s own files, anything else through the cache."""
    if isinstance(store, LocalObjectStore):
        paths = [store.local_path(key) for key in keys]
        missing = [key for key, path in zip(keys, paths, strict=True) if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images missing from the image store, e.g. {missing[:3]}")
        return paths
    return materialise_local_image_cache(store, keys, cache_dir, max_workers=max_workers)


def split_inputs(manifest: pd.DataFrame, split: str, paths_by_key: Mapping[str, Path]) -> tuple[list[str], list[int]]:
    """(image paths, label indices) of one split of a dataset manifest, in cell_uid order."""
    rows = manifest.loc[manifest["split"] == split].sort_values("cell_uid")
    paths = [str(paths_by_key[key]) for key in rows["image_key"]]
    return paths, [int(value) for value in rows["label_index"]]


def decode_and_resize(data: tf.Tensor, image_size: int, crop_fraction: float = 1.0) -> tf.Tensor:
    """uint8 [image_size, image_size, 3] from encoded image bytes (the importer stores JPEG; ``hema
    classify`` also reads PNG): the one preprocessing for training, evaluation and inference.

    ``crop_fraction`` below 1 keeps only a centred square of that share of the shortest side first. A
    CellaVision crop has its cell in the middle, framed by red cells; cropping spends the network's
    pixels on the cell (at 0.75, a 96 px input sees the cell at the resolution a 128 px full image
    would) for the compute of 96 px.

    A JPEG is downscaled while decoding (DCT domain) by the largest factor that keeps the region to be
    kept at or above ``image_size``, then resized by area averaging, an antialiased downscale (aliasing
    would turn granules, the texture that tells granulocytes apart, into moire). On PBC images this is
    ~2.5x faster than a full decode followed by ``resize(antialias=True)``. Other formats are decoded
    whole. Images smaller than ``image_size`` are enlarged bilinearly."""
    import tensorflow as tf

    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")

    def decode_jpeg() -> tf.Tensor:
        shortest = tf.reduce_min(tf.io.extract_jpeg_shape(data)[:2])
        kept = tf.cast(tf.cast(shortest, tf.float32) * crop_fraction, tf.int32)
        # index of the largest ratio r with kept // r >= image_size (0, i.e. ratio 1, for small images)
        fits = tf.stack([kept // ratio >= image_size for ratio in _JPEG_DECODE_RATIOS])
        branch = tf.reduce_max(tf.where(fits, tf.range(len(_JPEG_DECODE_RATIOS)), 0))
        return tf.switch_case(
            branch, [lambda ratio=ratio: tf.io.decode_jpeg(data, channels=3, ratio=ratio) for ratio in _JPEG_DECODE_RATIOS]
        )

    def decode_other() -> tf.Tensor:
        return tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)

    decoded = tf.cond(tf.io.is_jpeg(data), decode_jpeg, decode_other)
    decoded.set_shape([None, None, 3])
    if crop_fraction < 1.0:
        height, width = tf.shape(decoded)[0], tf.shape(decoded)[1]
        side = tf.maximum(1, tf.cast(tf.cast(tf.minimum(height, width), tf.float32) * crop_fraction, tf.int32))
        decoded = tf.image.crop_to_bounding_box(decoded, (height - side) // 2, (width - side) // 2, side, side)
    # After a DCT downscale the kept region is still >= image_size exactly when it was before.
    shortest = tf.reduce_min(tf.shape(decoded)[:2])
    size = [image_size, image_size]
    resized = tf.cond(
        shortest >= image_size,
        lambda: tf.image.resize(decoded, size, method="area"),
        lambda: tf.image.resize(decoded, size, method="bilinear"),
    )
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def decode_and_resize_file(path: tf.Tensor, image_size: int, crop_fraction: float = 1.0) -> tf.Tensor:
    """``decode_and_resize`` of a local file's bytes."""
    import tensorflow as tf

    return decode_and_resize(tf.io.read_file(path), image_size, crop_fraction)


def _check_inputs(
    paths: Sequence[str | os.PathLike[str]], labels: Sequence[int], num_classes: int | None
) -> tuple[list[str], np.ndarray]:
    if len(paths) != len(labels):
        raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
    if not paths:
        raise ValueError("no images")
    label_array = np.asarray(labels, dtype=np.int32)
    if num_classes is not None and (label_array.min() < 0 or label_array.max() >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes})")
    return [os.fspath(path) for path in paths], label_array


def _cache_file(
    cache_dir: Path, paths: Sequence[str], labels: np.ndarray, image_size: int, crop_fraction: float, part: str
) -> str:
    """A cache file name derived from exactly what is cached: TensorFlow reuses an existing cache file
    without checking it, so a name shared by two different inputs would serve stale images."""
    digest = hashlib.sha256()
    digest.update(f"{image_size}\n{crop_fraction!r}\n{part}\n".encode())
    for path, label in zip(paths, labels.tolist(), strict=True):
        digest.update(f"{path}\t{label}\n".encode())
    cache_dir.mkdir(parents=True, exist_ok=True)
    return str(cache_dir / f"images-{image_size}px-{digest.hexdigest()[:24]}")


def _decoded_images(
    paths: list[str],
    labels: np.ndarray,
    image_size: int,
    crop_fraction: float,
    cache: bool,
    cache_dir: Path | None,
    part: str,
) -> tf.data.Dataset:
    """(uint8 image, label) pairs in input order, decoded in parallel, optionally cached in memory
    (``cache_dir`` None) or on disk."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        lambda path, label: (decode_and_resize_file(path, image_size, crop_fraction), label),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if not cache:
        return dataset
    if cache_dir is None:
        return dataset.cache("")
    return dataset.cache(_cache_file(cache_dir, paths, labels, image_size, crop_fraction, part))


def _to_unit_float(images: tf.Tensor) -> tf.Tensor:
    import tensorflow as tf

    return tf.cast(images, tf.float32) / 255.0


@dataclass(frozen=True)
class TrainingStream:
    dataset: tf.data.Dataset  # infinite: (images float32 [batch, size, size, 3], labels int32 [batch])
    steps_per_epoch: int  # batches that show as many images as the split holds
    class_counts: tuple[int, ...]  # training images per class index
    balanced: bool


def training_stream(
    paths: Sequence[str | os.PathLike[str]],
    labels: Sequence[int],
    num_classes: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    augmentation: AugmentationConfig | None = None,
    balance_classes: bool = True,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    crop_fraction: float = 1.0,
) -> TrainingStream:
    """The training split as an endless, shuffled (or class-balanced), augmented stream of batches.

    ``augmentation`` None means the default ``AugmentationConfig()``; pass ``AugmentationConfig.disabled()``
    for none. With ``balance_classes`` every batch draws each class with equal probability, so rare
    classes (basophils, malignant cells) weigh as much as neutrophils; classes without training images are
    left out of the draw. ``cache_dir`` None caches decoded images in memory; a folder caches them on disk
    (at 96 px, 20,000 images take ~550 MB)."""
    import tensorflow as tf

    path_list, label_array = _check_inputs(paths, labels, num_classes)
    config = augmentation if augmentation is not None else AugmentationConfig()
    cache_path = Path(cache_dir) if cache_dir is not None else None
    class_counts = tuple(int(count) for count in np.bincount(label_array, minlength=num_classes))

    if balance_classes:
        per_class = []
        for class_index, count in enumerate(class_counts):
            if count == 0:
                continue
            members = np.flatnonzero(label_array == class_index)
            class_paths = [path_list[i] for i in members]
            per_class.append(
                _decoded_images(
                    class_paths, label_array[members], image_size, crop_fraction, True, cache_path, f"class-{class_index}"
                )
                .shuffle(count, seed=seed + class_index, reshuffle_each_iteration=True)
                .repeat()
            )
        weights = [1.0 / len(per_class)] * len(per_class)
        images = tf.data.Dataset.sample_from_datasets(per_class, weights=weights, seed=seed, rerandomize_each_iteration=True)
    else:
        images = (
            _decoded_images(path_list, label_array, image_size, crop_fraction, True, cache_path, "train")
            .shuffle(len(path_list), seed=seed, reshuffle_each_iteration=True)
            .repeat()
        )

    batches = images.batch(batch_size, drop_remainder=True)
    if config.is_identity:
        batches = batches.map(
            lambda batch, batch_labels: (_to_unit_float(batch), batch_labels), num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        augment = build_batch_augmenter(config)
        # a distinct, reproducible stateless seed per batch: (seed, running batch number)
        numbered = tf.data.Dataset.zip((batches, tf.data.Dataset.counter()))
        batches = numbered.map(
            lambda batch, batch_number: (
                augment(_to_unit_float(batch[0]), tf.stack([tf.constant(seed, tf.int64), batch_number])),
                batch[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    steps = max(1, len(path_list) // batch_size)
    return TrainingStream(
        dataset=batches.prefetch(tf.data.AUTOTUNE),
        steps_per_epoch=steps,
        class_counts=class_counts,
        balanced=balance_classes,
    )


def evaluation_dataset(
    paths: Sequence[str | os.PathLike[str]],
    labels: Sequence[int],
    image_size: int = DEFAULT_IMAGE_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    crop_fraction: float = 1.0,
) -> tf.data.Dataset:
    """Every image once, in input order, unaugmented: (images float32 [<=batch, size, size, 3], labels int32).
    ``cache`` keeps decoded images for repeated passes (validation every epoch); switch it off for a
    one-off pass over a large set."""
    import tensorflow as tf

    path_list, label_array = _check_inputs(paths, labels, None)
    cache_path = Path(cache_dir) if cache_dir is not None else None
    dataset = _decoded_images(path_list, label_array, image_size, crop_fraction, cache, cache_path, "evaluation")
    return (
        dataset.batch(batch_size)
        .map(lambda batch, batch_labels: (_to_unit_float(batch), batch_labels), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
