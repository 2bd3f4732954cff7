"""The retraining trigger: the decision rules on their own, then the sensor through Dagster on a warehouse
with a real (briefly trained) champion, new verified cells, and a champion that refers too many cells."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from hema_pipeline.datasets.tasks import TASKS
from hema_pipeline.defs.automation import RetrainingPolicyResource, retraining_sensor
from hema_pipeline.defs.definitions import defs
from hema_pipeline.defs.resources import WarehouseResource
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.monitoring.retraining import (
    NEW_VERIFIED_CELLS,
    REFERRAL_DRIFT,
    RetrainingPolicy,
    TaskEvidence,
    TaskRetrainingState,
    decide_retraining,
    gather_evidence,
)
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline.taxonomy import CELL_CLASSES
from hema_pipeline_tests.support import TEST_KEY, materialise_smear


def _evidence(
    new_verified: int = 0,
    champion: str | None = "pbc8-aaa",
    predictions: int = 0,
    referred: int = 0,
    window_end: str | None = None,
) -> TaskEvidence:
    return TaskEvidence(
        task="pbc8",
        champion=champion,
        champion_dataset_version="pbc8-dataset" if champion else None,
        new_verified_cells=new_verified,
        drift_window_start=None,
        drift_window_end=window_end,
        predictions_in_window=predictions,
        referred_in_window=referred,
    )


POLICY = RetrainingPolicy(min_new_verified_cells=100, max_referred_share=0.2, min_predictions_for_drift=50)


def test_new_verified_cells_trigger_at_the_threshold_and_not_below() -> None:
    triggers, state = decide_retraining(_evidence(new_verified=99), TaskRetrainingState("pbc8-aaa"), POLICY)
    assert triggers == [] and state.verified_cells_at_last_trigger == 0
    triggers, state = decide_retraining(_evidence(new_verified=100), state, POLICY)
    assert [trigger.reason for trigger in triggers] == [NEW_VERIFIED_CELLS]
    assert state.verified_cells_at_last_trigger == 100
    # The challenger was refused (same champion): the next trigger needs another 100 cells.
    assert decide_retraining(_evidence(new_verified=199), state, POLICY)[0] == []
    assert len(decide_retraining(_evidence(new_verified=200), state, POLICY)[0]) == 1


def test_a_new_champion_starts_a_fresh_count() -> None:
    _, state = decide_retraining(_evidence(new_verified=150), TaskRetrainingState("pbc8-aaa"), POLICY)
    triggers, state = decide_retraining(_evidence(new_verified=20, champion="pbc8-bbb"), state, POLICY)
    assert triggers == [] and state == TaskRetrainingState("pbc8-bbb", 0, None)


def test_referral_drift_needs_enough_predictions_and_a_share_above_the_threshold() -> None:
    state = TaskRetrainingState("pbc8-aaa")
    assert decide_retraining(_evidence(predictions=49, referred=49), state, POLICY)[0] == []  # too few
    assert decide_retraining(_evidence(predictions=100, referred=20), state, POLICY)[0] == []  # 20% is not above 20%
    triggers, next_state = decide_retraining(
        _evidence(predictions=100, referred=21, window_end="2026-11-22T03:00:00.000000"), state, POLICY
    )
    assert [trigger.reason for trigger in triggers] == [REFERRAL_DRIFT]
    assert next_state.drift_checked_until == "2026-11-22T03:00:00.000000"
    assert "21 of 100" in triggers[0].detail


def test_run_keys_are_stable_for_the_same_evidence() -> None:
    first = decide_retraining(_evidence(new_verified=120), TaskRetrainingState("pbc8-aaa"), POLICY)[0][0]
    again = decide_retraining(_evidence(new_verified=120), TaskRetrainingState("pbc8-aaa"), POLICY)[0][0]
    later = decide_retraining(_evidence(new_verified=240), TaskRetrainingState("pbc8-aaa"), POLICY)[0][0]
    assert first.run_key == again.run_key != later.run_key


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetrainingPolicy(min_new_verified_cells=0)
    with pytest.raises(ValueError):
        RetrainingPolicy(max_referred_share=1.5)


# ---------------------------------------------------------------------------------------------------
# Through Dagster


def _train_pbc8(env, instance, selection, checks=None, seed: int = 1) -> dg.ExecuteInProcessResult:
    config = {
        "ops": {
            "pbc8_dataset": {"config": {"image_size": 32, "min_cells_per_class": 8}},
            "pbc8_trained_model": {"config": {"architecture": "compact", "epochs": 1, "seed": seed}},
        }
    }
    job = dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs, resources=env.resources())
    subset = job.resolve_job_def("train_models").get_subset(
        asset_selection=set(selection), asset_check_selection=set(checks) if checks is not None else None
    )
    return subset.execute_in_process(instance=instance, run_config=config, raise_on_error=False)


def _import(env, instance, seed: int, smears: int) -> list[str]:
    export = generate_export(
        env.inbox,
        SyntheticExportSpec(
            smears=smears, cells_per_smear=40, seed=seed, verified_share=1.0, class_mix={name: 1.0 for name in CELL_CLASSES}
        ),
    )
    ids = []
    for smear in export.smears:
        materialise_smear(env, instance, smear.folder.name)
        ids.append(TEST_KEY.smear_id(smear.folder.name))
    return ids


def _evaluate(env, instance, cursor: str | None, policy: RetrainingPolicyResource):
    # Entered and left as a context manager: a context left open keeps the instance's state storage
    # as the process-wide current one after the instance is gone, and a later test's load fails.
    with dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"warehouse": WarehouseResource(path=str(env.warehouse)), "retraining_policy": policy},
    ) as context:
        return retraining_sensor(context)


@pytest.mark.slow
def test_retraining_sensor_fires_at_the_threshold_once_and_the_gate_decides(pipeline_env, dagster_instance):
    env, instance = pipeline_env, dagster_instance
    warehouse = Warehouse(env.warehouse)
    _import(env, instance, seed=71, smears=8)
    pbc8_chain = [
        dg.AssetKey(name)
        for name in ("cell_table", "pbc8_dataset", "pbc8_trained_model", "pbc8_calibration", "pbc8_model", "pbc8_champion")
    ]
    assert _train_pbc8(env, instance, [*pbc8_chain, dg.AssetKey("smear_flag_thresholds")]).success
    with warehouse.connect(read_only=True) as connection:
        baseline = gather_evidence(connection, TASKS["pbc8"])
    assert baseline.champion is not None

    # Two new smears of verified cells; the threshold is exactly what both bring (verified = true class here).
    arriving = generate_export(
        env.home / "arriving",
        SyntheticExportSpec(
            smears=2, cells_per_smear=40, seed=72, verified_share=1.0, class_mix={name: 1.0 for name in CELL_CLASSES}
        ),
    )
    pbc8_labels = set(TASKS["pbc8"].label_map)
    bringing = [sum(label in pbc8_labels for label in smear.true_classes.values()) for smear in arriving.smears]
    policy = RetrainingPolicyResource(
        tasks=["pbc8"],
        min_new_verified_cells=baseline.new_verified_cells + sum(bringing),
        max_referred_share=1.0,
        min_predictions_for_drift=10**9,
    )
    first_folder, second_folder = (smear.folder for smear in arriving.smears)
    first = [TEST_KEY.smear_id(first_folder.name)]
    materialise_smear(env, instance, first_folder.rename(env.inbox / first_folder.name).name)

    # Below the threshold: nothing requested, but the cursor records the task.
    below = _evaluate(env, instance, None, policy)
    assert not below.run_requests
    assert "pbc8" in json.loads(below.cursor)

    materialise_smear(env, instance, second_folder.rename(env.inbox / second_folder.name).name)
    at = _evaluate(env, instance, below.cursor, policy)
    [request] = at.run_requests
    assert request.tags["hema/trigger"] == "retraining" and request.tags["hema/retraining_reason"] == NEW_VERIFIED_CELLS
    assert request.tags["hema/resource"] == "trainer"
    assert set(request.asset_selection) == set(pbc8_chain)

    # Exactly once: the saved cursor requests nothing more; a lost cursor requests the same run key again,
    # which Dagster launches only once.
    assert not _evaluate(env, instance, at.cursor, policy).run_requests
    [again] = _evaluate(env, instance, below.cursor, policy).run_requests
    assert again.run_key == request.run_key

    # The requested run trains a challenger; the promotion gate (not the sensor) decides.
    retrained = _train_pbc8(env, instance, request.asset_selection, request.asset_check_keys, seed=5)
    assert retrained.success
    checks = {evaluation.asset_check_key.name for evaluation in retrained.get_asset_check_evaluations()}
    assert {"schema", "no_patient_in_two_splits"} <= checks
    [decision] = retrained.asset_materializations_for_node("pbc8_champion")
    assert decision.metadata["decision"].value in ("promoted", "refused")
    assert len(warehouse.query("select * from model_promotions where task = 'pbc8'")) == 2

    # Referral drift: the one-epoch champion refers most cells of a predicted smear.
    predict = dg.Definitions(assets=defs.assets, jobs=defs.jobs, resources=env.resources()).resolve_job_def("predict_smears")
    assert predict.execute_in_process(instance=instance, partition_key=first[0]).success
    champion = warehouse.query("select model_version from model_champions where task = 'pbc8'").model_version[0]
    shares = warehouse.query(
        "select count(*) as n, avg(case when accepted then 0 else 1 end) as referred from predictions where model_version = ?",
        [champion],
    ).iloc[0]
    assert shares.n > 0
    drift_policy = RetrainingPolicyResource(
        tasks=["pbc8"],
        min_new_verified_cells=10**9,
        min_predictions_for_drift=int(shares.n),
        max_referred_share=max(float(shares.referred) - 0.01, 0.001),
    )
    [drift] = _evaluate(env, instance, at.cursor, drift_policy).run_requests
    assert drift.tags["hema/retraining_reason"] == REFERRAL_DRIFT
