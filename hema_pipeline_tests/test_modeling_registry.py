"""Model cards, content-addressed storage (local and S3) and the recorded promotion gate."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import replace

import boto3
import numpy as np
import pytest

from hema_pipeline.modeling.calibration import (
    calibration_report,
    evaluate_referral,
    fit_referral_policy,
    referral_threshold_candidates,
    softmax,
)
from hema_pipeline.modeling.evaluation import evaluate_logits
from hema_pipeline.modeling.networks import compact
from hema_pipeline.modeling.ood import MahalanobisScorer, energy_score, fit_ood_threshold
from hema_pipeline.modeling.promotion import (
    PromotionPolicy,
    SplitMetrics,
    compare_on_same_split,
    current_champion,
    decide_promotion,
    promotion_history,
    rollback,
)
from hema_pipeline.modeling.registry import (
    MAHALANOBIS_ATTACHMENT,
    ModelCard,
    draft_model_card,
    read_attachment,
    read_card,
    register_model,
    warehouse_rows,
)
from hema_pipeline.modeling.training import TrainingConfig
from hema_pipeline.storage.object_store import LocalObjectStore, open_object_store
from hema_pipeline.storage.warehouse import Warehouse

CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
CELLS = 200


def _test_split_logits(wrong: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """200 cells; the first ``wrong`` are predicted as the next class: accuracy = 1 - wrong / 200."""
    rng = np.random.default_rng(seed)
    labels = np.arange(CELLS) % len(CLASSES)
    predicted = labels.copy()
    predicted[:wrong] = (labels[:wrong] + 1) % len(CLASSES)
    logits = rng.normal(0, 0.3, (CELLS, len(CLASSES)))
    logits[np.arange(CELLS), predicted] += 4.0
    return logits, labels


def _card(
    task: str = "wbc", dataset_version: str = "d1", wrong: int = 20, temperature: float = 1.3, ood: str = "energy"
) -> ModelCard:
    logits, labels = _test_split_logits(wrong)
    probabilities = softmax(logits, temperature)
    candidates = referral_threshold_candidates(probabilities.max(axis=1), len(labels), 0.9, 0.9)
    referral = fit_referral_policy(probabilities, labels, CLASSES, candidates, target_accuracy=0.9, confidence=0.9)
    threshold = (
        fit_ood_threshold(energy_score(logits), "energy")
        if ood == "energy"
        else fit_ood_threshold(np.linspace(0, 10, 50), "mahalanobis")
    )
    return draft_model_card(
        task=task,
        dataset_version=dataset_version,
        arch=compact(),
        training_config=TrainingConfig(epochs=3),
        class_names=CLASSES,
        training_seconds=12.5,
        training_device="CPU",
        test_evaluation=evaluate_logits(logits, labels, CLASSES, temperature),
        test_calibration=calibration_report(logits, labels, temperature),
        referral=referral,
        test_referral=evaluate_referral(referral, probabilities, labels),
        ood=threshold,
        crop_fraction=1.0,
        test_time_views=1,
        training_details={"epochs_run": 3, "batch_size": 64},
    )


@pytest.fixture
def warehouse(tmp_path) -> Warehouse:
    return Warehouse(tmp_path / "warehouse.duckdb")


@pytest.fixture
def store(tmp_path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "lake")


def test_model_card_json_round_trip(store, warehouse):
    draft = _card()
    assert ModelCard.from_json(draft.to_json()) == draft
    card = register_model(store, warehouse, draft, b"model bytes")
    assert read_card(store, card.card_key) == card
    values = json.loads(card.to_json())
    assert values["model_version"] == card.model_version and values["class_names"] == CLASSES
    assert values["metrics"]["accuracy"] == pytest.approx(0.9)
    assert values["architecture"]["name"] == "compact" and values["training"]["epochs_run"] == 3
    assert values["ood"]["method"] == "energy" and values["temperature"] == 1.3
    assert card.referral_policy().class_names == tuple(CLASSES)
    assert card.ood_settings() is not None and card.ood_settings().method == "energy"
    assert card.last_conv_layer == "last_conv" and card.features_layer == "features"
    assert card.code_version  # a commit here, or the package version without git
    with pytest.raises(ValueError, match="unknown model card fields"):
        ModelCard.from_json(json.dumps({**values, "surprise": 1}))


def _new_bucket(endpoint: str) -> str:
    name = f"hema-models-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_artifacts_are_content_addressed(kind, request, tmp_path, warehouse):
    if kind == "local":
        store = LocalObjectStore(tmp_path / "lake")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        store = open_object_store(f"s3://{_new_bucket(endpoint)}/lab", endpoint_url=endpoint)
    model_bytes = b"\x00keras-zip" * 1000
    digest = hashlib.sha256(model_bytes).hexdigest()
    first = register_model(store, warehouse, _card(), model_bytes)
    assert first.artifact_key == f"models/wbc/{digest}/model.keras"
    assert first.artifact_sha256 == digest
    assert first.card_key == f"models/wbc/{digest}/{first.model_version}/card.json"
    assert first.model_version.startswith("wbc-") and len(first.model_version) == len("wbc-") + 12
    keys_after_first = sorted(info.key for info in store.list("models"))

    again = register_model(store, warehouse, _card(), model_bytes)  # same bytes, same content
    assert again == first
    assert sorted(info.key for info in store.list("models")) == keys_after_first

    recalibrated = register_model(store, warehouse, _card(temperature=1.1), model_bytes)
    assert recalibrated.artifact_key == first.artifact_key
    assert recalibrated.model_version != first.model_version
    assert [info.key for info in store.list("models") if info.key.endswith("model.keras")] == [first.artifact_key]
    assert store.get_bytes(first.artifact_key) == model_bytes

    other = register_model(store, warehouse, _card(), model_bytes + b"!")
    assert other.artifact_key != first.artifact_key and other.model_version != first.model_version
    rows = warehouse_rows(warehouse, "select model_version, status, artifact_key from models order by created_at")
    assert sorted(rows["model_version"]) == sorted({first.model_version, recalibrated.model_version, other.model_version})
    assert set(rows["status"]) == {"candidate"}
    per_class = warehouse_rows(
        warehouse, "select * from model_evaluations where model_version = ? order by class_index", [first.model_version]
    )
    assert per_class["class_name"].tolist() == CLASSES
    assert per_class["support"].tolist() == [50, 50, 50, 50]


def test_mahalanobis_statistics_travel_as_a_verified_attachment(store, warehouse):
    rng = np.random.default_rng(0)
    scorer = MahalanobisScorer.fit(rng.normal(size=(40, 3)), np.arange(40) % 4, num_classes=4)
    with pytest.raises(ValueError, match="needs its statistics"):
        register_model(store, warehouse, _card(ood="mahalanobis"), b"m")
    card = register_model(store, warehouse, _card(ood="mahalanobis"), b"m", {MAHALANOBIS_ATTACHMENT: scorer.to_bytes()})
    assert card.ood["statistics_attachment"] == MAHALANOBIS_ATTACHMENT
    restored = MahalanobisScorer.from_bytes(read_attachment(store, card, MAHALANOBIS_ATTACHMENT))
    np.testing.assert_array_equal(restored.precision, scorer.precision)
    row = warehouse_rows(warehouse, "select ood_method, ood_threshold from models").iloc[0]
    assert row["ood_method"] == "mahalanobis" and row["ood_threshold"] == pytest.approx(card.ood["threshold"])
    # Tampering is caught on read.
    store.put_bytes(f"models/wbc/{card.artifact_sha256}/{card.model_version}/{MAHALANOBIS_ATTACHMENT}", b"x")
    with pytest.raises(ValueError, match="does not match"):
        read_attachment(store, card, MAHALANOBIS_ATTACHMENT)


def test_promotion_gate_refuses_worse_promotes_better_and_rolls_back(store, warehouse):
    baseline = register_model(store, warehouse, _card(wrong=20), b"baseline")  # accuracy 0.90
    worse = register_model(store, warehouse, _card(wrong=30), b"worse")  # 0.85
    better = register_model(store, warehouse, _card(wrong=10), b"better")  # 0.95

    first = decide_promotion(warehouse, "wbc", baseline.model_version)
    assert first.action == "promoted" and first.previous_champion is None
    assert "first model" in first.reason
    assert current_champion(warehouse, "wbc") == baseline.model_version

    refused = decide_promotion(warehouse, "wbc", worse.model_version)
    assert refused.action == "refused" and refused.previous_champion == baseline.model_version
    assert "does not beat the champion" in refused.reason and "accuracy 0.8500 vs 0.9000" in refused.reason
    assert current_champion(warehouse, "wbc") == baseline.model_version

    promoted = decide_promotion(warehouse, "wbc", better.model_version)
    assert promoted.promoted and promoted.previous_champion == baseline.model_version
    assert current_champion(warehouse, "wbc") == better.model_version

    restored = rollback(warehouse, "wbc", reason="wrong stain lot in the new training data")
    assert restored.action == "rolled_back"
    assert (restored.model_version, restored.previous_champion) == (baseline.model_version, better.model_version)
    assert current_champion(warehouse, "wbc") == baseline.model_version
    with pytest.raises(LookupError, match="no earlier champion"):
        rollback(warehouse, "wbc")

    history = promotion_history(warehouse, "wbc")
    assert history["action"].tolist() == ["promoted", "refused", "promoted", "rolled_back"]
    assert history["sequence"].tolist() == [1, 2, 3, 4]
    statuses = dict(warehouse_rows(warehouse, "select model_version, status from models").itertuples(index=False))
    assert statuses == {
        baseline.model_version: "champion",
        worse.model_version: "refused",
        better.model_version: "rolled_back",
    }
    view = warehouse_rows(warehouse, "select model_version, became_champion_by from model_champions where task = 'wbc'")
    assert view.iloc[0].tolist() == [baseline.model_version, "rolled_back"]

    # After a rollback the gate still works: the better model can win again.
    again = decide_promotion(warehouse, "wbc", better.model_version)
    assert again.promoted and current_champion(warehouse, "wbc") == better.model_version
    # Asking to promote the champion again is refused and does not demote it.
    assert decide_promotion(warehouse, "wbc", better.model_version).reason == "already the champion"
    status = warehouse_rows(warehouse, "select status from models where model_version = ?", [better.model_version])
    assert status.iloc[0, 0] == "champion"


def test_failed_checks_block_even_the_first_model(store, warehouse):
    card = register_model(store, warehouse, _card(wrong=20), b"a")
    blocked = decide_promotion(warehouse, "wbc", card.model_version, checks={"test_set_quality": False, "leakage": True})
    assert blocked.action == "refused" and "check test_set_quality failed" in blocked.reason
    floor = decide_promotion(warehouse, "wbc", card.model_version, policy=PromotionPolicy(min_accuracy=0.95))
    assert floor.action == "refused" and "accuracy 0.9000 < 0.9500" in floor.reason
    assert current_champion(warehouse, "wbc") is None
    assert decide_promotion(warehouse, "wbc", card.model_version).promoted


def test_a_champion_tested_on_another_dataset_version_must_be_re_evaluated(store, warehouse):
    champion = register_model(store, warehouse, _card(dataset_version="d1", wrong=20), b"old")
    decide_promotion(warehouse, "wbc", champion.model_version)
    challenger = register_model(store, warehouse, _card(dataset_version="d2", wrong=10), b"new")  # 0.95 on d2
    with pytest.raises(ValueError, match="re-evaluate the champion"):
        decide_promotion(warehouse, "wbc", challenger.model_version)
    assert len(promotion_history(warehouse, "wbc")) == 1  # nothing recorded for a decision not taken

    # The champion re-evaluated on d2's test split does better there than the challenger: refused.
    logits, labels = _test_split_logits(wrong=6)
    champion_on_d2 = SplitMetrics.from_report(champion.model_version, "d2", evaluate_logits(logits, labels, CLASSES))
    decision = decide_promotion(warehouse, "wbc", challenger.model_version, champion_on_challenger_split=champion_on_d2)
    assert decision.action == "refused" and "on d2" in decision.reason
    with pytest.raises(ValueError, match="different test splits"):
        wrong_split = replace(champion_on_d2, dataset_version="d1")
        decide_promotion(warehouse, "wbc", challenger.model_version, champion_on_challenger_split=wrong_split)


def test_margins_are_required_on_the_same_split():
    policy = PromotionPolicy(min_accuracy_gain=0.01, min_macro_f1_gain=0.0)
    champion = SplitMetrics("a", "d1", 1000, 0.950, 0.90)
    assert compare_on_same_split(SplitMetrics("b", "d1", 1000, 0.959, 0.95), champion, policy)[0] is False
    assert compare_on_same_split(SplitMetrics("b", "d1", 1000, 0.960, 0.90), champion, policy)[0] is True
    assert compare_on_same_split(SplitMetrics("b", "d1", 1000, 0.990, 0.89), champion, policy)[0] is False
    with pytest.raises(ValueError, match="different test splits"):
        compare_on_same_split(SplitMetrics("b", "d1", 999, 0.99, 0.99), champion, policy)


def test_class_names_must_match_the_champion(store, warehouse):
    champion = register_model(store, warehouse, _card(wrong=20), b"a")
    decide_promotion(warehouse, "wbc", champion.model_version)
    renamed = replace(
        _card(wrong=5),
        class_names=["neutrophil", "lymphocyte", "monocyte", "basophil"],
        per_class_metrics=[
            {**row, "class_name": "basophil"} if row["class_name"] == "eosinophil" else row
            for row in _card(wrong=5).per_class_metrics
        ],
    )
    challenger = register_model(store, warehouse, renamed, b"b")
    decision = decide_promotion(warehouse, "wbc", challenger.model_version)
    assert decision.action == "refused" and "class names differ" in decision.reason


def test_the_card_holds_the_contract_inference_takes(store, warehouse):
    card = register_model(store, warehouse, _card(wrong=20), b"a")
    contract = card.contract()
    assert contract.model_version == card.model_version and contract.class_names == tuple(CLASSES)
    assert contract.class_thresholds == dict(zip(CLASSES, card.referral_policy().thresholds, strict=True))
    assert contract.ood_method == "energy" and contract.ood_threshold == card.ood["threshold"]
    assert (contract.energy_temperature, contract.crop_fraction, contract.test_time_views) == (1.0, 1.0, 1)
    assert contract.pixel_range == card.pixel_range and contract.temperature == card.temperature
    assert contract.decision_settings()["model_version"] == card.model_version


def test_the_contract_triages_exactly_as_the_certified_referral_counts(store, warehouse):
    """One acceptance rule: the cells prediction accepts are the cells the card's test coverage counted."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, len(CLASSES), 400)
    logits = rng.normal(0, 1, (400, len(CLASSES))) + np.eye(len(CLASSES))[labels] * rng.uniform(0, 6, (400, 1))
    card = register_model(store, warehouse, _card(wrong=20), b"a")
    contract, policy = card.contract(), card.referral_policy()
    outcome = evaluate_referral(policy, softmax(logits, card.temperature), labels)
    triage = contract.triage(logits, ood_scores=np.full(len(labels), -math.inf))
    assert int((triage.decisions == "accepted").sum()) == outcome.accepted


def test_registry_reads_never_write_the_warehouse(tmp_path):
    """Reading who is champion, or registry rows, must not re-apply the schema to the lab's file."""
    from hema_pipeline.modeling.promotion import current_champion, current_champions
    from hema_pipeline.modeling.registry import warehouse_rows
    from hema_pipeline.storage.warehouse import Warehouse

    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    with warehouse.connect() as connection:
        connection.execute("drop view referral_queue")
    before = (warehouse.path.stat().st_mtime_ns, warehouse.path.stat().st_size)
    assert current_champion(warehouse, "pbc8") is None
    assert current_champions(warehouse, ["pbc8", "wbc4"]) == {"pbc8": None, "wbc4": None}
    assert warehouse_rows(warehouse, "select * from models").empty
    fresh = Warehouse(warehouse.path)  # a new process's view of the same file
    assert current_champion(fresh, "pbc8") is None and warehouse_rows(fresh, "select * from models").empty
    assert (warehouse.path.stat().st_mtime_ns, warehouse.path.stat().st_size) == before
    assert warehouse.query("select count(*) as n from information_schema.tables where table_name = 'referral_queue'").n[0] == 0
