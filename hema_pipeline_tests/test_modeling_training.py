"""Networks and training on the CPU, and the whole modelling chain on a tiny learnable task:
train -> calibrate -> referral and OOD thresholds -> card -> registry -> champion -> reload."""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import replace
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from hema_pipeline.modeling.calibration import (
    calibration_report,
    evaluate_referral,
    fit_referral_policy,
    fit_temperature,
    referral_threshold_candidates,
    softmax,
)
from hema_pipeline.modeling.evaluation import evaluate_logits
from hema_pipeline.modeling.networks import (
    FEATURES_LAYER,
    LAST_CONV_LAYER,
    LOGITS_LAYER,
    ArchitectureConfig,
    architecture_preset,
    build_model,
    combine_members,
    dihedral_view,
    large,
    member_architecture,
    predict_outputs,
    standard,
    view_averaged,
)
from hema_pipeline.modeling.ood import MahalanobisScorer, energy_score, fit_ood_threshold
from hema_pipeline.modeling.promotion import decide_promotion, load_champion
from hema_pipeline.modeling.registry import (
    MAHALANOBIS_ATTACHMENT,
    draft_model_card,
    model_from_bytes,
    model_to_bytes,
    read_attachment,
    register_model,
)
from hema_pipeline.modeling.training import (
    CHECKPOINT_FILE_NAME,
    TrainingConfig,
    TrainingResult,
    augment_batch,
    balanced_class_weights,
    cosine_learning_rate,
    train_ensemble,
    train_model,
    training_curves_png,
)
from hema_pipeline.storage.object_store import LocalObjectStore
from hema_pipeline.storage.warehouse import Warehouse

pytestmark = pytest.mark.slow  # every test here trains a network

CLASSES = ["dark", "bright"]
SIZE = 16
TINY = ArchitectureConfig(name="tiny", family="compact_cnn", input_size=SIZE, widths=(4, 8), dense_units=8)
TINY_TRAINING = TrainingConfig(
    epochs=8, batch_size=16, learning_rate=1e-2, warmup_epochs=1, early_stopping_patience=3, monitor="val_loss"
)


def squares(cells: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark (class 0) or bright (class 1) noisy squares in uint8 range: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, cells)
    base = np.where(labels[:, None, None, None] == 1, 190.0, 60.0)
    images = np.clip(base + rng.normal(0, 30, (cells, SIZE, SIZE, 3)), 0, 255).astype(np.float32)
    return images, labels


def dataset(images: np.ndarray, labels: np.ndarray, batch: int = 16) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainingResult:
    train, validation = squares(128, seed=1), squares(64, seed=2)
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    return train_model(TINY, TINY_TRAINING, dataset(*train), dataset(*validation), CLASSES, checkpoints)


@pytest.mark.parametrize(
    ("preset", "min_parameters", "max_parameters"),
    [("compact", 50_000, 120_000), ("standard", 500_000, 2_000_000)],
)
def test_presets_expose_logits_features_and_last_conv(preset, min_parameters, max_parameters):
    arch = architecture_preset(preset)
    model = build_model(arch, num_classes=8)
    assert min_parameters <= model.count_params() <= max_parameters
    assert model.input_shape == (None, arch.input_size, arch.input_size, 3)
    logits_layer = model.get_layer(LOGITS_LAYER)
    assert logits_layer.activation is keras.activations.linear  # logits, not probabilities
    assert model.output_shape == (None, 8)
    assert len(model.get_layer(LAST_CONV_LAYER).output.shape) == 4  # a spatial map for Grad-CAM
    assert len(model.get_layer(FEATURES_LAYER).output.shape) == 2
    assert ArchitectureConfig.from_dict(arch.to_dict()) == arch


