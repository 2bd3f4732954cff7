"""`hema thresholds fit`: the dysplastic-share threshold re-fitted on the lab's labelled smears from the
champion's predictions, recorded, and used by the `smear_flag_thresholds` asset (issue 16 item 9)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import dagster as dg
import pytest

from hema_pipeline.cli import main
from hema_pipeline.defs.predictions import FlagThresholdsConfig, smear_flag_thresholds
from hema_pipeline.defs.resources import WarehouseResource
from hema_pipeline.inference.flags import FlagSettings
from hema_pipeline.inference.records import prediction_records, write_predictions
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline_tests.test_inference_sql import DYSPLASIA_CLASSES, insert_model, insert_smear, stage

# Dysplastic neutrophils of 10 per smear, and the diagnosis: the shares separate at 0.25.
SMEARS = {f"S{index:x}" + "a" * 19: (dysplastic, dysplastic >= 3) for index, dysplastic in enumerate([0, 1, 2, 3, 5, 4], start=1)}


@pytest.fixture
def warehouse(tmp_path) -> Warehouse:
    store = Warehouse(tmp_path / "warehouse.duckdb")
    with store.connect() as connection:
        insert_model(connection, "dys-v1", "neutrophil_dysplasia", "ds-1", "champion")
        for smear_id, (dysplastic, _) in SMEARS.items():
            insert_smear(connection, smear_id, dt.date(2026, 11, 18), {n: ("neutrophil", None) for n in range(1, 11)})
            cells = {n: ("hypogranulated_neutrophil" if n <= dysplastic else "neutrophil", None) for n in range(1, 11)}
            cells[11] = ("neutrophil", "low_confidence")  # referred: not counted
            frame = stage(smear_id, "neutrophil_dysplasia", "dys-v1", DYSPLASIA_CLASSES, cells)
            write_predictions(connection, prediction_records(frame.iloc[:10], smear_id, "prun", dt.datetime(2026, 11, 19)))
    return store


def _labels(tmp_path, rows: list[tuple[str, str]]):
    path = tmp_path / "labels.csv"
    path.write_text("smear_id,myelodysplasia\n" + "".join(f"{smear},{label}\n" for smear, label in rows))
    return path


def _fits(warehouse: Warehouse):
    return warehouse.query("select * from smear_threshold_fits order by fitted_at")


def test_fit_is_recorded_and_the_flag_thresholds_asset_uses_it(tmp_path, warehouse, capsys):
    labels = _labels(tmp_path, [(smear, "yes" if positive else "no") for smear, (_, positive) in SMEARS.items()])
    arguments = ["thresholds", "fit", "--labels", str(labels), "--reason", "MDS study 2026", "--warehouse", warehouse.location]

    assert main([*arguments, "--dry-run"]) == 0
    assert _fits(warehouse).empty
    assert main(arguments) == 0
    [fit] = _fits(warehouse).to_dict("records")
    assert fit["threshold"] == pytest.approx(0.25)
    assert (fit["sensitivity"], fit["specificity"], fit["positive_smears"], fit["negative_smears"]) == (1.0, 1.0, 3, 3)
    assert (fit["model_version"], fit["reason"]) == ("dys-v1", "MDS study 2026")

    result = dg.materialize([smear_flag_thresholds], resources={"warehouse": WarehouseResource(path=warehouse.location)})
    [output] = [materialisation.metadata for materialisation in result.asset_materializations_for_node("smear_flag_thresholds")]
    assert result.output_for_node("smear_flag_thresholds")["dysplasia_share_threshold"] == pytest.approx(0.25)
    assert output["dysplasia_share_threshold_source"].value.startswith(f"fit {fit['fit_id']}")

    # A value set in the config wins over the fit.
    configured = dg.materialize(
        [smear_flag_thresholds],
        resources={"warehouse": WarehouseResource(path=warehouse.location)},
        run_config={"ops": {"smear_flag_thresholds": {"config": {"dysplasia_share_threshold": 0.2}}}},
    )
    assert configured.output_for_node("smear_flag_thresholds")["dysplasia_share_threshold"] == 0.2


def test_labels_that_cannot_be_used_are_refused_and_nothing_is_recorded(tmp_path, warehouse, capsys):
    def fit(rows):
        code = main(
            ["thresholds", "fit", "--labels", str(_labels(tmp_path, rows)), "--reason", "r", "--warehouse", warehouse.location]
        )
        return code, capsys.readouterr().err

    smears = list(SMEARS)
    code, error = fit([("H26-004711", "yes"), (smears[0], "no")])
    assert code == 1 and "line 2" in error and "pseudonym" in error and "H26-004711" not in error
    code, error = fit([(smears[0], "maybe")])
    assert code == 1 and "line 2: myelodysplasia" in error
    code, error = fit([(smears[0], "no"), (smears[0], "yes")])
    assert code == 1 and "labelled twice" in error
    code, error = fit([(smears[0], "no"), ("S" + "f" * 20, "yes")])
    assert code == 1 and "1 of 2 labelled smears have no accepted neutrophil" in error
    code, error = fit([(smears[0], "no"), (smears[1], "no")])
    assert code == 1 and "both kinds" in error
    assert _fits(warehouse).empty


def test_without_a_fit_the_asset_keeps_the_thesis_threshold(tmp_path):
    result = dg.materialize(
        [smear_flag_thresholds], resources={"warehouse": WarehouseResource(path=str(tmp_path / "none.duckdb"))}
    )
    assert result.output_for_node("smear_flag_thresholds") == dataclasses.asdict(FlagSettings())
    assert not (tmp_path / "none.duckdb").exists()


def test_every_flag_setting_is_in_the_launchpad_with_the_domain_default():
    domain = {field.name: field.default for field in dataclasses.fields(FlagSettings)}
    launchpad = {name: field.default for name, field in FlagThresholdsConfig.model_fields.items()}
    assert set(launchpad) == set(domain)
    # The one field whose default is resolved at run time (the newest fit, else the domain default).
    assert launchpad.pop("dysplasia_share_threshold") is None
    assert launchpad == {name: value for name, value in domain.items() if name != "dysplasia_share_threshold"}
