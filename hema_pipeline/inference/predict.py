"""Batch prediction of cell images: calibrated probabilities, energy OOD scores and referral decisions.

Images (encoded JPEG/PNG bytes or file paths) are decoded and resized by a parallel ``tf.data``
pipeline and run through a ``tf.function``-compiled forward pass in batches; the model outputs logits and
everything after them (temperature, energy, thresholds) is computed here in float64 from those logits,
with the same functions calibration used to fit the thresholds (``hema_pipeline.modeling.calibration``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from hema_pipeline.datasets.input_pipeline import decode_and_resize
from hema_pipeline.inference.routing import (
    PREDICTION_COLUMNS,
    Route,
    cells_to_route,
    validate_routes,
)
from hema_pipeline.modeling.calibration import softmax
from hema_pipeline.modeling.contract import ACCEPTED, ModelContract
from hema_pipeline.modeling.networks import view_averaged

DEFAULT_BATCH_SIZE = 64

ImageSource = bytes | str | os.PathLike[str]
ProgressCallback = Callable[[int], None]  # called with the number of images in each finished batch

# The networks' input rescaling layer (hema_pipeline.modeling.networks.build_model):
# Rescaling(scale=2 / pixel_range, offset=-1), so the pixel range a model was trained on can be read back.
_PIXEL_SCALING_LAYER = "pixel_scaling"


def model_pixel_range(model: keras.Model) -> float | None:
    """The input range [0, r] a model built by ``networks.build_model`` expects, from its rescaling layer;
    None for a model without one."""
    try:
        layer = model.get_layer(_PIXEL_SCALING_LAYER)
    except ValueError:
        return None
    return 2.0 / float(layer.scale)


class FeatureOodScorer(Protocol):
    """A feature-space OOD score, higher is less familiar (``modeling.ood.MahalanobisScorer``)."""

    def score(self, features: np.ndarray) -> np.ndarray: ...


class CellClassifier:
    """A model with its contract and a compiled forward pass, built once and reused for every batch.

    Input pixels are scaled to the range the model was trained on: the contract's, else the range its
    ``pixel_scaling`` layer was built for, else 255 (the networks' default). Feeding [0, 255] to a model
    trained on [0, 1] runs without error and predicts nonsense, so this is never guessed from the images.

    A contract whose ``ood_threshold`` is on a feature-space score (``ood_method`` "mahalanobis") needs that
    score's ``feature_scorer`` (the registry stores it as an attachment of the model); the forward pass
    then also returns the contract's features layer."""

    def __init__(self, model: keras.Model, contract: ModelContract, feature_scorer: FeatureOodScorer | None = None) -> None:
        outputs = int(model.outputs[0].shape[-1])
        if outputs != len(contract.class_names):
            raise ValueError(
                f"model {contract.model_version} outputs {outputs} logits but its card names {len(contract.class_names)} classes"
            )
        input_shape = tuple(model.inputs[0].shape[1:3])
        if None not in input_shape and input_shape != (contract.input_size, contract.input_size):
            raise ValueError(f"model {contract.model_version} takes {input_shape} images, its card says {contract.input_size}")
        method = contract.ood_method
        if method not in (None, "energy") and feature_scorer is None:
            raise ValueError(
                f"model {contract.model_version}: its OOD threshold is on {method!r} scores; pass that feature_scorer"
            )
        if method in (None, "energy") and feature_scorer is not None:
            raise ValueError(
                f"model {contract.model_version}: a feature_scorer was given but its card scores {method or 'no'} OOD"
            )
        self.model = model
        self.contract = contract
        self.feature_scorer = feature_scorer
        pixel_range = contract.pixel_range or model_pixel_range(model)
        self.pixel_range = float(pixel_range if pixel_range is not None else 255.0)
        size = contract.input_size
        pixel_scale = self.pixel_range / 255.0
        network = model
        if feature_scorer is not None:
            network = keras.Model(model.inputs, [model.outputs[0], model.get_layer(contract.features_layer).output])

        # Logits (and features) are the mean over the dihedral views the contract's thresholds were fitted on.
        views = contract.test_time_views

        # A fixed signature traces once; the last, smaller batch does not retrace.
        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        def forward(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            outputs = view_averaged(network, tf.cast(images, tf.float32) * pixel_scale, views)
            if feature_scorer is None:
                return outputs, tf.zeros([tf.shape(images)[0], 0], tf.float32)
            logits, features = outputs
            return logits, features

        self._forward = forward

    def outputs(self, images: tf.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, features) for uint8 images ``[n, input_size, input_size, 3]``; features are
        ``[n, 0]`` unless a feature scorer needs them."""
        logits, features = self._forward(tf.convert_to_tensor(images, tf.uint8))
        return np.asarray(logits.numpy()), np.asarray(features.numpy())

    def logits(self, images: tf.Tensor | np.ndarray) -> np.ndarray:
        """Logits for uint8 images ``[n, input_size, input_size, 3]`` (as ``prepare_images`` returns)."""
        return self.outputs(images)[0]

    def ood_scores(self, logits: np.ndarray, features: np.ndarray) -> np.ndarray | None:
        """The score the contract's ood_threshold applies to, or None when it has none."""
        if self.contract.ood_threshold is None:
            return None
        if self.feature_scorer is not None:
            return np.asarray(self.feature_scorer.score(features), np.float64)
        return self.contract.energy(logits)

    def model_input(self, images: np.ndarray) -> np.ndarray:
        """uint8 images as the model receives them (float32 in [0, pixel_range]), for Grad-CAM."""
        return np.asarray(images, np.float32) * np.float32(self.pixel_range / 255.0)


@dataclass(frozen=True)
class UnreadableImage:
    cell_key: str
    reason: str


class UnreadableImagesError(RuntimeError):
    def __init__(self, failures: Sequence[UnreadableImage]) -> None:
        self.failures = tuple(failures)
        listed = "; ".join(f"{failure.cell_key}: {failure.reason}" for failure in self.failures[:10])
        more = f" (and {len(self.failures) - 10} more)" if len(self.failures) > 10 else ""
        super().__init__(f"{len(self.failures)} image(s) could not be read: {listed}{more}")


# ---------------------------------------------------------------------------------------------------
# Maths on logits


def calibrated_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T), in float64 so confidences near 1 keep their precision."""
    return softmax(np.asarray(logits, np.float64), temperature)


def prediction_frame(
    logits: np.ndarray, contract: ModelContract, cell_keys: Sequence[str], ood_scores: np.ndarray | None = None
) -> pd.DataFrame:
    """The prediction table (``routing.PREDICTION_COLUMNS``) for logits in the contract's class order,
    triaged by ``ModelContract.triage`` (the rule calibration certified). ``ood_scores``
    (``CellClassifier.ood_scores``) default to the energy, the default OOD score."""
    class_names = list(contract.class_names)
    probabilities = calibrated_probabilities(logits, contract.temperature)
    energy = contract.energy(logits)
    if contract.ood_threshold is None:
        ood_scores = None  # no threshold, no score: the column is NaN whatever a caller computed
    elif ood_scores is None and contract.ood_method == "energy":
        ood_scores = energy
    triage = contract.triage(logits, ood_scores)
    decisions = triage.decisions
    frame = pd.DataFrame(
        {
            "cell_key": list(cell_keys),
            "task": contract.task,
            "model_version": contract.model_version,
            "predicted_class": [class_names[index] for index in triage.predicted],
            "confidence": triage.confidence,
            "energy": energy,
            "ood_score": np.full(len(energy), np.nan) if ood_scores is None else np.asarray(ood_scores, np.float64),
            "accepted": decisions == ACCEPTED,
            "referral_reason": pd.Series(
                [None if decision == ACCEPTED else str(decision) for decision in decisions], dtype=object
            ),
            "probabilities": [dict(zip(class_names, row, strict=True)) for row in probabilities.tolist()],
        }
    )
    return frame.loc[:, list(PREDICTION_COLUMNS)]


def probabilities_wide(predictions: pd.DataFrame, class_names: Sequence[str], prefix: str = "p_") -> pd.DataFrame:
    """One ``<prefix><class>`` column per class, from the ``probabilities`` dicts of one model's rows."""
    return pd.DataFrame(
        [[row[name] for name in class_names] for row in predictions["probabilities"]],
        columns=[f"{prefix}{name}" for name in class_names],
        index=predictions.index,
    )


# ---------------------------------------------------------------------------------------------------
# Decoding


def _default_keys(images: Sequence[ImageSource]) -> list[str]:
    return [str(index) if isinstance(image, bytes) else os.fspath(image) for index, image in enumerate(images)]


def _image_dataset(images: Sequence[ImageSource], input_size: int, crop: float) -> tf.data.Dataset:
    """(index, uint8 image) pairs; a path is read inside the pipeline, so files are read in parallel too."""
    is_path = [not isinstance(image, bytes) for image in images]
    payloads = [os.fsencode(image) if not isinstance(image, bytes) else image for image in images]

    def load(index: tf.Tensor, path_flag: tf.Tensor, payload: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        data = tf.cond(path_flag, lambda: tf.io.read_file(payload), lambda: payload)
        return index, decode_and_resize(data, input_size, crop)

    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(images), dtype=tf.int64), tf.constant(is_path, tf.bool), tf.constant(payloads, tf.string))
    )
    return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def prepare_images(images: Sequence[ImageSource], input_size: int, crop: float = 1.0) -> np.ndarray:
    """Decoded, cropped and resized uint8 images ``[n, input_size, input_size, 3]``, exactly as the
    training pipeline prepares them (``datasets.input_pipeline.decode_and_resize``; ``crop`` is the contract's
    ``crop_fraction``); eager, for Grad-CAM and checks. An unreadable image raises ``UnreadableImagesError``."""
    arrays = []
    failures = []
    for key, image in zip(_default_keys(images), images, strict=True):
        try:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            arrays.append(decode_and_resize(tf.constant(data), input_size, crop).numpy())
        except (OSError, tf.errors.OpError) as error:
            failures.append(UnreadableImage(key, _failure_reason(error)))
    if failures:
        raise UnreadableImagesError(failures)
    return np.stack(arrays) if arrays else np.zeros((0, input_size, input_size, 3), np.uint8)