@pytest.mark.parametrize("backbone", ["efficientnetv2b0", "resnet50"])
def test_large_backbones_build_under_mixed_precision_with_float32_logits(backbone):
    model = build_model(large(backbone=backbone), num_classes=8, mixed_precision=True)
    assert model.get_layer(LOGITS_LAYER).dtype_policy.compute_dtype == "float32"
    assert model.get_layer(LAST_CONV_LAYER).dtype_policy.compute_dtype == "float16"
    assert model.output.dtype == "float32"
    assert model.get_layer(LAST_CONV_LAYER).output.shape[1:3] == (7, 7)
    # Building under mixed precision must not leave float16 as the process-wide default.
    assert keras.config.dtype_policy().name == "float32"


def test_architecture_configs_reject_nonsense():
    with pytest.raises(ValueError, match="backbone"):
        ArchitectureConfig(name="x", family="keras_application", input_size=224, backbone="vgg16")
    with pytest.raises(ValueError, match="below 2x2"):
        ArchitectureConfig(name="x", family="compact_cnn", input_size=16, widths=(4, 8, 16, 32, 64))
    with pytest.raises(ValueError, match="below 2x2"):
        ArchitectureConfig(name="x", family="residual_separable", input_size=32, widths=(8, 16, 32, 64))
    ArchitectureConfig(name="x", family="residual_separable", input_size=64, widths=(8, 16, 32, 64))
    with pytest.raises(ValueError, match="unknown architecture"):
        architecture_preset("huge")


