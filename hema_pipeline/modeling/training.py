"""Training a classifier from ``tf.data`` datasets, reproducibly, on a CPU or a GPU.

Inputs are plain: datasets of ``(image, label)`` with images float (or uint8) in ``[0, pixel_range]``
of the architecture and integer labels indexing ``class_names``, batched or not (they are re-batched
here, so the GPU path can use a larger batch). Nothing here knows about Dagster; progress goes to the
``logging`` logger of this module and, one line per epoch, to a caller's ``progress`` function (the
Dagster event log); callers may add their own Keras callbacks.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from hema_pipeline.modeling.networks import (
    ArchitectureConfig,
    build_model,
    combine_members,
    freeze_leading_blocks,
    member_architecture,
    predict_outputs,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FILE_NAME = "best.keras"


@dataclass(frozen=True)
class TrainingRecipe:
    """The schedule measured for a kind of network; what ``TrainingConfig`` fields a caller leaves unset
    take (``recipe_for``)."""

    epochs: int
    learning_rate: float  # peak, for ``TrainingConfig.batch_size``
    early_stopping_patience: int
    frozen_blocks: int = 0  # pretrained networks: the stem and this many leading blocks keep ImageNet's weights


# From scratch, 70 cosine epochs was the measured pbc8 configuration; validation accuracy still swings by
# about a point between late epochs, so patience lets the schedule finish and the best epoch be kept.
FROM_SCRATCH_RECIPE = TrainingRecipe(epochs=70, learning_rate=2e-3, early_stopping_patience=25)
# From ImageNet weights: a quarter of the from-scratch rate and a short schedule. On pbc8 at 128 px this
# gave the best single network measured on the PBC split (98.62%; from scratch 97.75-98.56%) in 44
# minutes of a 2-core CPU (benchmarks/RESULTS.md); longer would not fit that budget.
PRETRAINED_RECIPE = TrainingRecipe(epochs=9, learning_rate=5e-4, early_stopping_patience=9)


def recipe_for(arch: ArchitectureConfig) -> TrainingRecipe:
    return PRETRAINED_RECIPE if arch.pretrained is not None else FROM_SCRATCH_RECIPE


@dataclass(frozen=True)
class TrainingConfig:
    """How to train; recorded whole in the model card. Defaults are the from-scratch recipe; the model
    stage fills epochs, rate and patience from ``recipe_for`` its architecture where not configured."""

    epochs: int = FROM_SCRATCH_RECIPE.epochs
    batch_size: int = 64  # on a CPU
    gpu_batch_size: int = 256  # used instead of batch_size where a GPU is present
    # for batch_size; the GPU batch scales it by sqrt(gpu_batch / batch)
    learning_rate: float = FROM_SCRATCH_RECIPE.learning_rate
    schedule: Literal["cosine", "plateau"] = "cosine"
    warmup_epochs: int = 2  # cosine only: linear warm-up from learning_rate / warmup_epochs
    min_learning_rate_fraction: float = 0.01  # cosine floor, as a fraction of the peak rate
    plateau_factor: float = 0.3
    plateau_patience: int = 3
    weight_decay: float = 1e-4  # AdamW, decoupled; never applied to biases or batch-norm scales
    # 0 by default: label smoothing erases the logit information that post-hoc temperature scaling and
    # the energy OOD score rely on (Müller et al. 2019), and calibration is done afterwards anyway.
    label_smoothing: float = 0.0
    clip_norm: float | None = None
    early_stopping_patience: int = FROM_SCRATCH_RECIPE.early_stopping_patience
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    seed: int = 20260101
    # Pretrained networks only: the stem and this many leading blocks keep their ImageNet weights and
    # batch-norm statistics (they run in inference mode). Those blocks see the full input resolution, so
    # skipping their backward pass is most of a CPU step's cost (``freeze_leading_blocks``).
    frozen_blocks: int = 0
    mixed_precision: Literal["auto", "on", "off"] = "auto"  # auto: on exactly when a GPU is present
    augment: bool = True  # flips/transposes (cells have no orientation) and mild colour jitter
    colour_jitter: float = 0.1  # max relative change of brightness, contrast and per-channel gain
    shuffle_buffer: int = 1024  # images; mixes neighbouring batches of the provider's order

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.gpu_batch_size < 1:
            raise ValueError("epochs and batch sizes must be positive")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("label_smoothing must be in [0, 1)")
        if not 0 <= self.colour_jitter < 1:
            raise ValueError("colour_jitter must be in [0, 1)")
        if self.early_stopping_patience < 1:
            raise ValueError("early_stopping_patience must be at least 1")
        if self.frozen_blocks < 0:
            raise ValueError("frozen_blocks must not be negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingConfig:
        return cls(**values)


@dataclass
class TrainingResult:
    model: keras.Model  # with the best epoch's weights restored
    history: dict[str, list[float]]  # per-epoch metrics (loss, accuracy, val_*, learning_rate)
    epochs_run: int
    seconds: float
    device: Literal["GPU", "CPU"]
    best_val_accuracy: float  # validation accuracy of the restored (best) epoch
    best_epoch: int  # 1-based
    batch_size: int
    learning_rate: float  # peak rate actually used
    mixed_precision: bool
    checkpoint_path: Path


@dataclass
class EnsembleTrainingResult:
    """``arch.ensemble_members`` networks trained one after another, and the model that averages them."""

    model: keras.Model  # combine_members of the members' best-epoch models (the member itself when alone)
    members: list[TrainingResult]
    best_val_accuracy: float  # of ``model`` on the validation set (a lone member's best epoch)
    member_seeds: tuple[int, ...]

    @property
    def seconds(self) -> float:
        return sum(member.seconds for member in self.members)

    @property
    def epochs_run(self) -> int:
        return sum(member.epochs_run for member in self.members)

    @property
    def device(self) -> Literal["GPU", "CPU"]:
        return self.members[0].device

    def member_summaries(self) -> list[dict[str, Any]]:
        return [
            {
                "member": index + 1,
                "seed": int(seed),
                "epochs_run": member.epochs_run,
                "best_epoch": member.best_epoch,
                "best_val_accuracy": member.best_val_accuracy,
                "seconds": round(member.seconds, 1),
            }
            for index, (member, seed) in enumerate(zip(self.members, self.member_seeds, strict=True))
        ]


# A member's training data: (dataset, steps_per_epoch) as train_model takes them, given the member index.
MemberTrainingData = Callable[[int], tuple[tf.data.Dataset, int | None]]


def member_seed(config: TrainingConfig, member: int) -> int:
    """Member 0 keeps the configured seed, so a one-member "ensemble" is exactly the single network."""
    return config.seed + member


def train_ensemble(
    arch: ArchitectureConfig,
    config: TrainingConfig,
    member_training_data: MemberTrainingData,
    val_ds: tf.data.Dataset,
    class_names: Sequence[str],
    checkpoint_dir: str | os.PathLike[str],
    callbacks: Sequence[keras.callbacks.Callback] = (),
    progress: ProgressReport | None = None,
) -> EnsembleTrainingResult:
    """Train ``arch.ensemble_members`` networks of ``member_architecture(arch)`` independently (weight seed
    ``member_seed``, and whatever sample order ``member_training_data`` gives each), each early-stopped
    on the validation set as ``train_model`` does, and combine them into one model averaging their logits.

    Independent members, not one network trained on the averaged output: a jointly trained average lets
    its parts co-adapt and loses most of the variance reduction an ensemble is for."""
    count = arch.ensemble_members
    members: list[TrainingResult] = []
    seeds = tuple(member_seed(config, index) for index in range(count))
    for index, seed in enumerate(seeds):
        if count > 1:
            logger.info("ensemble member %d of %d (seed %d)", index + 1, count, seed)
        train_ds, steps_per_epoch = member_training_data(index)
        members.append(
            train_model(
                member_architecture(arch),
                replace(config, seed=seed),
                train_ds,
                val_ds,
                class_names,
                Path(checkpoint_dir) / f"member{index + 1}",
                callbacks=callbacks,
                steps_per_epoch=steps_per_epoch,
                progress=progress,
                progress_label=f"member {index + 1}/{count}, " if count > 1 else "",
            )
        )
    if count == 1:
        return EnsembleTrainingResult(members[0].model, members, members[0].best_val_accuracy, seeds)
    model = combine_members(arch, [member.model for member in members], mixed_precision=members[0].mixed_precision)
    outputs = predict_outputs(model, val_ds)
    accuracy = float(np.mean(np.argmax(outputs.logits, axis=1) == outputs.labels))
    logger.info(
        "ensemble of %d: validation accuracy %.4f (members %s)",
        count,
        accuracy,
        ", ".join(f"{member.best_val_accuracy:.4f}" for member in members),
    )
    return EnsembleTrainingResult(model, members, accuracy, seeds)


def training_device() -> Literal["GPU", "CPU"]:
    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def balanced_class_weights(label_counts: Sequence[int]) -> list[float]:
    """Weights ``n / (k * n_c)`` so every class contributes equally to the loss (sklearn's "balanced");
    a class without examples gets weight 0 rather than infinity."""
    counts = np.asarray(label_counts, dtype=np.float64)
    total, classes = counts.sum(), len(counts)
    return [float(total / (classes * count)) if count > 0 else 0.0 for count in counts]


def train_model(
    arch: ArchitectureConfig,
    config: TrainingConfig,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    class_names: Sequence[str],
    checkpoint_dir: str | os.PathLike[str],
    class_weights: Sequence[float] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    steps_per_epoch: int | None = None,
    progress: ProgressReport | None = None,
    progress_label: str = "",
) -> TrainingResult:
    """Train a fresh ``arch`` network; return it with the best validation epoch's weights.

    The best model is also checkpointed to ``checkpoint_dir/best.keras`` after every improving epoch,
    so a crashed run leaves its best model behind. Inputs that cannot be right stop it: ``ValueError``
    for a pixel-range or image-size mismatch (checked before training), ``tf.errors.InvalidArgumentError``
    for a label outside ``class_names`` (checked per example as it streams by); a diverged run (NaN
    loss) raises ``RuntimeError`` instead of returning a model.

    ``train_ds`` is either finite (one pass is one epoch; it is shuffled, batched and augmented here) or,
    with ``steps_per_epoch``, an endless stream of ready batches (``hema_pipeline.datasets``'
    ``training_stream``: class-balanced and augmented as the dataset's configuration says, batched at
    ``training_batch_size(config)``), used as it is. The validation set is never shuffled or augmented."""
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError("need at least two classes")
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(f"{len(class_weights)} class weights for {num_classes} classes")
    keras.utils.set_random_seed(config.seed)
    device = training_device()
    mixed_precision = config.mixed_precision == "on" or (config.mixed_precision == "auto" and device == "GPU")
    if mixed_precision and device == "CPU":
        logger.warning("mixed precision requested without a GPU: float16 is slower than float32 on a CPU")
    batch_size = training_batch_size(config)
    # Adam-family optimisers tolerate square-root scaling of the rate with the batch; linear scaling
    # (right for SGD) overshoots early in training.
    learning_rate = config.learning_rate * math.sqrt(batch_size / config.batch_size)

    _check_pixel_range(train_ds, arch.pixel_range)
    if steps_per_epoch is None:
        train_batches = _prepare_dataset(train_ds, arch, config, num_classes, batch_size, class_weights, training=True)
    else:
        if class_weights is not None:
            raise ValueError("a training stream balances classes by sampling; class weights would count twice")

        def to_stream_targets(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            # As in _prepare_dataset: one_hot would silently turn an out-of-range label into zeros.
            with tf.control_dependencies(
                [
                    tf.debugging.assert_non_negative(labels, message="negative label"),
                    tf.debugging.assert_less(labels, num_classes, message="label outside class_names"),
                ]
            ):
                return tf.cast(images, tf.float32), tf.one_hot(labels, num_classes)

        train_batches = train_ds.map(to_stream_targets, num_parallel_calls=tf.data.AUTOTUNE)
    val_batches = _prepare_dataset(val_ds, arch, config, num_classes, batch_size, None, training=False)

    model = build_model(arch, num_classes, mixed_precision=mixed_precision)
    frozen_layers = freeze_leading_blocks(model, arch, config.frozen_blocks)
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=config.weight_decay, clipnorm=config.clip_norm)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        # "auto" turns XLA on only where a GPU is present; on the reference CPU it is 2-10x slower.
        jit_compile="auto",
    )

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE_NAME
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    mode = "max" if config.monitor == "val_accuracy" else "min"
    all_callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.TerminateOnNaN(),
        _schedule_callback(config, learning_rate),
        keras.callbacks.EarlyStopping(
            monitor=config.monitor, mode=mode, patience=config.early_stopping_patience, restore_best_weights=True
        ),
        keras.callbacks.ModelCheckpoint(str(checkpoint_path), monitor=config.monitor, mode=mode, save_best_only=True),
        EpochProgress(config.epochs, progress, progress_label),
        *callbacks,
    ]
    logger.info(
        "training %s (%d parameters, %d layers frozen) on %s: batch %d, peak learning rate %.2g, mixed precision %s",
        arch.name,
        model.count_params(),
        frozen_layers,
        device,
        batch_size,
        learning_rate,
        mixed_precision,
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        # Re-batched datasets have unknown length, so every epoch ends by running out of data, which
        # Keras reports as if it were a mistake.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        fit = model.fit(
            train_batches,
            validation_data=val_batches,
            epochs=config.epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=all_callbacks,
            shuffle=False,  # shuffling happens in the tf.data pipeline
            verbose=0,
        )
    seconds = time.perf_counter() - started

    history = {name: [float(value) for value in values] for name, values in fit.history.items()}
    losses = history.get("loss", [])
    if not losses or not all(math.isfinite(value) for value in losses):
        raise RuntimeError(
            f"training diverged (loss {losses[-1] if losses else 'missing'} at epoch {len(losses)}); "
            "lower the learning rate or set clip_norm"
        )
    monitored = np.asarray(history[config.monitor])
    best_index = int(np.argmax(monitored) if mode == "max" else np.argmin(monitored))
    return TrainingResult(
        model=model,
        history=history,
        epochs_run=len(losses),
        seconds=seconds,
        device=device,
        best_val_accuracy=history["val_accuracy"][best_index],
        best_epoch=best_index + 1,
        batch_size=batch_size,
        learning_rate=learning_rate,
        mixed_precision=mixed_precision,
        checkpoint_path=checkpoint_path,
    )


def training_batch_size(config: TrainingConfig) -> int:
    return config.gpu_batch_size if training_device() == "GPU" else config.batch_size


def _check_pixel_range(dataset: tf.data.Dataset, pixel_range: float) -> None:
    """Catch the silent failure of feeding [0, 1] images to a model that rescales from [0, 255] (or the
    reverse): it trains, badly. One batch is enough to tell."""
    element = next(iter(dataset.take(1)))
    images = element[0] if isinstance(element, tuple) else element
    brightest = float(tf.reduce_max(tf.cast(images, tf.float32)))
    if brightest > pixel_range * 1.001:
        raise ValueError(f"images reach {brightest:.3g} but the architecture expects [0, {pixel_range:g}]")
    if pixel_range > 1.5 and brightest <= 1.0:
        raise ValueError(
            f"images look scaled to [0, 1] (max {brightest:.3g}) but the architecture expects "
            f"[0, {pixel_range:g}]; build the architecture with pixel_range=1.0"
        )


def _prepare_dataset(
    dataset: tf.data.Dataset,
    arch: ArchitectureConfig,
    config: TrainingConfig,
    num_classes: int,
    batch_size: int,
    class_weights: Sequence[float] | None,
    training: bool,
) -> tf.data.Dataset:
    if not (isinstance(dataset.element_spec, tuple) and len(dataset.element_spec) == 2):
        raise ValueError(f"expected a dataset of (image, label) pairs, got {dataset.element_spec}")
    image_spec = dataset.element_spec[0]
    if image_spec.shape.rank == 4:
        dataset = dataset.unbatch()
    expected = (arch.input_size, arch.input_size, 3)
    if tuple(image_spec.shape[-3:]) not in (expected, (None, None, 3)):
        raise ValueError(f"images are {tuple(image_spec.shape[-3:])}, the architecture takes {expected}")

    def to_example(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        label = tf.reshape(tf.cast(label, tf.int32), [])
        # one_hot silently turns an out-of-range label into an all-zero target: fail loudly instead.
        with tf.control_dependencies(
            [
                tf.debugging.assert_non_negative(label, message="negative label"),
                tf.debugging.assert_less(label, num_classes, message="label outside class_names"),
            ]
        ):
            label = tf.identity(label)
        return tf.ensure_shape(tf.cast(image, tf.float32), expected), label

    dataset = dataset.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
    if training and config.shuffle_buffer > 1:
        dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if training and config.augment:
        # A seeded random stream that differs every epoch: stateful random ops inside map() would
        # restart their sequence with each new iterator and repeat the same augmentation every epoch.
        seeds = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True)
        jitter, pixel_range = config.colour_jitter, arch.pixel_range
        dataset = tf.data.Dataset.zip(dataset, seeds).map(
            lambda batch, seed: (augment_batch(batch[0], seed, pixel_range, jitter), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    weights = None if class_weights is None else tf.constant(class_weights, tf.float32)

    def to_targets(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, ...]:
        targets = tf.one_hot(labels, num_classes)  # one-hot: the sparse loss has no label smoothing
        if weights is None:
            return images, targets
        return images, targets, tf.gather(weights, labels)

    return dataset.map(to_targets, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, pixel_range: float, colour_jitter: float) -> tf.Tensor:
    """Per-image random element of the dihedral group (flips and transposition: exact, no interpolation,
    and a blood cell has no preferred orientation) and mild colour jitter standing in for stain and
    illumination differences between labs. ``images`` is ``[b, s, s, 3]`` in ``[0, pixel_range]``."""
    seeds = tf.random.experimental.stateless_split(tf.stack([seed, seed // 7 + 1]), num=6)
    batch = tf.shape(images)[0]

    def coin(index: int) -> tf.Tensor:
        return tf.random.stateless_uniform([batch, 1, 1, 1], seed=seeds[index]) < 0.5

    images = tf.where(coin(0), tf.reverse(images, axis=[2]), images)
    images = tf.where(coin(1), tf.reverse(images, axis=[1]), images)
    images = tf.where(coin(2), tf.transpose(images, [0, 2, 1, 3]), images)
    if colour_jitter > 0:

        def factor(index: int, channels: int, strength: float) -> tf.Tensor:
            return 1.0 + tf.random.stateless_uniform(
                [batch, 1, 1, channels], minval=-strength, maxval=strength, seed=seeds[index]
            )

        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        contrast = factor(3, 1, colour_jitter)
        brightness = factor(4, 1, colour_jitter)
        # Half strength per channel: a stain shift tints the image, it does not swap its colours.
        channel_gain = factor(5, 3, colour_jitter / 2)
        images = ((images - mean) * contrast + mean) * brightness * channel_gain
        images = tf.clip_by_value(images, 0.0, pixel_range)
    return images


def _schedule_callback(config: TrainingConfig, peak_rate: float) -> keras.callbacks.Callback:
    if config.schedule == "plateau":
        return keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss",
            factor=config.plateau_factor,
            patience=config.plateau_patience,
            min_lr=peak_rate * config.min_learning_rate_fraction,
        )
    return keras.callbacks.LearningRateScheduler(
        lambda epoch, _rate: cosine_learning_rate(
            epoch, config.epochs, peak_rate, config.warmup_epochs, config.min_learning_rate_fraction
        )
    )


def cosine_learning_rate(epoch: int, epochs: int, peak_rate: float, warmup_epochs: int, floor_fraction: float) -> float:
    """Per-epoch rate: linear warm-up to ``peak_rate`` over ``warmup_epochs`` (from-scratch nets with
    batch norm are fragile in their first steps), then half a cosine down to ``floor_fraction * peak``."""
    if epoch < warmup_epochs:
        return peak_rate * (epoch + 1) / warmup_epochs
    floor = peak_rate * floor_fraction
    decay_epochs = max(1, epochs - warmup_epochs - 1)
    progress = min(1.0, (epoch - warmup_epochs) / decay_epochs)
    return floor + (peak_rate - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Where per-epoch progress lines go besides this module's logger (the Dagster event log, a progress bar).
ProgressReport = Callable[[str], None]


class EpochProgress(keras.callbacks.Callback):
    """One line per epoch, "epoch 3/9: loss 0.182, accuracy 0.938, val_accuracy 0.964 (263 s; about 26 min
    left)", to this module's logger and to ``report``; the estimate assumes the remaining epochs take
    as long as the mean so far (early stopping may end sooner)."""

    def __init__(self, epochs: int, report: ProgressReport | None = None, label: str = "") -> None:
        super().__init__()
        self.epochs = epochs
        self.report = report
        self.label = label
        self.started = 0.0
        self.durations: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        self.durations.append(time.perf_counter() - self.started)
        shown = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
        values = ", ".join(f"{name} {logs[name]:.4g}" for name in shown if logs and name in logs)
        left = (self.epochs - epoch - 1) * float(np.mean(self.durations))
        line = (
            f"{self.label}epoch {epoch + 1}/{self.epochs}: {values} ({self.durations[-1]:.0f} s; about {left / 60:.0f} min left)"
        )
        logger.info(line)
        if self.report is not None:
            self.report(line)


def training_curves_png(history: Mapping[str, Sequence[float]], best_epoch: int | None = None) -> bytes:
    """Loss and accuracy per epoch (training and validation), the best epoch marked; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    try:
        for axis, metric, title in ((loss_axis, "loss", "Loss"), (accuracy_axis, "accuracy", "Accuracy")):
            for key, label, style in ((metric, "training", "-"), (f"val_{metric}", "validation", "--")):
                values = history.get(key)
                if values:
                    axis.plot(range(1, len(values) + 1), values, style, label=label)
            if best_epoch is not None:
                axis.axvline(best_epoch, color="grey", linewidth=0.8, linestyle=":", label=f"best epoch {best_epoch}")
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
            axis.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(figure)
