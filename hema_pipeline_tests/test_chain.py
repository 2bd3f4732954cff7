"""The whole chain through real Dagster materialisation on synthetic smears:
import -> cell table (GX checks) -> datasets -> train -> calibrate -> register -> promotion gate ->
per-smear predictions and reports -> SQL views and `hema classify`."""

from __future__ import annotations

import csv

import dagster as dg
import pytest

from hema_pipeline.datasets.tasks import TASKS as TASK_DEFINITIONS
from hema_pipeline.defs.definitions import defs
from hema_pipeline.defs.ingest import smear_partitions
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline.taxonomy import CELL_CLASSES
from hema_pipeline_tests.support import materialise_inbox

pytestmark = pytest.mark.slow

IMAGE_SIZE = 64
TASKS = ("pbc8", "neutrophil_dysplasia")


def _training_run_config(epochs: int, learning_rate: float = 2e-3, seed: int = 1, margin: float = 0.002) -> dict:
    ops: dict = {}
    for task in TASKS:
        ops[f"{task}_dataset"] = {"config": {"image_size": IMAGE_SIZE, "min_cells_per_class": 8}}
        ops[f"{task}_trained_model"] = {
            "config": {
                "architecture": "compact",
                "epochs": epochs,
                "learning_rate": learning_rate,
                "seed": seed,
                "early_stopping_patience": 12,
            }
        }
        ops[f"{task}_champion"] = {"config": {"min_accuracy_gain": margin}}
        # ~40 calibration cells per task here: enough to certify 80% at 80% confidence (8 error-free cells
        # needed), far from the 598 that the production target (99.5% at 95%) needs.
        ops[f"{task}_calibration"] = {"config": {"target_accuracy": 0.8, "referral_confidence": 0.8}}
    return {"ops": ops}


def _train(env, instance, **config) -> dg.ExecuteInProcessResult:
    selection = dg.AssetSelection.assets("cell_table", "smear_flag_thresholds") | dg.AssetSelection.assets(
        *[f"{task}_{stage}" for task in TASKS for stage in ("dataset", "trained_model", "calibration", "model", "champion")]
    )
    return dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=selection,
        instance=instance,
        resources=env.resources(),
        run_config=_training_run_config(**config),
    )


def _decision(result: dg.ExecuteInProcessResult, task: str) -> str:
    [materialisation] = result.asset_materializations_for_node(f"{task}_champion")
    return materialisation.metadata["decision"].value


def _prediction_job(env) -> dg.JobDefinition:
    return dg.Definitions(assets=defs.assets, jobs=defs.jobs, resources=env.resources()).resolve_job_def("predict_smears")


def _predict(env, instance, partitions) -> None:
    for partition in partitions:
        assert _prediction_job(env).execute_in_process(instance=instance, partition_key=partition).success


def _predict_batch(env, instance, first: str, last: str) -> dg.ExecuteInProcessResult:
    """One run over a range of smear partitions, as a backfill under the asset's BackfillPolicy launches it."""
    return _prediction_job(env).execute_in_process(
        instance=instance,
        tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
        raise_on_error=False,
    )


@pytest.fixture
def chain(pipeline_env, dagster_instance):
    generate_export(
        pipeline_env.inbox,
        SyntheticExportSpec(smears=10, cells_per_smear=40, seed=51, class_mix={name: 1.0 for name in CELL_CLASSES}),
    )
    materialise_inbox(pipeline_env, dagster_instance)
    return pipeline_env, dagster_instance


