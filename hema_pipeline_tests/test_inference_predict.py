"""Batch prediction on tiny Keras models with known logits: calibration, energy, referral, decoding
failures, agreement with the training pipeline's preprocessing, and two-stage routing."""

from __future__ import annotations

import dataclasses
import io
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy.special import logsumexp

from hema_pipeline.inference.predict import (
    CellClassifier,
    UnreadableImagesError,
    model_pixel_range,
    predict_images,
    predict_readable_images,
    predict_routed,
    prepare_images,
)
from hema_pipeline.inference.routing import merge_cell_results, thesis_routes
from hema_pipeline.modeling.contract import InvalidModelContract
from hema_pipeline_tests.support import model_contract

SIZE = 16
PRIMARY = ("neutrophil", "lymphocyte", "monocyte")
DYSPLASIA = ("neutrophil", "hypogranulated_neutrophil")
LYMPHOID = ("lymphocyte", "malignant_lymphocyte")


def colour_model(weights: np.ndarray, bias: np.ndarray | None = None, name: str = "colour") -> keras.Model:
    """Logits = mean RGB (in [0, 1]) @ weights + bias: a solid colour gives known logits."""
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    scaled = keras.layers.Rescaling(1.0 / 255.0)(pooled)
    dense = keras.layers.Dense(weights.shape[1], name="logits")
    model = keras.Model(inputs, dense(scaled), name=name)
    dense.set_weights([weights.astype(np.float32), (np.zeros(weights.shape[1]) if bias is None else bias).astype(np.float32)])
    return model


def card(task: str, classes: tuple[str, ...], temperature: float = 1.0, thresholds: dict | None = None, ood: float | None = None):
    return model_contract(
        task=task,
        model_version=f"{task}-v1",
        class_names=classes,
        input_size=SIZE,
        temperature=temperature,
        class_thresholds=thresholds if thresholds is not None else {name: 0.0 for name in classes},
        ood_threshold=ood,
    )


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 36)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), rgb, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


RED, GREEN, BLUE = (220, 30, 30), (30, 220, 30), (30, 30, 220)


@pytest.fixture(scope="module")
def primary_model() -> keras.Model:
    return colour_model(np.eye(3) * 6.0, name="primary")


def test_calibrated_probabilities_sum_to_one_and_use_the_temperature(primary_model):
    images = [png(RED), png(GREEN), png(BLUE), png((120, 110, 100))]
    model_input = prepare_images(images, SIZE).astype(np.float32)
    logits = primary_model(model_input, training=False).numpy().astype(np.float64)

    for temperature in (1.0, 2.5):
        frame = predict_images(images, CellClassifier(primary_model, card("pbc", PRIMARY, temperature)))
        probabilities = np.array([[row[name] for name in PRIMARY] for row in frame["probabilities"]])
        assert probabilities.sum(axis=1) == pytest.approx(np.ones(4), abs=1e-12)
        expected = np.exp(logits / temperature - logsumexp(logits / temperature, axis=1, keepdims=True))
        assert probabilities == pytest.approx(expected, rel=1e-5)
        assert frame["confidence"].to_numpy() == pytest.approx(expected.max(axis=1), rel=1e-5)
        assert frame["energy"].to_numpy() == pytest.approx(-logsumexp(logits, axis=1), rel=1e-5)
    assert frame["predicted_class"].tolist()[:3] == ["neutrophil", "lymphocyte", "monocyte"]


def test_a_higher_temperature_lowers_confidence_but_not_the_class(primary_model):
    images = [png(RED), png(BLUE)]
    sharp = predict_images(images, CellClassifier(primary_model, card("pbc", PRIMARY, 1.0)))
    soft = predict_images(images, CellClassifier(primary_model, card("pbc", PRIMARY, 3.0)))
    assert soft["predicted_class"].tolist() == sharp["predicted_class"].tolist()
    assert (soft["confidence"].to_numpy() < sharp["confidence"].to_numpy()).all()
    # p_T is proportional to p_1 ** (1 / T).
    p1 = np.array(list(sharp["probabilities"][0].values()))
    p3 = np.array(list(soft["probabilities"][0].values()))
    assert p3 == pytest.approx(p1 ** (1 / 3) / (p1 ** (1 / 3)).sum(), rel=1e-9)