def _perturbed(model: keras.Model, seed: int) -> keras.Model:
    """Every weight moved off its initial value (batch-norm statistics included), so a copy that missed
    or swapped one shows."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in layer.get_weights()])
    return model


@pytest.mark.parametrize("arch", [TINY, standard(64)], ids=["compact_with_dense_features", "residual_separable"])
def test_an_ensemble_is_one_flat_model_whose_logits_are_the_members_mean(arch: ArchitectureConfig):
    ensemble_arch = replace(arch, ensemble_members=3)
    members = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        members.append(_perturbed(build_model(member_architecture(ensemble_arch), 2), seed))
    ensemble = combine_members(ensemble_arch, members)
    images = squares(6, seed=3)[0] if arch.input_size == SIZE else np.random.default_rng(4).uniform(0, 255, (6, 64, 64, 3))
    member_outputs = [predict_outputs(member, images.astype(np.float32)) for member in members]
    reloaded = model_from_bytes(model_to_bytes(ensemble))
    for model in (ensemble, reloaded):
        outputs = predict_outputs(model, images.astype(np.float32))
        np.testing.assert_allclose(outputs.logits, np.mean([o.logits for o in member_outputs], axis=0), rtol=1e-4, atol=1e-4)
        # The members' feature vectors side by side (a compact member's dense layer stays block-diagonal).
        np.testing.assert_allclose(outputs.features, np.concatenate([o.features for o in member_outputs], axis=1), atol=1e-4)
        assert model.get_layer(LAST_CONV_LAYER).output.shape[-1] == 3 * members[0].get_layer(LAST_CONV_LAYER).output.shape[-1]
        assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # flat: every layer addressable


def test_ensembles_are_built_only_from_their_members():
    ensemble_arch = replace(TINY, ensemble_members=2)
    with pytest.raises(ValueError, match="combine_members"):
        build_model(ensemble_arch, 2)
    with pytest.raises(ValueError, match="2 ensemble members, got 1"):
        combine_members(ensemble_arch, [build_model(TINY, 2)])
    with pytest.raises(ValueError, match="ensemble_members must be at least 1"):
        replace(TINY, ensemble_members=0)
    with pytest.raises(ValueError, match="cannot be ensembled"):
        replace(large(), ensemble_members=2)
    single = build_model(TINY, 2)
    assert combine_members(TINY, [single]) is single


def test_train_ensemble_trains_independent_members_and_keeps_their_mean(tmp_path: Path):
    arch = replace(TINY, ensemble_members=2)
    config = replace(TINY_TRAINING, epochs=3)
    train, validation = squares(96, seed=11), squares(48, seed=12)
    asked_for: list[int] = []

    def member_training_data(member: int):
        asked_for.append(member)
        return dataset(*train), None

    result = train_ensemble(arch, config, member_training_data, dataset(*validation), CLASSES, tmp_path)
    assert asked_for == [0, 1]
    assert result.member_seeds == (config.seed, config.seed + 1)
    assert [summary["seed"] for summary in result.member_summaries()] == [config.seed, config.seed + 1]
    assert all((tmp_path / f"member{index}" / CHECKPOINT_FILE_NAME).exists() for index in (1, 2))
    assert result.epochs_run == sum(member.epochs_run for member in result.members)
    first, second = (member.model for member in result.members)
    assert not np.allclose(first.get_layer(LOGITS_LAYER).get_weights()[0], second.get_layer(LOGITS_LAYER).get_weights()[0])
    outputs = predict_outputs(result.model, dataset(*validation))
    expected = np.mean([predict_outputs(member, dataset(*validation)).logits for member in (first, second)], axis=0)
    np.testing.assert_allclose(outputs.logits, expected, rtol=1e-4, atol=1e-4)
    assert result.best_val_accuracy == pytest.approx(float(np.mean(outputs.logits.argmax(axis=1) == validation[1])))

    alone = train_ensemble(TINY, config, member_training_data, dataset(*validation), CLASSES, tmp_path / "alone")
    assert alone.model is alone.members[0].model and alone.best_val_accuracy == alone.members[0].best_val_accuracy


def test_tiny_training_run_on_the_cpu(trained: TrainingResult):
    assert trained.device == "CPU" and not trained.mixed_precision
    assert trained.batch_size == TINY_TRAINING.batch_size
    assert trained.best_val_accuracy >= 0.95
    assert 1 <= trained.best_epoch <= trained.epochs_run <= TINY_TRAINING.epochs
    assert trained.history["val_loss"][trained.best_epoch - 1] == min(trained.history["val_loss"])
    assert len(trained.history["loss"]) == trained.epochs_run
    assert trained.history["learning_rate"][0] == pytest.approx(1e-2)  # one warm-up epoch reaches the peak
    assert trained.checkpoint_path.name == CHECKPOINT_FILE_NAME and trained.checkpoint_path.is_file()
    assert trained.model.get_layer(LOGITS_LAYER).output.shape[-1] == 2
    figure = Image.open(io.BytesIO(training_curves_png(trained.history, trained.best_epoch)))
    assert figure.format == "PNG"


def test_saved_model_reloads_with_identical_logits(trained: TrainingResult):
    images, _ = squares(40, seed=3)
    original = predict_outputs(trained.model, images)
    artifact = model_to_bytes(trained.model)
    with zipfile.ZipFile(io.BytesIO(artifact)) as archive:
        weights_file = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(weights_file) as weights:
        assert "optimizer" not in weights  # inference artefacts carry no optimiser state
    reloaded = predict_outputs(model_from_bytes(artifact), images)
    np.testing.assert_array_equal(reloaded.logits, original.logits)
    np.testing.assert_array_equal(reloaded.features, original.features)
    # The checkpoint holds the best epoch, which is also what training returned.
    checkpoint = predict_outputs(keras.models.load_model(trained.checkpoint_path, compile=False), images)
    np.testing.assert_allclose(checkpoint.logits, original.logits, atol=1e-6)


def test_predictions_stay_aligned_with_labels_of_a_reshuffling_dataset(trained: TrainingResult):
    images, labels = squares(64, seed=4)
    shuffled = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(64, reshuffle_each_iteration=True)
    outputs = predict_outputs(trained.model, shuffled, batch_size=8)
    assert sorted(outputs.labels.tolist()) == sorted(labels.tolist())
    in_order = predict_outputs(trained.model, images)
    accuracy_in_order = (in_order.logits.argmax(axis=1) == labels).mean()
    assert (outputs.logits.argmax(axis=1) == outputs.labels).mean() == pytest.approx(accuracy_in_order)
    assert accuracy_in_order >= 0.95


def test_dihedral_views_are_the_eight_symmetries_of_the_square_and_subgroups():
    image = tf.reshape(tf.range(9, dtype=tf.float32), [1, 3, 3, 1])
    views = [dihedral_view(image, index).numpy()[0, ..., 0] for index in range(8)]
    as_tuples = {tuple(view.ravel()) for view in views}
    assert len(as_tuples) == 8  # all distinct: a pixel permutation each, no interpolation
    grid = image.numpy()[0, ..., 0]
    expected = {tuple(np.rot90(flipped, turns).ravel()) for flipped in (grid, grid.T) for turns in range(4)}
    assert as_tuples == expected
    # The order is part of every model card that says 2 or 4 views: identity, half turn, the two flips, then
    # the transpose and its three compositions.
    in_order = [grid, grid[::-1, ::-1], grid[::-1], grid[:, ::-1], grid.T, grid.T[::-1, ::-1], grid.T[::-1], grid.T[:, ::-1]]
    for view, wanted in zip(views, in_order, strict=True):
        np.testing.assert_array_equal(view, wanted)
    # The first 2 and 4 views are closed under composition: applying them to any of their own views
    # gives back the same set.
    for count in (2, 4):
        first = {tuple(view.ravel()) for view in views[:count]}
        for view in views[:count]:
            batch = tf.constant(view.reshape(1, 3, 3, 1))
            again = {tuple(dihedral_view(batch, index).numpy().ravel()) for index in range(count)}
            assert again == first
    with pytest.raises(ValueError, match="8 elements"):
        dihedral_view(image, 8)


def test_view_averaged_is_the_mean_of_the_network_over_the_views():
    images = tf.constant(np.random.default_rng(0).normal(size=(2, 3, 3, 1)).astype(np.float32))
    weights = tf.constant(np.arange(9, dtype=np.float32).reshape(9, 1))

    def network(batch: tf.Tensor, training: bool) -> list[tf.Tensor]:
        assert not training
        flat = tf.reshape(batch, [-1, 9])
        return [flat @ weights, tf.cast(flat[:, :2], tf.float16)]  # an orientation-dependent score; a cast

    for views in (1, 2, 4, 8):
        scores, pixels = view_averaged(network, images, views)
        per_view = [network(dihedral_view(images, index), training=False) for index in range(views)]
        np.testing.assert_allclose(scores.numpy(), np.mean([view[0].numpy() for view in per_view], axis=0), rtol=1e-6)
        assert pixels.dtype == tf.float32
        expected_pixels = np.mean([view[1].numpy().astype(np.float32) for view in per_view], axis=0)
        np.testing.assert_allclose(pixels.numpy(), expected_pixels, rtol=1e-3)
    single = view_averaged(lambda batch, training: tf.reduce_sum(batch, axis=[1, 2, 3]), images, 8)
    np.testing.assert_allclose(single.numpy(), tf.reduce_sum(images, axis=[1, 2, 3]).numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="test-time views"):
        view_averaged(network, images, 3)


def test_eight_view_outputs_do_not_depend_on_the_cells_orientation(trained: TrainingResult):
    images, _ = squares(12, seed=5)
    images[:, :4, :8] = 255.0  # an asymmetric mark, so single-view logits do depend on orientation
    turned = np.rot90(images, 1, axes=(1, 2)).copy()
    single, single_turned = predict_outputs(trained.model, images), predict_outputs(trained.model, turned)
    assert not np.allclose(single.logits, single_turned.logits, atol=1e-4)
    both = [predict_outputs(trained.model, batch, test_time_views=8) for batch in (images, turned, images[:, ::-1].copy())]
    np.testing.assert_allclose(both[0].logits, both[1].logits, atol=1e-4)
    np.testing.assert_allclose(both[0].logits, both[2].logits, atol=1e-4)
    np.testing.assert_allclose(both[0].features, both[1].features, atol=1e-4)
    # the mean of the views, computed by hand
    by_hand = np.mean(
        [
            predict_outputs(trained.model, np.rot90(flipped, turns, axes=(1, 2)).copy()).logits
            for flipped in (images, np.swapaxes(images, 1, 2))
            for turns in range(4)
        ],
        axis=0,
    )
    np.testing.assert_allclose(both[0].logits, by_hand, atol=1e-4)


def test_mixed_precision_path_trains_with_float32_logits(tmp_path: Path):
    """The GPU path's precision handling, exercised on the CPU (with the plateau schedule and class
    weights, which the module's other training runs do not use)."""
    config = TrainingConfig(epochs=2, batch_size=16, mixed_precision="on", augment=False, schedule="plateau")
    unbatched = tf.data.Dataset.from_tensor_slices(squares(32, 5))
    progress: list[str] = []
    result = train_model(
        TINY,
        config,
        unbatched,
        dataset(*squares(16, 6)),
        CLASSES,
        tmp_path,
        class_weights=balanced_class_weights([3, 1]),
        progress=progress.append,
    )
    assert result.mixed_precision and result.device == "CPU" and result.epochs_run == 2
    # One progress line per epoch, for the Dagster event log: where it is, how it goes, how long is left.
    assert len(progress) == 2
    assert progress[0].startswith("epoch 1/2: loss ") and "val_accuracy" in progress[0] and "min left)" in progress[0]
    assert progress[1].startswith("epoch 2/2: ") and progress[1].endswith("about 0 min left)")
    assert result.history["learning_rate"] == pytest.approx([config.learning_rate] * 2)
    assert result.model.output.dtype == "float32"
    assert result.model.get_layer(LAST_CONV_LAYER).dtype_policy.name == "mixed_float16"
    assert math.isfinite(result.history["loss"][0])
    images, _ = squares(8, seed=9)
    reloaded = model_from_bytes(model_to_bytes(result.model))
    assert reloaded.get_layer(LAST_CONV_LAYER).dtype_policy.name == "mixed_float16"
    np.testing.assert_array_equal(predict_outputs(reloaded, images).logits, predict_outputs(result.model, images).logits)