_TF_NODE_PREFIX = re.compile(r"^\{\{function_node [^}]*\}\}\s*")
_TF_OP_SUFFIX = re.compile(r"\s*\[Op:[^\]]*\].*$", re.DOTALL)


def _failure_reason(error: BaseException) -> str:
    if isinstance(error, tf.errors.OpError):
        message = _TF_OP_SUFFIX.sub("", _TF_NODE_PREFIX.sub("", error.message)).strip()
        return message or type(error).__name__
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


def _diagnose(image: ImageSource, input_size: int, crop: float) -> str:
    """Why one image failed in the pipeline (which only drops it): redo its steps eagerly for the error."""
    try:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        decode_and_resize(tf.constant(data), input_size, crop)
    except (OSError, tf.errors.OpError) as error:
        return _failure_reason(error)
    return "could not be decoded in the batch pipeline"


# ---------------------------------------------------------------------------------------------------
# Prediction


def predict_readable_images(
    images: Sequence[ImageSource],
    classifier: CellClassifier,
    *,
    cell_keys: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
) -> tuple[pd.DataFrame, list[UnreadableImage]]:
    """Predictions for every image that decodes, in input order, and the images that did not (with the
    reason). ``cell_keys`` name the rows (default: the path, or the position for bytes)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    keys = list(cell_keys) if cell_keys is not None else _default_keys(images)
    if len(keys) != len(images):
        raise ValueError(f"{len(keys)} cell keys for {len(images)} images")
    if len(set(keys)) != len(keys):
        raise ValueError("cell keys must be unique")
    contract = classifier.contract
    if not images:
        return prediction_frame(np.zeros((0, len(contract.class_names))), contract, []), []

    dataset = (
        _image_dataset(images, contract.input_size, contract.crop_fraction)
        # A corrupt image must not end the batch for the others: drop it here, diagnose it below.
        .ignore_errors(log_warning=False)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    seen_indices: list[np.ndarray] = []
    all_logits: list[np.ndarray] = []
    all_features: list[np.ndarray] = []
    for batch_indices, batch_images in dataset:
        logits, features = classifier.outputs(batch_images)
        all_logits.append(logits)
        all_features.append(features)
        seen_indices.append(batch_indices.numpy())
        if on_progress is not None:
            on_progress(len(seen_indices[-1]))

    if seen_indices:
        seen = np.concatenate(seen_indices)
        order = np.argsort(seen, kind="stable")
        seen, logits, features = seen[order], np.concatenate(all_logits)[order], np.concatenate(all_features)[order]
        frame = prediction_frame(logits, contract, [keys[index] for index in seen], classifier.ood_scores(logits, features))
    else:
        seen = np.zeros(0, np.int64)
        frame = prediction_frame(np.zeros((0, len(contract.class_names))), contract, [])

    failed = sorted(set(range(len(images))) - set(seen.tolist()))
    failures = [
        UnreadableImage(keys[index], _diagnose(images[index], contract.input_size, contract.crop_fraction)) for index in failed
    ]
    return frame, failures


def predict_images(
    images: Sequence[ImageSource],
    classifier: CellClassifier,
    *,
    cell_keys: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """Predictions for every image (``routing.PREDICTION_COLUMNS``), in input order.

    Any unreadable image raises ``UnreadableImagesError`` naming all of them: images in the pipeline
    were fully decoded at import, so one that fails now is an integrity problem, not a cell to skip."""
    frame, failures = predict_readable_images(
        images, classifier, cell_keys=cell_keys, batch_size=batch_size, on_progress=on_progress
    )
    if failures:
        raise UnreadableImagesError(failures)
    return frame


def predict_routed(
    images: Sequence[ImageSource],
    classifiers: Mapping[str, CellClassifier],
    primary_task: str,
    routes: Sequence[Route],
    *,
    cell_keys: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> pd.DataFrame:
    """Every image through the primary model, then each route's accepted cells through its specialist
    model. Returns all stages' rows (one per cell and model that saw it, ``routing.PREDICTION_COLUMNS``);
    ``routing.merge_cell_results`` folds them into one row per cell."""
    validate_routes(primary_task, routes, {task: classifier.contract for task, classifier in classifiers.items()})
    keys = list(cell_keys) if cell_keys is not None else _default_keys(images)
    image_by_key = dict(zip(keys, images, strict=True))
    stages = [predict_images(images, classifiers[primary_task], cell_keys=keys, batch_size=batch_size)]
    predicted_by_task: dict[str, set[str]] = {primary_task: set(keys)}
    for route in routes:
        so_far = pd.concat(stages, ignore_index=True)
        already = predicted_by_task.setdefault(route.to_task, set())
        # Two routes into one model (or a cell reached twice) classify each cell once.
        routed = [key for key in cells_to_route(so_far, route) if key not in already]
        if not routed:
            continue
        stages.append(
            predict_images(
                [image_by_key[key] for key in routed], classifiers[route.to_task], cell_keys=routed, batch_size=batch_size
            )
        )
        already.update(routed)
    return pd.concat(stages, ignore_index=True)
