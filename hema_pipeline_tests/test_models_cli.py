"""`hema models list | show | promote | rollback`: the registry for operators, through the CLI."""

from __future__ import annotations

import json

import pytest

from hema_pipeline.cli import main
from hema_pipeline.modeling.promotion import current_champion, decide_promotion, promotion_history
from hema_pipeline.modeling.registry import register_model
from hema_pipeline.storage.object_store import LocalObjectStore
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline_tests.test_modeling_registry import _card


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Two registered wbc models on one dataset, the better one champion by the gate."""
    lake = tmp_path / "lake"
    monkeypatch.setenv("HEMA_LAKE", str(lake))
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    store = LocalObjectStore(lake)
    good = register_model(store, warehouse, _card(wrong=10), b"good model")
    weaker = register_model(store, warehouse, _card(wrong=30), b"weaker model")
    assert decide_promotion(warehouse, "wbc", good.model_version).promoted
    assert not decide_promotion(warehouse, "wbc", weaker.model_version).promoted
    return warehouse, good, weaker


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_and_show_read_the_registry_without_writing_it(registry, capsys):
    warehouse, good, weaker = registry
    before = warehouse.path.stat().st_mtime_ns
    code, out, _ = _run(capsys, "models", "list", "--warehouse", str(warehouse.path))
    assert code == 0
    assert good.model_version in out and weaker.model_version in out
    assert "champion" in out and "refused" in out and "referral_certified_accuracy" in out

    code, out, _ = _run(capsys, "models", "show", good.model_version, "--warehouse", str(warehouse.path))
    assert code == 0
    assert f"model {good.model_version} (wbc), status champion" in out
    assert "accepted-cell accuracy >= 90.0% with 90% confidence" in out  # the card's certificate
    assert "from scratch" in out and "#1 promoted" in out

    code, out, _ = _run(capsys, "models", "show", good.model_version, "--json", "--warehouse", str(warehouse.path))
    assert code == 0 and json.loads(out)["model_version"] == good.model_version
    assert warehouse.path.stat().st_mtime_ns == before

    code, _, err = _run(capsys, "models", "show", "wbc-000000000000", "--warehouse", str(warehouse.path))
    assert code == 1 and "no model 'wbc-000000000000'" in err


def test_promote_and_rollback_are_recorded_with_the_operators_reason(registry, capsys):
    warehouse, good, weaker = registry
    code, out, _ = _run(
        capsys,
        "models",
        "promote",
        "wbc",
        weaker.model_version,
        "--reason",
        "clinical review of the refused model",
        "--warehouse",
        str(warehouse.path),
    )
    assert code == 0 and json.loads(out)["previous_champion"] == good.model_version
    assert current_champion(warehouse, "wbc") == weaker.model_version

    code, _, err = _run(
        capsys, "models", "promote", "wbc", weaker.model_version, "--reason", "again", "--warehouse", str(warehouse.path)
    )
    assert code == 1 and "already the champion" in err

    code, out, _ = _run(capsys, "models", "rollback", "wbc", "--reason", "agreement dropped", "--warehouse", str(warehouse.path))
    assert code == 0 and json.loads(out)["champion"] == good.model_version
    assert current_champion(warehouse, "wbc") == good.model_version
    log = promotion_history(warehouse, "wbc")
    assert log["action"].tolist() == ["promoted", "refused", "promoted", "rolled_back"]
    assert log["reason"].tolist()[2:] == ["by operator: clinical review of the refused model", "by operator: agreement dropped"]
    status = dict(warehouse.query("select model_version, status from models").itertuples(index=False))
    assert status == {good.model_version: "champion", weaker.model_version: "rolled_back"}

    code, _, err = _run(capsys, "models", "rollback", "wbc", "--reason", "  ", "--warehouse", str(warehouse.path))
    assert code == 1 and "give a reason" in err
    code, _, err = _run(
        capsys, "models", "promote", "pbc8", good.model_version, "--reason", "x", "--warehouse", str(warehouse.path)
    )
    assert code == 1 and "no model" in err


def test_a_mistyped_warehouse_is_an_error_and_is_not_created(tmp_path, capsys):
    missing = tmp_path / "nowhere.duckdb"
    code, _, err = _run(capsys, "models", "list", "--warehouse", str(missing))
    assert code == 2 and "no warehouse" in err
    assert not missing.exists()