def test_inputs_that_cannot_be_right_are_rejected(tmp_path: Path):
    images, labels = squares(32, seed=7)
    config = TrainingConfig(epochs=1, batch_size=16)
    with pytest.raises(ValueError, match="scaled to \\[0, 1\\]"):
        train_model(TINY, config, dataset(images / 255.0, labels), dataset(images, labels), CLASSES, tmp_path)
    with pytest.raises(ValueError, match="architecture takes"):
        wrong_size = np.zeros((8, SIZE * 2, SIZE * 2, 3), np.float32) + 100
        train_model(TINY, config, dataset(wrong_size, labels[:8]), dataset(images, labels), CLASSES, tmp_path)
    with pytest.raises(tf.errors.InvalidArgumentError, match="label outside class_names"):
        train_model(TINY, config, dataset(images, labels + 1), dataset(images, labels), CLASSES, tmp_path)
    with pytest.raises(ValueError, match="class weights"):
        train_model(TINY, config, dataset(images, labels), dataset(images, labels), CLASSES, tmp_path, class_weights=[1.0])


def test_class_weights_and_learning_rate_schedule():
    assert balanced_class_weights([30, 10, 0]) == pytest.approx([40 / 90, 40 / 30, 0.0])
    rates = [cosine_learning_rate(epoch, 10, 1e-3, 2, 0.01) for epoch in range(10)]
    assert rates[:2] == pytest.approx([5e-4, 1e-3])  # warm-up
    assert rates[2] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-5)  # cosine to the floor
    assert all(later <= earlier for earlier, later in zip(rates[2:], rates[3:], strict=False))