def test_referral_reasons_follow_the_card(primary_model):
    images = [png(RED), png(GREEN), png((128, 128, 128))]
    # A grey cell has equal logits: confidence 1/3, below the 0.9 every class needs.
    strict = card("pbc", PRIMARY, thresholds={"neutrophil": 0.9, "lymphocyte": 0.9, "monocyte": 0.9})
    frame = predict_images(images, CellClassifier(primary_model, strict))
    assert frame["accepted"].tolist() == [True, True, False]
    assert frame["referral_reason"].tolist() == [None, None, "low_confidence"]

    # Refer-all for lymphocytes (None, as JSON writes calibration.REFER_ALL) and an energy threshold the
    # grey cell exceeds: unfamiliar takes precedence over low confidence.
    grey_energy = float(frame["energy"][2])
    refer_lymphocytes = card(
        "pbc", PRIMARY, thresholds={"neutrophil": 0.5, "lymphocyte": None, "monocyte": 0.5}, ood=grey_energy - 0.01
    )
    frame = predict_images(images, CellClassifier(primary_model, refer_lymphocytes))
    assert frame["ood_score"].tolist() == frame["energy"].tolist()  # the card's threshold is on energy
    assert frame["referral_reason"].tolist() == [None, "low_confidence", "unfamiliar"]
    assert frame["accepted"].tolist() == [True, False, False]


def test_cards_that_cannot_be_applied_are_refused(primary_model):
    with pytest.raises(InvalidModelContract, match="no confidence threshold"):
        CellClassifier(primary_model, card("pbc", PRIMARY, thresholds={"neutrophil": 0.5}))
    with pytest.raises(InvalidModelContract, match="temperature"):
        CellClassifier(primary_model, card("pbc", PRIMARY, temperature=0.0))
    with pytest.raises(ValueError, match="outputs 3 logits"):
        CellClassifier(primary_model, card("dysplasia", DYSPLASIA))


def test_batches_keep_input_order_and_mix_paths_and_bytes(primary_model, tmp_path):
    colours = [RED, GREEN, BLUE, GREEN, RED]
    paths = []
    for index, colour in enumerate(colours[:3]):
        path = tmp_path / f"cell{index}.png"
        path.write_bytes(png(colour))
        paths.append(path)
    images = [*paths, png(colours[3]), png(colours[4])]
    frame = predict_images(images, CellClassifier(primary_model, card("pbc", PRIMARY)), batch_size=2, cell_keys=list("abcde"))
    assert frame["cell_key"].tolist() == list("abcde")
    assert frame["predicted_class"].tolist() == ["neutrophil", "lymphocyte", "monocyte", "lymphocyte", "neutrophil"]


def test_unreadable_images_are_named_with_their_reason(primary_model, tmp_path):
    good = png(RED)
    truncated = good[: len(good) // 3]
    images = [good, b"not an image", truncated, tmp_path / "missing.png", png(BLUE)]
    keys = ["ok1", "junk", "truncated", "missing", "ok2"]
    classifier = CellClassifier(primary_model, card("pbc", PRIMARY))
    frame, failures = predict_readable_images(images, classifier, cell_keys=keys, batch_size=2)
    assert frame["cell_key"].tolist() == ["ok1", "ok2"]
    assert frame["predicted_class"].tolist() == ["neutrophil", "monocyte"]
    reasons = {failure.cell_key: failure.reason for failure in failures}
    assert set(reasons) == {"junk", "truncated", "missing"}
    assert "Unknown image file format" in reasons["junk"]
    assert "No such file" in reasons["missing"]
    assert "function_node" not in reasons["truncated"] and reasons["truncated"]
    with pytest.raises(UnreadableImagesError, match="3 image") as raised:
        predict_images(images, classifier, cell_keys=keys)
    assert [failure.cell_key for failure in raised.value.failures] == ["junk", "truncated", "missing"]


def test_preprocessing_is_the_training_pipelines(tmp_path):
    """Train/serve skew check: a JPEG is decoded and resized bit-for-bit as the training pipeline does."""
    from hema_pipeline.datasets.input_pipeline import decode_and_resize_file as training_decode

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (45, 47, 3), dtype=np.uint8)
    image = np.kron(base, np.ones((8, 8, 1), np.uint8))  # 360 x 376: exercises the DCT downscale
    path = tmp_path / "cell.jpg"
    Image.fromarray(image).save(path, format="JPEG", quality=90)
    for size, crop in ((32, 1.0), (96, 1.0), (400, 1.0), (64, 0.75), (96, 0.5)):
        ours = prepare_images([path], size, crop)[0]
        theirs = training_decode(tf.constant(str(path)), size, crop).numpy()
        assert np.array_equal(ours, theirs), (size, crop)


