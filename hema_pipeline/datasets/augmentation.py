"""On-the-fly augmentation for training batches: geometry (rotation, shift, shear, zoom, flips) and
colour / stain jitter (brightness, contrast, saturation, hue).

Augmentation runs inside ``tf.data`` on whole batches, after the decoded images are cached, and only for
the training split: augmenting before splitting (or storing augmented copies) puts near-copies of one
cell on both sides of the split, the leak behind the too-good scores of some public blood-cell sets.

Geometry is one affine resampling per image (all geometric parameters composed into a single matrix and
applied with ``ImageProjectiveTransformV3``): one interpolation blurs less and costs less than a chain of
Keras preprocessing layers that each resample. Colour is per-image arithmetic: contrast around each
channel's mean, a brightness offset, and saturation and hue as one 3x3 matrix on the YIQ chroma plane
(stain colour varies in hue and intensity between smears; luma, which carries the morphology, is kept).
Random values come from stateless ops seeded per batch, so a training stream with a fixed seed is
reproducible.

TensorFlow is imported inside ``build_batch_augmenter`` only: the config is part of dataset versioning,
which must stay importable without TensorFlow's ~3 s import.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

FillMode = Literal["reflect", "nearest", "constant", "wrap"]

# NTSC RGB -> YIQ: luma Y and the two chroma axes I, Q. Hue and saturation jitter act on (I, Q) only.
RGB_TO_YIQ: Final = np.array(
    [
        [0.299, 0.587, 0.114],
        [0.595716, -0.274453, -0.321263],
        [0.211456, -0.522591, 0.311135],
    ]
)


@dataclass(frozen=True)
class AugmentationConfig:
    """Ranges of the random transformations; 0 (or False) switches one off.

    Defaults suit CellaVision crops (cell centred, plasma and red cells around it): a cell has no natural
    orientation, so any rotation and both flips keep its label; shift, shear and zoom stay small because
    cell size and shape are diagnostic (small lymphocyte versus monocyte); colour jitter imitates
    stain-to-stain and lamp variation between smears and analysers.
    """

    rotation_degrees: float = 180.0  # uniform in [-r, r]
    width_shift: float = 0.08  # fraction of the width, uniform in [-s, s]
    height_shift: float = 0.08
    shear_degrees: float = 8.0
    zoom: float = 0.10  # scale uniform in [1 - z, 1 + z], same on both axes: no stretching of cell shape
    horizontal_flip: bool = True
    vertical_flip: bool = True
    brightness: float = 0.08  # added to [0, 1] pixel values, uniform in [-b, b]
    contrast: float = 0.15  # factor uniform in [1 - c, 1 + c] around each channel's mean
    saturation: float = 0.15  # chroma factor uniform in [1 - s, 1 + s]
    hue: float = 0.02  # hue rotation as a fraction of the full circle, uniform in [-h, h]
    fill_mode: FillMode = "reflect"  # reflected background looks like more plasma and red cells

    def __post_init__(self) -> None:
        for name in (
            "rotation_degrees",
            "width_shift",
            "height_shift",
            "shear_degrees",
            "zoom",
            "brightness",
            "contrast",
            "saturation",
            "hue",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"augmentation {name} must not be negative")
        if self.zoom >= 1 or self.contrast >= 1 or self.saturation >= 1:
            raise ValueError("zoom, contrast and saturation ranges must be below 1 (a factor of 0 or less destroys the image)")
        if self.hue > 0.5 or self.shear_degrees >= 90:
            raise ValueError("hue must be at most 0.5 and shear below 90 degrees")
        if self.fill_mode not in ("reflect", "nearest", "constant", "wrap"):
            raise ValueError(f"unknown fill mode {self.fill_mode!r}")

    @classmethod
    def disabled(cls) -> AugmentationConfig:
        return cls(
            rotation_degrees=0.0,
            width_shift=0.0,
            height_shift=0.0,
            shear_degrees=0.0,
            zoom=0.0,
            horizontal_flip=False,
            vertical_flip=False,
            brightness=0.0,
            contrast=0.0,
            saturation=0.0,
            hue=0.0,
        )

    @property
    def changes_geometry(self) -> bool:
        return bool(
            self.rotation_degrees
            or self.width_shift
            or self.height_shift
            or self.shear_degrees
            or self.zoom
            or self.horizontal_flip
            or self.vertical_flip
        )

    @property
    def changes_colour(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation or self.hue)

    @property
    def is_identity(self) -> bool:
        return not (self.changes_geometry or self.changes_colour)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentationConfig:
        return cls(**values)


def _uniform(shape: Any, seed: tf.Tensor, bound: float) -> tf.Tensor:
    import tensorflow as tf

    return tf.random.stateless_uniform(shape, seed=seed, minval=-bound, maxval=bound, dtype=tf.float32)


def _random_sign(shape: Any, seed: tf.Tensor) -> tf.Tensor:
    import tensorflow as tf

    draw = tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)
    return tf.where(draw < 0.5, -1.0, 1.0)


def build_batch_augmenter(config: AugmentationConfig) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A graph-compatible ``augment(images, seed)``: ``images`` float32 [batch, height, width, 3] in [0, 1],
    ``seed`` int64 [2] (distinct per batch); returns the augmented batch, same shape, clipped to [0, 1].
    Every image in the batch gets its own random parameters."""
    import tensorflow as tf

    rgb_to_yiq = tf.constant(RGB_TO_YIQ, tf.float32)
    yiq_to_rgb = tf.constant(np.linalg.inv(RGB_TO_YIQ), tf.float32)

    def geometric(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(images)
        batch, height, width = shape[0], shape[1], shape[2]
        h = tf.cast(height, tf.float32)
        w = tf.cast(width, tf.float32)
        seeds = tf.random.experimental.stateless_split(seed, num=7)
        angle = _uniform([batch], seeds[0], math.radians(config.rotation_degrees))
        shear = _uniform([batch], seeds[1], math.radians(config.shear_degrees))
        inverse_scale = 1.0 / (1.0 + _uniform([batch], seeds[2], config.zoom))
        shift_x = _uniform([batch], seeds[3], config.width_shift) * w
        shift_y = _uniform([batch], seeds[4], config.height_shift) * h
        flip_x = _random_sign([batch], seeds[5]) if config.horizontal_flip else tf.ones([batch])
        flip_y = _random_sign([batch], seeds[6]) if config.vertical_flip else tf.ones([batch])

        # The op maps each output pixel to the input pixel it samples: input = c + M (output - c) + shift,
        # with M = flip . rotation . shear . 1/zoom about the image centre c. The distributions are
        # symmetric, so sampling the inverse transform is the same as sampling the forward one.
        cos, sin = tf.cos(angle), tf.sin(angle)
        shear_x, shear_y = -tf.sin(shear), tf.cos(shear)
        # rotation . shear, written out ([[cos, -sin], [sin, cos]] @ [[1, shear_x], [0, shear_y]])
        m00 = cos * inverse_scale * flip_x
        m01 = (cos * shear_x - sin * shear_y) * inverse_scale * flip_x
        m10 = sin * inverse_scale * flip_y
        m11 = (sin * shear_x + cos * shear_y) * inverse_scale * flip_y
        centre_x = (w - 1.0) / 2.0
        centre_y = (h - 1.0) / 2.0
        offset_x = centre_x - m00 * centre_x - m01 * centre_y + shift_x
        offset_y = centre_y - m10 * centre_x - m11 * centre_y + shift_y
        zeros = tf.zeros([batch])
        transforms = tf.stack([m00, m01, offset_x, m10, m11, offset_y, zeros, zeros], axis=1)
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=tf.stack([height, width]),
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode=config.fill_mode.upper(),
        )

    def colour(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        batch = tf.shape(images)[0]
        seeds = tf.random.experimental.stateless_split(seed, num=4)
        per_image = [batch, 1, 1, 1]
        if config.contrast:
            means = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
            images = (images - means) * (1.0 + _uniform(per_image, seeds[0], config.contrast)) + means
        if config.brightness:
            images = images + _uniform(per_image, seeds[1], config.brightness)
        if config.saturation or config.hue:
            # Saturation scales and hue rotates the chroma plane (I, Q) of YIQ, leaving luma (Y) alone: one
            # 3x3 matrix per image, a tenth of the cost of an HSV round trip.
            angle = _uniform([batch], seeds[2], 2.0 * math.pi * config.hue)
            scale = 1.0 + _uniform([batch], seeds[3], config.saturation)
            cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
            ones, zeros = tf.ones([batch]), tf.zeros([batch])
            chroma = tf.reshape(tf.stack([ones, zeros, zeros, zeros, cos, -sin, zeros, sin, cos], axis=1), [batch, 3, 3])
            mixing = tf.matmul(tf.matmul(yiq_to_rgb[None], chroma), rgb_to_yiq[None])
            images = tf.einsum("bhwc,bdc->bhwd", images, mixing)
        return images

    def augment(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        geometry_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
        if config.changes_geometry:
            images = geometric(images, geometry_seed)
        if config.changes_colour:
            images = colour(images, colour_seed)
        return tf.clip_by_value(images, 0.0, 1.0)

    return augment
