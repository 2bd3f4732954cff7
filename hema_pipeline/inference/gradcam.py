"""Grad-CAM (Selvaraju et al. 2017): where in a cell image the model looked for a class.

The class score is the class's logit (before softmax, as in the paper); each channel of the last
convolutional feature map is weighted by the spatial mean of the score's gradient, and the ReLU of the
weighted sum is the map. The map is shown over the original image, strongest where the model looked, so a
technologist reviewing a referred cell sees the cell itself where the model did not look.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from hema_pipeline.inference.predict import CellClassifier, ImageSource, prepare_images

DEFAULT_OVERLAY_OPACITY = 0.5
HEATMAP_COLOURMAP = "jet"


@dataclass(frozen=True)
class GradCamMaps:
    heatmaps: np.ndarray  # [n, h, w] float32 in [0, 1] at the feature map's resolution; all 0 where no evidence
    class_indices: np.ndarray  # [n] the class each map explains
    logits: np.ndarray  # [n, classes]


def _nested_models_holding(model: keras.Model, layer_name: str) -> list[str]:
    holders = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if any(inner.name == layer_name for inner in layer.layers) or _nested_models_holding(layer, layer_name):
                holders.append(layer.name)
    return holders


class GradCam:
    """Grad-CAM for one model, built once: a sub-model with outputs [last conv activations, logits]
    over the same weights, and a compiled gradient pass reused for every batch."""

    def __init__(self, classifier: CellClassifier, last_conv_layer: str | None = None) -> None:
        self.classifier = classifier
        model = classifier.model
        name = last_conv_layer or classifier.contract.last_conv_layer
        try:
            layer = model.get_layer(name)
        except ValueError:
            nested = _nested_models_holding(model, name)
            where = (
                f"; it is inside the nested model(s) {nested}: build the network with the backbone's layers in the "
                "outer graph (call the application on a tensor, as networks.build_model does)"
                if nested
                else ""
            )
            raise ValueError(f"model {model.name!r} has no layer {name!r}{where}") from None
        if len(layer.output.shape) != 4:
            raise ValueError(f"layer {name!r} outputs shape {layer.output.shape}; Grad-CAM needs a spatial [b, h, w, c] map")
        self.last_conv_layer = name
        gradient_model = keras.Model(model.inputs, [layer.output, model.outputs[0]], name=f"{model.name}_gradcam")

        size = classifier.contract.input_size

        # One trace per model: any batch size, and class index -1 meaning "the predicted class".
        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32), tf.TensorSpec([None], tf.int32)])
        def maps(images: tf.Tensor, class_indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                activations, logits = gradient_model(images, training=False)
                activations = tf.cast(activations, tf.float32)
                logits = tf.cast(logits, tf.float32)
                predicted = tf.argmax(logits, axis=1, output_type=tf.int32)
                chosen = tf.where(class_indices < 0, predicted, class_indices)
                # The maps of a batch are independent (inference mode), so one gradient of the summed
                # scores gives each image's own gradient.
                scores = tf.gather(logits, chosen, axis=1, batch_dims=1)
            gradients = tape.gradient(scores, activations)
            channel_weights = tf.reduce_mean(gradients, axis=[1, 2])
            cams = tf.nn.relu(tf.einsum("bhwc,bc->bhw", activations, channel_weights))
            peaks = tf.reduce_max(cams, axis=[1, 2], keepdims=True)
            cams = tf.math.divide_no_nan(cams, peaks)
            return cams, chosen, logits

        self._maps = maps

    def maps(self, images: np.ndarray, class_indices: Sequence[int] | None = None) -> GradCamMaps:
        """Maps for uint8 images ``[n, input_size, input_size, 3]`` (``predict.prepare_images``), for
        ``class_indices`` or, without them, each image's predicted class."""
        model_input = tf.convert_to_tensor(self.classifier.model_input(images), tf.float32)
        classes = tf.fill([model_input.shape[0]], -1)
        if class_indices is not None:
            classes = tf.constant(list(class_indices), tf.int32)
            if classes.shape[0] != model_input.shape[0]:
                raise ValueError(f"{classes.shape[0]} class indices for {model_input.shape[0]} images")
            count = len(self.classifier.contract.class_names)
            if not all(0 <= index < count for index in class_indices):
                raise ValueError(f"class indices must be within [0, {count})")
        cams, chosen, logits = self._maps(model_input, classes)
        return GradCamMaps(cams.numpy(), chosen.numpy(), logits.numpy())

    def png(self, image: ImageSource, class_name: str | None = None, opacity: float = DEFAULT_OVERLAY_OPACITY) -> bytes:
        """The map for one encoded image (JPEG/PNG bytes or path), for ``class_name`` or the predicted
        class, over the image at its own resolution, as PNG bytes."""
        return self.pngs([image], None if class_name is None else [class_name], opacity)[0]

    def pngs(
        self,
        images: Sequence[ImageSource],
        class_names: Sequence[str] | None = None,
        opacity: float = DEFAULT_OVERLAY_OPACITY,
        batch_size: int = 64,
    ) -> list[bytes]:
        """``png`` for many images, with the gradient pass batched (a smear's referred cells at once)."""
        contract = self.classifier.contract
        names = list(contract.class_names)
        if class_names is not None and len(class_names) != len(images):
            raise ValueError(f"{len(class_names)} class names for {len(images)} images")
        pngs: list[bytes] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            indices = None if class_names is None else [names.index(name) for name in class_names[start : start + batch_size]]
            result = self.maps(prepare_images(chunk, contract.input_size, contract.crop_fraction), indices)
            for image, heatmap in zip(chunk, result.heatmaps, strict=True):
                data = image if isinstance(image, bytes) else Path(image).read_bytes()
                original = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8).numpy()
                pngs.append(encode_png(overlay_on_seen_region(original, heatmap, contract.crop_fraction, opacity)))
        return pngs