def test_train_register_promote_predict_report(chain, tmp_path):
    env, instance = chain
    warehouse = Warehouse(env.warehouse)

    # A crippled first model (a learning rate too small to learn) becomes champion: nothing to beat yet.
    crippled = _train(env, instance, epochs=1, learning_rate=1e-7, seed=1)
    assert _decision(crippled, "pbc8") == "promoted"
    first_champion = crippled.asset_materializations_for_node("pbc8_champion")[0].metadata["champion"].value

    # A properly trained challenger beats it on the same test split and is promoted.
    trained = _train(env, instance, epochs=40, seed=2)
    assert _decision(trained, "pbc8") == "promoted"
    [model] = trained.asset_materializations_for_node("pbc8_model")
    metadata = {key: value.value for key, value in model.metadata.items()}
    assert metadata["accuracy"] > 0.5, "12 epochs on synthetic cells must beat chance (1/8) by far"
    assert 0 <= metadata["ece_after"] <= 1 and metadata["temperature"] > 0
    champion = trained.asset_materializations_for_node("pbc8_champion")[0].metadata["champion"].value
    assert champion != first_champion
    # Training is not silent: one progress line per epoch in the run's event log.
    progress = [entry.user_message for entry in instance.all_logs(trained.run_id) if "pbc8: epoch " in entry.user_message]
    assert progress and progress[0].startswith("pbc8: epoch 1/40: loss ") and "min left)" in progress[-1]
    # The referral threshold is certified on the calibration split, and the certificate reaches the UI,
    # the model card and SQL.
    [calibration] = trained.asset_materializations_for_node("pbc8_calibration")
    statement = calibration.metadata["referral_guarantee"].value
    assert statement.startswith("accepted-cell accuracy >= 80.0% with 80% confidence"), statement
    assert metadata["referral_guarantee"] == statement
    certified = warehouse.query(
        "select referral_target, referral_confidence, referral_certified_accuracy from models where model_version = ?",
        [champion],
    ).iloc[0]
    assert (certified.referral_target, certified.referral_confidence) == (0.8, 0.8)
    assert certified.referral_certified_accuracy >= 0.8

    # A worse challenger (crippled again, another seed) is refused; the champion stays.
    refused = _train(env, instance, epochs=1, learning_rate=1e-7, seed=3)
    assert _decision(refused, "pbc8") == "refused"
    assert refused.asset_materializations_for_node("pbc8_champion")[0].metadata["champion"].value == champion
    promotions = warehouse.query("select action from model_promotions where task = 'pbc8' order by sequence")
    assert promotions["action"].tolist() == ["promoted", "promoted", "refused"]

    # Lineage in the warehouse: model -> dataset version -> the dataset's manifest.
    models = warehouse.query("select model_version, dataset_version, status from models where task = 'pbc8'")
    assert models["dataset_version"].nunique() == 1
    assert set(models["status"]) >= {"champion"}
    evaluations = warehouse.query("select * from model_evaluations where model_version = ?", [champion])
    assert len(evaluations) == 8

    # Predictions for every smear with the champion, and a report each: the first smear in a run of its
    # own, the other nine in one batched run (the champions loaded once), as a backfill would.
    partitions = list(instance.get_dynamic_partitions(smear_partitions.name))
    _predict(env, instance, partitions[:1])
    batch = _predict_batch(env, instance, partitions[1], partitions[-1])
    assert batch.success
    batched = [m for m in batch.asset_materializations_for_node("smear_predictions") if m.asset_key.path == ["smear_predictions"]]
    assert sorted(materialisation.partition for materialisation in batched) == sorted(partitions[1:])
    assert batched[0].metadata["smears"].value == len(partitions) - 1
    predictions = warehouse.query("select * from predictions where task = 'pbc8'")
    cells = warehouse.query("select count(*) as n from cells").n[0]
    assert len(predictions) == cells
    assert set(predictions["model_version"]) == {champion}
    assert warehouse.query("select count(*) as n from smear_reports").n[0] == len(partitions)

    # No train/serve skew: the champion's card carries the dataset's crop and the calibrated views, and a
    # smear's stored confidences are what the evaluation path (dataset preprocessing, predict_outputs over
    # those views, the card's temperature) computes for the same images.
    import numpy as np

    from hema_pipeline.datasets.input_pipeline import evaluation_dataset
    from hema_pipeline.modeling.calibration import softmax
    from hema_pipeline.modeling.networks import predict_outputs
    from hema_pipeline.modeling.registry import load_model
    from hema_pipeline.storage.object_store import LocalObjectStore

    loaded = load_model(LocalObjectStore(env.lake), warehouse, "pbc8", champion)
    assert (loaded.card.crop_fraction, loaded.card.test_time_views, loaded.card.input_size) == (0.75, 8, IMAGE_SIZE)
    stored = warehouse.query(
        "select c.image_key, p.confidence from predictions p join cells c using (cell_uid) "
        "where p.smear_id = ? and p.task = 'pbc8' order by p.cell_uid",
        [partitions[0]],
    )
    paths = [str(env.lake / key) for key in stored["image_key"]]
    images = evaluation_dataset(paths, [0] * len(paths), image_size=IMAGE_SIZE, crop_fraction=0.75, cache=False)
    logits = predict_outputs(loaded.model, images, test_time_views=8).logits
    np.testing.assert_allclose(softmax(logits, loaded.card.temperature).max(axis=1), stored["confidence"], atol=1e-4)

    # The SQL view gives the differential computed here by hand from the prediction rows.
    smear = partitions[0]
    rows = predictions[(predictions["smear_id"] == smear) & predictions["accepted"]]
    by_hand = rows["predicted_class"].value_counts().to_dict()
    view = warehouse.query(
        "select cell_class, cells from differential_per_smear where smear_id = ? and task = 'pbc8' and cells > 0",
        [smear],
    )
    assert dict(zip(view["cell_class"], view["cells"], strict=True)) == by_hand

    # Re-running predictions adds no rows; a new champion adds its own and keeps the old ones.
    _predict(env, instance, partitions[:2])
    assert warehouse.query("select count(*) as n from predictions where task = 'pbc8'").n[0] == cells
    from hema_pipeline.modeling.promotion import current_champion, rollback

    rollback(warehouse, "pbc8", reason="test: champion change")
    assert current_champion(warehouse, "pbc8") == first_champion
    _predict(env, instance, partitions[:1])
    again = warehouse.query("select model_version, count(*) as n from predictions where task = 'pbc8' group by 1")
    counts = dict(zip(again["model_version"], again["n"], strict=True))
    first_smear_cells = int((predictions["smear_id"] == partitions[0]).sum())
    assert counts == {champion: cells, first_champion: first_smear_cells}

    # In a batch, one smear that cannot be predicted (an image gone from the lake) does not stop the
    # others: theirs are saved, and the run fails naming the smear by pseudonym only.
    broken = warehouse.query("select image_key from cells where smear_id = ? order by cell_id limit 1", [partitions[1]])
    shared = warehouse.query("select count(*) as n from cells where image_key = ?", [broken.image_key[0]]).n[0]
    assert shared == 1, "the synthetic images are unique, so only this smear loses a cell"
    (env.lake / broken.image_key[0]).unlink()
    failed = _predict_batch(env, instance, partitions[1], partitions[2])
    assert not failed.success
    [failure] = [event for event in failed.all_events if event.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert f"1 of 2 smear(s) could not be predicted (1 predicted and saved): {partitions[1]} " in message
    assert str(env.lake) not in message
    rolled_back = warehouse.query(
        "select smear_id, count(*) as n from predictions where model_version = ? group by 1", [first_champion]
    )
    assert set(rolled_back["smear_id"]) == {partitions[0], partitions[2]}

    # `hema classify` on a folder with one corrupt file: a CSV row per readable image, exit code 1.
    from hema_pipeline.cli import main

    folder = tmp_path / "to_classify"
    folder.mkdir()
    for image in sorted((env.lake / "images").rglob("*.jpg"))[:5]:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    output = tmp_path / "out.csv"
    code = main(["classify", "-d", str(folder), "-o", str(output), "--task", "pbc8", "--warehouse", str(env.warehouse), "-q"])
    assert code == 1
    with output.open() as stream:
        table = list(csv.DictReader(stream))
    assert len(table) == 5 and "broken.jpg" not in {row["file"] for row in table}
    assert {f"p_{name}" for name in ("neutrophil", "platelet")} <= set(table[0])
    pbc8_classes = TASK_DEFINITIONS["pbc8"].classes
    assert all(abs(sum(float(row[f"p_{name}"]) for name in pbc8_classes) - 1) < 1e-4 for row in table)


def test_an_ensemble_trains_registers_and_predicts_through_dagster(chain, tmp_path):
    env, instance = chain
    task = "neutrophil_dysplasia"
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=dg.AssetSelection.assets(
            "cell_table",
            "smear_flag_thresholds",
            *[f"{task}_{stage}" for stage in ("dataset", "trained_model", "calibration", "model", "champion")],
        ),
        instance=instance,
        resources=env.resources(),
        run_config={
            "ops": {
                f"{task}_dataset": {"config": {"image_size": IMAGE_SIZE, "min_cells_per_class": 8}},
                f"{task}_trained_model": {"config": {"epochs": 3, "seed": 5, "ensemble_members": 2}},
            }
        },
    )
    assert result.success
    [trained] = result.asset_materializations_for_node(f"{task}_trained_model")
    members = trained.metadata["members"].value
    assert [member["seed"] for member in members] == [5, 6]
    assert trained.metadata["epochs_run"].value == sum(member["epochs_run"] for member in members)
    assert trained.metadata["training_curves"].value.count("data:image/png;base64,") == 2
    champion = result.asset_materializations_for_node(f"{task}_champion")[0].metadata["champion"].value

    from hema_pipeline.modeling.registry import load_model
    from hema_pipeline.storage.object_store import LocalObjectStore

    warehouse = Warehouse(env.warehouse)
    loaded = load_model(LocalObjectStore(env.lake), warehouse, task, champion)
    assert loaded.card.architecture["ensemble_members"] == 2
    assert {"m0_stage0_block0_conv", "m1_stage0_block0_conv"} <= {layer.name for layer in loaded.model.layers}

    # The champion ensemble answers through `hema classify` like any model.
    from hema_pipeline.cli import main

    folder = tmp_path / "to_classify"
    folder.mkdir()
    for image in sorted((env.lake / "images").rglob("*.jpg"))[:4]:
        (folder / image.name).write_bytes(image.read_bytes())
    output = tmp_path / "out.csv"
    assert main(["classify", "-d", str(folder), "-o", str(output), "--task", task, "--warehouse", str(env.warehouse), "-q"]) == 0
    with output.open() as stream:
        table = list(csv.DictReader(stream))
    assert len(table) == 4 and {row["predicted_class"] for row in table} <= set(loaded.card.class_names)
    assert all(abs(sum(float(row[f"p_{name}"]) for name in loaded.card.class_names) - 1) < 1e-4 for row in table)


