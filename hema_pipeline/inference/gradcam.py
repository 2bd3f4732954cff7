"""Grad-CAM (Selvaraju et al. 2017): where in a cell image the model looked for a class.

The class score is the class's logit (before softmax, as in the paper); each channel of the last
convolutional feature map is weighted by the spatial mean of the score's gradient, and the ReLU of the
weighted sum is the map. The map is shown over the original image, strongest where the model looked, so a
technologist reviewing a referred cell sees the cell itself where the model did not look.
"""

from __future__ import annotations

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
        name = last_conv_layer or classifier.card.last_conv_layer
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

        @tf.function(reduce_retracing=True)
        def maps(images: tf.Tensor, class_indices: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                activations, logits = gradient_model(images, training=False)
                activations = tf.cast(activations, tf.float32)
                logits = tf.cast(logits, tf.float32)
                chosen = tf.argmax(logits, axis=1, output_type=tf.int32) if class_indices is None else class_indices
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
        model_input = tf.convert_to_tensor(self.classifier.model_input(images))
        classes = None
        if class_indices is not None:
            classes = tf.constant(list(class_indices), tf.int32)
            if classes.shape[0] != model_input.shape[0]:
                raise ValueError(f"{classes.shape[0]} class indices for {model_input.shape[0]} images")
            count = len(self.classifier.card.class_names)
            if not all(0 <= index < count for index in class_indices):
                raise ValueError(f"class indices must be within [0, {count})")
        cams, chosen, logits = self._maps(model_input, classes)
        return GradCamMaps(cams.numpy(), chosen.numpy(), logits.numpy())

    def png(self, image: ImageSource, class_name: str | None = None, opacity: float = DEFAULT_OVERLAY_OPACITY) -> bytes:
        """The map for one encoded image (JPEG/PNG bytes or path), for ``class_name`` or the predicted
        class, over the image at its own resolution, as PNG bytes."""
        card = self.classifier.card
        class_indices = None if class_name is None else [list(card.class_names).index(class_name)]
        result = self.maps(prepare_images([image], card.input_size), class_indices)
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        original = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8).numpy()
        return encode_png(overlay_heatmap(original, result.heatmaps[0], opacity))


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, opacity: float = DEFAULT_OVERLAY_OPACITY) -> np.ndarray:
    """``heatmap`` (values in [0, 1], any resolution) upsampled to ``image`` (uint8 [h, w, 3]) and
    blended in proportion to its value: hot regions are coloured, cold ones keep the original pixels."""
    import matplotlib  # only for its colour maps; pyplot is never imported here

    if not 0.0 <= opacity <= 1.0:
        raise ValueError("opacity must be in [0, 1]")
    height, width = image.shape[:2]
    upsampled = tf.image.resize(heatmap[..., None].astype(np.float32), [height, width], method="bilinear").numpy()[..., 0]
    upsampled = np.clip(upsampled, 0.0, 1.0)
    colours = np.asarray(matplotlib.colormaps[HEATMAP_COLOURMAP](upsampled))[..., :3] * 255.0
    weight = (opacity * upsampled)[..., None]
    blended = (1.0 - weight) * image.astype(np.float64) + weight * colours
    return np.asarray(np.clip(np.round(blended), 0, 255), dtype=np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
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