def overlay_on_seen_region(
    image: np.ndarray, heatmap: np.ndarray, crop: float, opacity: float = DEFAULT_OVERLAY_OPACITY
) -> np.ndarray:
    """``overlay_heatmap`` over the part of ``image`` the network saw: the centred square of ``crop`` of
    the shortest side that ``decode_and_resize`` keeps (all of the image at 1.0); the rest is unchanged."""
    if crop >= 1.0:
        return overlay_heatmap(image, heatmap, opacity)
    height, width = image.shape[:2]
    side = max(1, int(min(height, width) * crop))
    top, left = (height - side) // 2, (width - side) // 2
    overlaid = image.copy()
    overlaid[top : top + side, left : left + side] = overlay_heatmap(
        image[top : top + side, left : left + side], heatmap, opacity
    )
    return overlaid


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, opacity: float = DEFAULT_OVERLAY_OPACITY) -> np.ndarray:
    """``heatmap`` (values in [0, 1], any resolution) upsampled to ``image`` (uint8 [h, w, 3]) and
    blended in proportion to its value: hot regions are coloured, cold ones keep the original pixels."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError("opacity must be in [0, 1]")
    height, width = image.shape[:2]
    upsampled = tf.image.resize(heatmap[..., None].astype(np.float32), [height, width], method="bilinear").numpy()[..., 0]
    upsampled = np.clip(upsampled, 0.0, 1.0)
    # The colour map as a 256-entry table: the same colours as evaluating it per pixel, at a fraction of the cost.
    colours = _colour_table()[np.round(upsampled * 255.0).astype(np.uint8)]
    weight = (np.float32(opacity) * upsampled)[..., None]
    blended = (1.0 - weight) * image.astype(np.float32) + weight * colours
    return np.asarray(np.clip(np.round(blended), 0, 255), dtype=np.uint8)


@functools.cache
def _colour_table() -> np.ndarray:
    import matplotlib  # only for its colour maps; pyplot is never imported here

    return (np.asarray(matplotlib.colormaps[HEATMAP_COLOURMAP](np.linspace(0.0, 1.0, 256)))[:, :3] * 255.0).astype(np.float32)


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Level 1: a review aid is written once per referred cell and read a few times; at PIL's default
    # (6) encoding took ~47 ms per 360x363 map, the slowest step of a smear's predictions.
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def gradcam_object_key(model_version: str, cell_uid: str) -> str:
    """Where a cell's Grad-CAM PNG goes in the object store (the predictions table's gradcam_key): one
    folder per model version and smear, so a new model never overwrites an old model's maps."""
    smear_id, separator, cell_id = cell_uid.partition(":")
    if not separator or not smear_id or not cell_id.isdigit():
        raise ValueError(f"{cell_uid!r} is not a cell_uid ('<smear_id>:<cell number>')")
    if not model_version or "/" in model_version:
        raise ValueError(f"invalid model version {model_version!r}")
    return f"gradcam/{model_version}/{smear_id}/{cell_id}.png"