def test_blocking_check_stops_datasets_on_planted_bad_rows(chain):
    env, instance = chain
    import duckdb

    with duckdb.connect(str(env.warehouse)) as connection:
        connection.execute("update cells set verified_class = 'smudge_cell' where cell_id = 1")
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=dg.AssetSelection.assets("cell_table", "pbc8_dataset"),
        instance=instance,
        resources=env.resources(),
        raise_on_error=False,
    )
    assert not result.success
    evaluations = {
        event.event_specific_data.check_name: event.event_specific_data.passed
        for event in result.all_events
        if event.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert evaluations["labels_in_taxonomy"] is False
    assert not result.asset_materializations_for_node("pbc8_dataset")


def test_task_without_data_produces_no_model_and_does_not_fail(pipeline_env, dagster_instance):
    healthy = {name: 1.0 for name in CELL_CLASSES if name not in ("malignant_lymphocyte", "hypogranulated_neutrophil")}
    generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=4, cells_per_smear=20, seed=52, class_mix=healthy))
    materialise_inbox(pipeline_env, dagster_instance)
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=dg.AssetSelection.assets("cell_table", "lymphocyte_malignancy_dataset", "lymphocyte_malignancy_trained_model"),
        instance=dagster_instance,
        resources=pipeline_env.resources(),
    )
    assert result.success
    assert not result.asset_materializations_for_node("lymphocyte_malignancy_dataset")
    assert not result.asset_materializations_for_node("lymphocyte_malignancy_trained_model")
    observations = [event for event in result.all_events if event.event_type_value == "ASSET_OBSERVATION"]
    reason = observations[0].event_specific_data.asset_observation.metadata["reason"].value
    assert "malignant_lymphocyte" in reason and "no verified cells" in reason


