"""The tf.data pipelines, the batch augmenter and the local image cache, on small JPEGs made here (and a
few real PBC images where the shared data is present)."""

from __future__ import annotations

import hashlib
import io
import uuid
from dataclasses import replace
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image, ImageDraw

from hema_pipeline.datasets.augmentation import AugmentationConfig, build_batch_augmenter
from hema_pipeline.datasets.input_pipeline import (
    ImageCacheError,
    decode_and_resize_file,
    evaluation_dataset,
    materialise_local_image_cache,
    resolve_local_image_paths,
    split_inputs,
    training_stream,
)
from hema_pipeline.storage.object_store import LocalObjectStore, open_object_store
from hema_pipeline.taxonomy import PBC_FOLDER_TO_CLASS
from hema_pipeline_tests.conftest import require_pbc

tf = pytest.importorskip("tensorflow")

SIZE = 32


def class_image(label: int, variant: int, size: tuple[int, int] = (360, 363)) -> Image.Image:
    """Colour says the class (red, green or blue dominates), so a test can check image and label still
    travel together after sampling and augmentation; a bright square in one corner breaks symmetry."""
    rng = np.random.default_rng(1000 * label + variant)
    base = np.full((size[1], size[0], 3), 50, dtype=np.int16)
    base[..., label] = 190
    base += rng.integers(-25, 25, size=base.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((size[0] // 30, size[1] // 30, size[0] // 3, size[1] // 4), fill=(245, 245, 245))
    return image


def write_jpeg(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=92)
    return path


@pytest.fixture(scope="module")
def labelled_images(tmp_path_factory) -> tuple[list[str], list[int]]:
    """48 / 12 / 6 images of classes 0 / 1 / 2: imbalanced, like a differential."""
    root = tmp_path_factory.mktemp("images")
    paths, labels = [], []
    for label, count in enumerate((48, 12, 6)):
        for variant in range(count):
            paths.append(str(write_jpeg(root / f"c{label}" / f"{variant}.jpg", class_image(label, variant))))
            labels.append(label)
    return paths, labels


def dominant_channels(images: np.ndarray) -> np.ndarray:
    return images.mean(axis=(1, 2)).argmax(axis=-1)


def test_evaluation_dataset_keeps_order_shapes_and_labels(labelled_images):
    paths, labels = labelled_images
    batches = list(evaluation_dataset(paths, labels, image_size=SIZE, batch_size=16))
    images = np.concatenate([batch[0].numpy() for batch in batches])
    seen_labels = np.concatenate([batch[1].numpy() for batch in batches])
    assert [tuple(batch[0].shape) for batch in batches[:-1]] == [(16, SIZE, SIZE, 3)] * (len(batches) - 1)
    assert images.shape == (len(paths), SIZE, SIZE, 3)
    assert batches[0][0].dtype == tf.float32 and batches[0][1].dtype == tf.int32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert seen_labels.tolist() == labels
    assert (dominant_channels(images) == np.asarray(labels)).all()
    # a second pass (from the cache) gives the same images
    again = np.concatenate([batch[0].numpy() for batch in evaluation_dataset(paths, labels, image_size=SIZE, batch_size=16)])
    assert np.array_equal(images, again)


def test_decode_resizes_large_and_small_jpegs(tmp_path):
    large = write_jpeg(tmp_path / "large.jpg", class_image(2, 0, size=(366, 369)))
    small = write_jpeg(tmp_path / "small.jpg", class_image(1, 0, size=(24, 20)))
    for path, label in ((large, 2), (small, 1)):
        image = decode_and_resize_file(tf.constant(str(path)), SIZE).numpy()
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert dominant_channels(image[None].astype(np.float32))[0] == label
    # area-averaged downscale: the resized picture matches a PIL box-filter downscale closely
    reference = np.asarray(Image.open(large).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)
    ours = decode_and_resize_file(tf.constant(str(large)), SIZE).numpy().astype(np.float32)
    assert np.abs(ours - reference).mean() < 6.0


def test_crop_keeps_the_centred_square_of_the_shortest_side(tmp_path):
    # 360 x 372: a red frame around a green centre whose square is exactly 0.5 of the shortest side
    image = np.zeros((360, 372, 3), np.uint8)
    image[..., 0] = 220
    image[90:270, 96:276] = (20, 200, 30)
    path = tmp_path / "framed.jpg"
    Image.fromarray(image).save(path, format="JPEG", quality=95)
    whole = decode_and_resize_file(tf.constant(str(path)), SIZE).numpy().astype(np.float32)
    centre = decode_and_resize_file(tf.constant(str(path)), SIZE, crop_fraction=0.5).numpy().astype(np.float32)
    assert whole[..., 0].mean() > 100  # the frame is most of the whole image
    assert centre[..., 1].mean() > 180 and centre[..., 0].mean() < 60  # only the centre is left
    # the DCT-downscaled crop matches a PIL box-filter resize of the same centred square
    reference = np.asarray(
        Image.open(path).convert("RGB").crop((96, 90, 276, 270)).resize((SIZE, SIZE), Image.Resampling.BOX),
        dtype=np.float32,
    )
    assert np.abs(centre - reference).mean() < 6.0
    with pytest.raises(ValueError, match="crop_fraction"):
        decode_and_resize_file(tf.constant(str(path)), SIZE, crop_fraction=0.0)


def test_cached_images_are_keyed_by_crop(labelled_images, tmp_path):
    paths, labels = labelled_images
    cache = tmp_path / "cache"
    whole = next(iter(evaluation_dataset(paths[:4], labels[:4], image_size=SIZE, cache_dir=cache)))[0].numpy()
    cropped = next(iter(evaluation_dataset(paths[:4], labels[:4], image_size=SIZE, cache_dir=cache, crop_fraction=0.5)))[
        0
    ].numpy()
    assert not np.array_equal(whole, cropped)  # the second pass did not reuse the first one's cache file


def test_balanced_stream_draws_classes_equally_and_keeps_labels_with_images(labelled_images):
    paths, labels = labelled_images
    stream = training_stream(paths, labels, num_classes=3, image_size=SIZE, batch_size=16, seed=3)
    assert stream.class_counts == (48, 12, 6) and stream.balanced
    assert stream.steps_per_epoch == len(paths) // 16
    drawn = []
    for images, batch_labels in stream.dataset.take(40):
        assert tuple(images.shape) == (16, SIZE, SIZE, 3) and images.dtype == tf.float32
        assert float(tf.reduce_min(images)) >= 0.0 and float(tf.reduce_max(images)) <= 1.0
        assert (dominant_channels(images.numpy()) == batch_labels.numpy()).all()
        drawn.extend(batch_labels.numpy().tolist())
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.abs(shares - 1 / 3).max() < 0.06, shares


def test_unbalanced_stream_follows_the_natural_frequencies(labelled_images):
    paths, labels = labelled_images
    stream = training_stream(paths, labels, num_classes=3, image_size=SIZE, batch_size=16, balance_classes=False, seed=3)
    drawn = np.concatenate([batch_labels.numpy() for _, batch_labels in stream.dataset.take(40)])
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.abs(shares - np.array([48, 12, 6]) / 66).max() < 0.05, shares


def test_stream_is_reproducible_by_seed_and_augments(labelled_images):
    paths, labels = labelled_images

    def first_batches(seed: int, augmentation: AugmentationConfig | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        stream = training_stream(
            paths, labels, num_classes=3, image_size=SIZE, batch_size=8, seed=seed, augmentation=augmentation
        )
        return [(images.numpy(), batch_labels.numpy()) for images, batch_labels in stream.dataset.take(3)]

    one, same, other = first_batches(5), first_batches(5), first_batches(6)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(one, same, strict=True))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(one, other, strict=True))

    # Without augmentation every training image is one of the evaluation images; with it, none is.
    plain = first_batches(5, AugmentationConfig.disabled())
    reference = np.concatenate([batch[0].numpy() for batch in evaluation_dataset(paths, labels, image_size=SIZE)])
    for images, _ in plain:
        for image in images:
            assert np.abs(reference - image).reshape(len(reference), -1).max(axis=1).min() < 1e-6
    for image in one[0][0]:
        assert np.abs(reference - image).reshape(len(reference), -1).max(axis=1).min() > 1e-3


def _batch(labels: tuple[int, ...]) -> tf.Tensor:
    images = [
        np.asarray(class_image(label, index).resize((SIZE, SIZE)), dtype=np.float32) / 255.0 for index, label in enumerate(labels)
    ]
    return tf.constant(np.stack(images))


def test_flips_mirror_exactly():
    images = _batch((0, 1, 2, 0, 1, 2, 0, 1))
    only_horizontal = replace(AugmentationConfig.disabled(), horizontal_flip=True)
    only_vertical = replace(AugmentationConfig.disabled(), vertical_flip=True)
    for config, mirror in ((only_horizontal, lambda x: x[:, ::-1]), (only_vertical, lambda x: x[::-1, :])):
        augmented = build_batch_augmenter(config)(images, tf.constant([1, 2], tf.int64)).numpy()
        flipped = 0
        for original, result in zip(images.numpy(), augmented, strict=True):
            if np.allclose(result, mirror(original), atol=1e-5):
                flipped += 1
            else:
                assert np.allclose(result, original, atol=1e-5)
        assert 0 < flipped < len(augmented)  # a coin per image, not per batch


def test_rotation_shear_and_zoom_pivot_on_the_image_centre():
    """A disc in the middle stays in the middle, however it is rotated, sheared or zoomed; a pivot even
    half a pixel off would move it."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    centre = (SIZE - 1) / 2.0
    disc = ((xs - centre) ** 2 + (ys - centre) ** 2 <= 6.0**2).astype(np.float32)
    images = tf.constant(np.repeat(disc[None, :, :, None], 16, axis=0).repeat(3, axis=-1))
    spin = replace(AugmentationConfig.disabled(), rotation_degrees=180.0, shear_degrees=10.0, zoom=0.2, fill_mode="constant")
    result = build_batch_augmenter(spin)(images, tf.constant([5, 6], tf.int64)).numpy()[..., 0]
    mass = result.sum(axis=(1, 2))
    centroid_x = (result * xs).sum(axis=(1, 2)) / mass
    centroid_y = (result * ys).sum(axis=(1, 2)) / mass
    assert np.abs(centroid_x - centre).max() < 0.1 and np.abs(centroid_y - centre).max() < 0.1
    assert not np.allclose(result, disc)  # it did zoom/shear the disc


def test_brightness_jitter_shifts_each_image_by_one_bounded_amount():
    images = _batch((0, 1, 2, 0, 1, 2)) * 0.5 + 0.25  # keep away from the clipping bounds
    config = replace(AugmentationConfig.disabled(), brightness=0.1)
    result = build_batch_augmenter(config)(images, tf.constant([9, 9], tf.int64)).numpy()
    shifts = (result - images.numpy()).reshape(len(result), -1)
    assert np.allclose(shifts, shifts[:, :1], atol=1e-5)
    assert np.abs(shifts[:, 0]).max() <= 0.1 + 1e-6
    assert len(np.unique(np.round(shifts[:, 0], 5))) == len(result)


def test_hue_and_saturation_jitter_keep_luma_and_leave_greys_grey():
    from hema_pipeline.datasets.augmentation import RGB_TO_YIQ

    coloured = _batch((0, 1, 2, 0, 1, 2)) * 0.6 + 0.2
    grey = tf.repeat(tf.reduce_mean(coloured, axis=-1, keepdims=True), 3, axis=-1)
    config = replace(AugmentationConfig.disabled(), saturation=0.5, hue=0.2)
    augment = build_batch_augmenter(config)
    seed = tf.constant([7, 8], tf.int64)
    jittered = augment(coloured, seed).numpy()
    luma = RGB_TO_YIQ[0].astype(np.float32)
    assert np.allclose(jittered @ luma, coloured.numpy() @ luma, atol=1e-4)
    assert np.abs(jittered - coloured.numpy()).max() > 0.05  # the colours did change
    assert np.allclose(augment(grey, seed).numpy(), grey.numpy(), atol=1e-4)


def test_invalid_augmentation_ranges_are_refused():
    with pytest.raises(ValueError):
        AugmentationConfig(zoom=1.0)
    with pytest.raises(ValueError):
        AugmentationConfig(brightness=-0.1)
    with pytest.raises(ValueError):
        AugmentationConfig(fill_mode="mirror")  # type: ignore[arg-type]


def _content_addressed(store, image: Image.Image) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    key = f"images/{sha[:2]}/{sha}.jpg"
    store.put_bytes(key, data)
    return key, data


def test_s3_images_are_cached_locally_incrementally_and_verified(s3_endpoint, tmp_path):
    bucket = f"hema-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    store = open_object_store(f"s3://{bucket}/lake", endpoint_url=s3_endpoint)
    stored = [_content_addressed(store, class_image(index % 3, index)) for index in range(6)]
    keys = [key for key, _ in stored]
    cache = tmp_path / "cache"

    paths = resolve_local_image_paths(store, keys, cache)
    assert [path.read_bytes() for path in paths] == [data for _, data in stored]
    assert all(path.is_relative_to(cache) for path in paths)
    for key in keys:  # a second sync reads nothing from the store
        store.delete(key)
    assert materialise_local_image_cache(store, keys, cache) == paths

    # An object whose bytes do not match the hash in its key never enters the cache.
    good_key, _ = _content_addressed(store, class_image(0, 99))
    corrupt_key = good_key.replace(good_key.split("/")[-1][:8], "00000000")
    store.put_bytes(corrupt_key, b"not the image")
    with pytest.raises(ImageCacheError, match="does not match"):
        materialise_local_image_cache(store, [corrupt_key], cache)
    assert not any(path.name.startswith("00000000") for path in cache.rglob("*"))

    dataset = evaluation_dataset([str(path) for path in paths], [index % 3 for index in range(6)], image_size=SIZE)
    assert sum(int(labels.shape[0]) for _, labels in dataset) == 6


def test_local_store_images_are_read_in_place(tmp_path):
    store = LocalObjectStore(tmp_path / "lake")
    keys = [_content_addressed(store, class_image(1, index))[0] for index in range(3)]
    cache = tmp_path / "cache"
    paths = resolve_local_image_paths(store, keys, cache)
    assert paths == [store.local_path(key) for key in keys]
    assert not cache.exists()
    with pytest.raises(FileNotFoundError, match="1 images missing"):
        resolve_local_image_paths(store, [*keys, "images/ab/" + "a" * 64 + ".jpg"], cache)


def test_split_inputs_pick_one_split_in_cell_order():
    import pandas as pd

    manifest = pd.DataFrame(
        {
            "cell_uid": ["c3", "c1", "c2", "c4"],
            "image_key": ["k3", "k1", "k2", "k4"],
            "label_index": [2, 0, 1, 0],
            "split": ["train", "train", "test", "train"],
        }
    )
    paths = {key: Path("/images") / f"{key}.jpg" for key in manifest["image_key"]}
    assert split_inputs(manifest, "train", paths) == (["/images/k1.jpg", "/images/k3.jpg", "/images/k4.jpg"], [0, 2, 0])


@pytest.mark.shared_data
def test_real_pbc_images_flow_through_both_pipelines():
    root = require_pbc()
    folders = sorted(PBC_FOLDER_TO_CLASS)
    paths, labels = [], []
    for label, folder in enumerate(folders):
        found = sorted((root / folder).glob("*.jpg"))[:2]
        if len(found) < 2:
            pytest.skip(f"fewer than two PBC images in {root / folder}")
        paths += [str(path) for path in found]
        labels += [label, label]
    images, seen = next(iter(evaluation_dataset(paths, labels, image_size=64, batch_size=len(paths))))
    assert tuple(images.shape) == (16, 64, 64, 3)
    assert seen.numpy().tolist() == labels
    # May-Grünwald-Giemsa smears: a light background with a darker, bluish-purple nucleus
    means = images.numpy().mean(axis=(1, 2))
    assert (means.mean(axis=1) > 0.4).all() and (means.mean(axis=1) < 0.95).all()
    assert (images.numpy().min(axis=(1, 2, 3)) < 0.45).all()  # every crop shows a stained cell

    stream = training_stream(paths, labels, num_classes=len(folders), image_size=64, batch_size=8, seed=1)
    batch_images, batch_labels = next(iter(stream.dataset))
    assert tuple(batch_images.shape) == (8, 64, 64, 3)
    assert set(batch_labels.numpy().tolist()) <= set(range(len(folders)))