def test_augmentation_only_flips_and_transposes_without_colour_jitter():
    rng = np.random.default_rng(8)
    images = tf.constant(rng.uniform(0, 255, (32, 6, 6, 3)).astype(np.float32))
    augmented = augment_batch(images, tf.constant(12345, tf.int64), 255.0, 0.0).numpy()
    changed = 0
    for original, result in zip(images.numpy(), augmented, strict=True):
        variants = [np.rot90(original, turns, axes=(0, 1)) for turns in range(4)]
        variants += [np.flip(variant, axis=1) for variant in variants]  # the 8 symmetries of a square
        assert any(np.array_equal(result, variant) for variant in variants)
        changed += not np.array_equal(result, original)
    assert changed > 16  # 7 of 8 transforms change the image
    jittered = augment_batch(images, tf.constant(1, tf.int64), 255.0, 0.2).numpy()
    assert jittered.min() >= 0.0 and jittered.max() <= 255.0
    np.testing.assert_array_equal(jittered, augment_batch(images, tf.constant(1, tf.int64), 255.0, 0.2).numpy())


def test_the_whole_chain_from_training_to_a_reloaded_champion(trained: TrainingResult, tmp_path: Path):
    model = trained.model
    calibration, test = squares(96, seed=10), squares(96, seed=11)
    train_outputs = predict_outputs(model, dataset(*squares(128, seed=1)))
    calibration_outputs = predict_outputs(model, dataset(*calibration))
    test_outputs = predict_outputs(model, dataset(*test))

    temperature = fit_temperature(calibration_outputs.logits, calibration_outputs.labels).temperature
    # 96 calibration cells can certify 95% at 90% confidence (45 error-free cells needed), not 99.5%.
    candidates = referral_threshold_candidates(
        softmax(train_outputs.logits, temperature).max(axis=1), len(calibration_outputs.labels), 0.95, 0.9
    )
    referral = fit_referral_policy(
        softmax(calibration_outputs.logits, temperature),
        calibration_outputs.labels,
        CLASSES,
        candidates,
        target_accuracy=0.95,
        confidence=0.9,
    )
    assert referral.guarantee is not None
    scorer = MahalanobisScorer.fit(train_outputs.features, train_outputs.labels, num_classes=2)
    ood = fit_ood_threshold(scorer.score(calibration_outputs.features), "mahalanobis", keep_quantile=0.95)
    test_probabilities = softmax(test_outputs.logits, temperature)
    card = draft_model_card(
        task="brightness",
        dataset_version="squares-v1",
        arch=TINY,
        training_config=TINY_TRAINING,
        class_names=CLASSES,
        training_seconds=trained.seconds,
        training_device=trained.device,
        test_evaluation=evaluate_logits(test_outputs.logits, test_outputs.labels, CLASSES, temperature),
        test_calibration=calibration_report(test_outputs.logits, test_outputs.labels, temperature),
        referral=referral,
        test_referral=evaluate_referral(referral, test_probabilities, test_outputs.labels),
        ood=ood,
        crop_fraction=1.0,
        test_time_views=1,
        training_details={"epochs_run": trained.epochs_run, "best_epoch": trained.best_epoch},
    )
    store, warehouse = LocalObjectStore(tmp_path / "lake"), Warehouse(tmp_path / "warehouse.duckdb")
    card = register_model(store, warehouse, card, model_to_bytes(model), {MAHALANOBIS_ATTACHMENT: scorer.to_bytes()})
    assert card.metrics["accuracy"] >= 0.95
    assert decide_promotion(warehouse, "brightness", card.model_version).promoted

    champion = load_champion(store, warehouse, "brightness")
    assert champion.card == card
    reloaded = predict_outputs(champion.model, test[0])
    np.testing.assert_array_equal(reloaded.logits, test_outputs.logits)

    # What inference will do with the card: triage test cells, and flag images unlike any training cell.
    restored_scorer = MahalanobisScorer.from_bytes(read_attachment(store, champion.card, MAHALANOBIS_ATTACHMENT))
    triage = champion.card.contract().triage(reloaded.logits, restored_scorer.score(reloaded.features))
    assert (triage.decisions == "accepted").mean() > 0.5
    checkerboard = np.indices((SIZE, SIZE)).sum(axis=0) % 2 * 255.0
    strange = np.repeat(np.stack([checkerboard, 255.0 - checkerboard], axis=0)[..., None], 3, axis=-1).astype(np.float32)
    strange_scores = restored_scorer.score(predict_outputs(champion.model, strange).features)
    known_scores = restored_scorer.score(reloaded.features)
    assert strange_scores.min() > np.median(known_scores)
    assert energy_score(reloaded.logits).shape == (96,)