def test_near_duplicate_across_patients_is_dropped_before_splitting(pipeline_env, dagster_instance):
    import io

    from PIL import Image

    export = generate_export(
        pipeline_env.inbox,
        SyntheticExportSpec(smears=6, cells_per_smear=30, seed=53, class_mix={name: 1.0 for name in CELL_CLASSES}),
    )
    first, other = export.smears[0], next(s for s in export.smears[1:] if s.patient != export.smears[0].patient)

    def a_neutrophil(smear):  # a class pbc8 learns, so both cells enter its dataset
        return smear.folder / smear.image_names[min(i for i, c in smear.true_classes.items() if c == "neutrophil")]

    source, target = a_neutrophil(first), a_neutrophil(other)
    copy = io.BytesIO()
    Image.open(source).resize((342, 345)).resize((360, 363)).save(copy, "JPEG", quality=75)  # resized, re-encoded
    target.write_bytes(copy.getvalue())
    materialise_inbox(pipeline_env, dagster_instance)

    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=dg.AssetSelection.assets("cell_table", "pbc8_dataset"),
        instance=dagster_instance,
        resources=pipeline_env.resources(),
        run_config={"ops": {"pbc8_dataset": {"config": {"min_cells_per_class": 3}}}},
    )

    assert result.success
    [dataset] = result.asset_materializations_for_node("pbc8_dataset")
    assert dataset.metadata["near_duplicates_dropped"].value == 1
    checks = {
        event.event_specific_data.check_name: event.event_specific_data.passed
        for event in result.all_events
        if event.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert checks["no_near_duplicates_across_splits"] and checks["no_patient_in_two_splits"]