def test_a_card_with_test_time_views_averages_the_logits_over_them(tmp_path):
    from hema_pipeline.modeling.networks import predict_outputs

    # A model that sees orientation: logits from the mean colour of the top-left quadrant only.
    inputs = keras.Input((SIZE, SIZE, 3))
    corner = keras.layers.Cropping2D(((0, SIZE // 2), (0, SIZE // 2)))(inputs)
    pooled = keras.layers.Rescaling(1.0 / 255.0, name="features")(keras.layers.GlobalAveragePooling2D()(corner))
    dense = keras.layers.Dense(3, name="logits")
    model = keras.Model(inputs, dense(pooled))
    dense.set_weights([np.eye(3, dtype=np.float32) * 6.0, np.zeros(3, np.float32)])
    image = np.full((SIZE, SIZE, 3), BLUE, np.uint8)
    image[: SIZE // 2, : SIZE // 2] = RED
    path = tmp_path / "corner.png"
    Image.fromarray(image).save(path)
    single = CellClassifier(model, card("pbc", PRIMARY))
    averaged = CellClassifier(model, dataclasses.replace(card("pbc", PRIMARY), test_time_views=8))
    prepared = prepare_images([path], SIZE)
    assert single.logits(prepared).argmax() == 0  # red: the corner it looks at
    assert averaged.logits(prepared).argmax() == 2  # blue: three quarters of the cell, seen from 8 sides
    np.testing.assert_allclose(
        averaged.logits(prepared), predict_outputs(model, prepared.astype(np.float32), test_time_views=8).logits, atol=1e-5
    )
    rows = predict_images([path], averaged)
    assert rows["predicted_class"].tolist() == [PRIMARY[2]]
    with pytest.raises(InvalidModelContract, match="test_time_views"):
        CellClassifier(model, dataclasses.replace(card("pbc", PRIMARY), test_time_views=3))
    with pytest.raises(InvalidModelContract, match="crop_fraction"):
        CellClassifier(model, dataclasses.replace(card("pbc", PRIMARY), crop_fraction=1.5))


def test_the_pixel_range_comes_from_the_network():
    from hema_pipeline.modeling.networks import build_model, compact

    arch = compact(32)
    unit_range = build_model(type(arch)(**{**arch.to_dict(), "widths": tuple(arch.widths), "pixel_range": 1.0}), 2)
    assert model_pixel_range(unit_range) == pytest.approx(1.0)
    classifier = CellClassifier(unit_range, model_contract("t", "t-v1", ("a", "b"), 32, 1.0, {"a": 0.0, "b": 0.0}))
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = unit_range(images.astype(np.float32) / 255.0, training=False).numpy()
    assert classifier.logits(images) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_two_stage_routing_sends_accepted_neutrophils_and_lymphocytes_on():
    primary = colour_model(np.eye(3) * 8.0, name="primary")
    # Dysplasia model: blue content (hypogranular, paler cytoplasm here) pushes towards hypogranulated.
    dysplasia = colour_model(np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 12.0]]), bias=np.array([0.0, -3.0]), name="dysplasia")
    # Malignancy model: red content pushes towards malignant.
    malignancy = colour_model(np.array([[0.0, 12.0], [0.0, 0.0], [0.0, 0.0]]), bias=np.array([0.0, -3.0]), name="lymphoid")
    grey = (128, 128, 128)
    images = {
        "S1:1": png((220, 20, 20)),  # neutrophil, normal
        "S1:2": png((220, 20, 150)),  # neutrophil, hypogranulated
        "S1:3": png((20, 220, 20)),  # lymphocyte, normal
        "S1:4": png((150, 220, 20)),  # lymphocyte, malignant
        "S1:5": png((20, 20, 220)),  # monocyte: not routed
        "S1:6": png(grey),  # referred by the primary model: not routed
    }
    classifiers = {
        "pbc": CellClassifier(primary, card("pbc", PRIMARY, thresholds={name: 0.6 for name in PRIMARY})),
        "dysplasia": CellClassifier(dysplasia, card("dysplasia", DYSPLASIA)),
        "lymphoid": CellClassifier(malignancy, card("lymphoid", LYMPHOID)),
    }
    routes = thesis_routes("pbc", "dysplasia", "lymphoid")
    stages = predict_routed(list(images.values()), classifiers, "pbc", routes, cell_keys=list(images))

    by_task = {task: rows.set_index("cell_key")["predicted_class"].to_dict() for task, rows in stages.groupby("task")}
    assert by_task["dysplasia"] == {"S1:1": "neutrophil", "S1:2": "hypogranulated_neutrophil"}
    assert by_task["lymphoid"] == {"S1:3": "lymphocyte", "S1:4": "malignant_lymphocyte"}
    assert len(by_task["pbc"]) == 6

    cells = merge_cell_results(stages, "pbc", routes).set_index("cell_key")
    assert cells["final_class"].to_dict() == {
        "S1:1": "neutrophil",
        "S1:2": "hypogranulated_neutrophil",
        "S1:3": "lymphocyte",
        "S1:4": "malignant_lymphocyte",
        "S1:5": "monocyte",
        "S1:6": cells.loc["S1:6", "primary_class"],
    }
    assert cells["accepted"].tolist() == [True, True, True, True, True, False]
    assert cells.loc["S1:6", "referral_reason"] == "low_confidence" and cells.loc["S1:6", "referred_by_task"] == "pbc"


def test_a_specialist_referral_stops_refinement():
    primary = colour_model(np.eye(3) * 8.0, name="primary")
    undecided = colour_model(np.zeros((3, 2)), name="undecided")  # always 50/50
    classifiers = {
        "pbc": CellClassifier(primary, card("pbc", PRIMARY)),
        "dysplasia": CellClassifier(undecided, card("dysplasia", DYSPLASIA, thresholds={name: 0.8 for name in DYSPLASIA})),
        "lymphoid": CellClassifier(undecided, card("lymphoid", LYMPHOID)),
    }
    routes = thesis_routes("pbc", "dysplasia", "lymphoid")
    stages = predict_routed([png(RED)], classifiers, "pbc", routes, cell_keys=["S1:1"])
    cells = merge_cell_results(stages, "pbc", routes)
    assert cells.loc[0, "final_class"] == "neutrophil"
    assert not cells.loc[0, "accepted"]
    assert (cells.loc[0, "referral_reason"], cells.loc[0, "referred_by_task"]) == ("low_confidence", "dysplasia")
    assert math.isclose(stages[stages["task"] == "dysplasia"]["confidence"].iloc[0], 0.5)


def test_routes_must_start_from_a_model_that_ran():
    primary = colour_model(np.eye(3), name="primary")
    classifiers = {"pbc": CellClassifier(primary, card("pbc", PRIMARY))}
    with pytest.raises(ValueError, match="no model"):
        predict_routed([png(RED)], classifiers, "pbc", thesis_routes("pbc", "dysplasia", "lymphoid"))


def test_a_feature_space_ood_threshold_uses_its_scorer():
    """A card whose ood_threshold is on Mahalanobis distances (the registry can fit either) decides
    "unfamiliar" on that score, computed from the card's features layer, not on the energy."""
    from hema_pipeline.modeling.ood import MahalanobisScorer

    inputs = keras.Input((SIZE, SIZE, 3))
    features = keras.layers.Rescaling(1.0 / 255.0, name="features")(keras.layers.GlobalAveragePooling2D()(inputs))
    dense = keras.layers.Dense(3, name="logits")
    model = keras.Model(inputs, dense(features))
    dense.set_weights([np.eye(3, dtype=np.float32) * 6.0, np.zeros(3, np.float32)])

    rng = np.random.default_rng(7)
    training_images, labels = [], []
    for label, colour in enumerate((RED, GREEN, BLUE)):
        for _ in range(15):
            jittered = tuple(int(value) for value in np.clip(np.array(colour) + rng.integers(-25, 26, 3), 0, 255))
            training_images.append(png(jittered))
            labels.append(label)
    feature_model = keras.Model(inputs, features)
    training_features = feature_model(prepare_images(training_images, SIZE).astype(np.float32)).numpy()
    scorer = MahalanobisScorer.fit(training_features, np.array(labels), num_classes=3)

    mahalanobis_card = model_contract(
        "pbc", "pbc-v1", PRIMARY, SIZE, 1.0, {name: 0.0 for name in PRIMARY}, ood_threshold=30.0, ood_method="mahalanobis"
    )
    with pytest.raises(ValueError, match="feature_scorer"):
        CellClassifier(model, mahalanobis_card)
    with pytest.raises(ValueError, match="feature_scorer"):
        CellClassifier(model, card("pbc", PRIMARY), feature_scorer=scorer)

    yellow = (230, 230, 30)  # like no training colour
    images = [png(RED), png(yellow)]
    frame = predict_images(images, CellClassifier(model, mahalanobis_card, feature_scorer=scorer))
    expected = scorer.score(feature_model(prepare_images(images, SIZE).astype(np.float32)).numpy())
    assert frame["ood_score"].to_numpy() == pytest.approx(expected, rel=1e-5)
    assert expected[0] < 30.0 < expected[1]
    assert frame["referral_reason"].tolist() == [None, "unfamiliar"]
    assert not np.allclose(frame["ood_score"], frame["energy"])
    # Without an OOD threshold there is no OOD score and nobody is unfamiliar.
    plain = predict_images(images, CellClassifier(model, card("pbc", PRIMARY)))
    assert plain["ood_score"].isna().all() and plain["accepted"].all()


def test_the_registry_card_holds_the_contract_inference_takes(primary_model):
    """The registry's card, read back from its JSON, gives the contract inference runs on."""
    from hema_pipeline.modeling.calibration import REFER_ALL, ReferralPolicy
    from hema_pipeline.modeling.ood import OodThreshold
    from hema_pipeline.modeling.registry import ModelCard as RegistryCard

    policy = ReferralPolicy(
        class_names=PRIMARY,
        thresholds=(0.9, REFER_ALL, 0.5),
        sources=("class", "refer all", "class"),
        global_threshold=0.9,
        target_accuracy=0.99,
        calibration_cells=300,
        confidence=None,
        guarantee=None,
    )
    written = RegistryCard(
        task="pbc",
        dataset_version="pbc-ds-1",
        code_version="test",
        architecture={},
        training={},
        class_names=list(PRIMARY),
        input_size=SIZE,
        pixel_range=255.0,
        metrics={},
        per_class_metrics=[],
        temperature=1.5,
        referral=policy.to_dict(),
        ood=OodThreshold("energy", threshold=-1.0, keep_quantile=0.95, calibration_cells=300).to_dict(),
        training_seconds=1.0,
        training_device="CPU",
        created_at="2026-11-20T00:00:00+00:00",
        model_version="pbc-0123456789ab",
    )
    registry_card = RegistryCard.from_json(written.to_json())
    frame = predict_images([png(RED), png(GREEN)], CellClassifier(primary_model, registry_card.contract()))
    assert frame["predicted_class"].tolist() == ["neutrophil", "lymphocyte"]
    assert frame["referral_reason"].tolist() == [None, "low_confidence"]  # lymphocytes: refer all
    recorded = registry_card.contract().decision_settings()
    assert recorded["class_thresholds"] == {"neutrophil": 0.9, "lymphocyte": None, "monocyte": 0.5}
    assert (recorded["ood_method"], recorded["ood_threshold"], recorded["model_version"]) == ("energy", -1.0, "pbc-0123456789ab")


def test_the_prediction_frame_refers_what_it_cannot_judge_and_scores_ood_only_against_a_threshold():
    from hema_pipeline.inference.predict import prediction_frame

    logits = np.array([[4.0, 0.0, 0.0], [np.nan, 0.0, 0.0]])
    without_ood = card("pbc", PRIMARY, thresholds={name: 0.5 for name in PRIMARY})
    frame = prediction_frame(logits, without_ood, ["a", "b"], ood_scores=np.array([1.0, 2.0]))
    assert frame["ood_score"].isna().all()  # no threshold: no score, whatever the caller computed
    # A cell whose logits are not numbers cannot reach any threshold: referred, never accepted.
    assert frame["accepted"].tolist() == [True, False]
    assert frame["referral_reason"].tolist() == [None, "low_confidence"]
