"""The promotion gate and the champion: who serves each task, decided by an append-only log.

Every decision (the gate's promotion or refusal, an operator's promotion, a rollback) is one event in
``model_promotions``; the ``model_champions`` view over that log is the one definition of champion. The
``models.status`` column is updated in the same transaction as a record for people; nothing decides from it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import duckdb
import pandas as pd

from hema_pipeline.modeling.evaluation import EvaluationReport
from hema_pipeline.modeling.registry import LoadedModel, load_model, utc_now, warehouse_rows
from hema_pipeline.storage.object_store import ObjectStore
from hema_pipeline.storage.warehouse import Warehouse


@dataclass(frozen=True)
class PromotionPolicy:
    """A challenger must beat the champion by both margins (on the same test split) and pass every
    check: the absolute floors below and any external checks (e.g. data-quality gates) given."""

    min_accuracy_gain: float = 0.002  # 0.2 percentage points: below that, PBC-sized test sets cannot tell
    min_macro_f1_gain: float = 0.0  # not worse on the class-balanced view (rare classes matter clinically)
    min_accuracy: float = 0.0
    min_macro_f1: float = 0.0
    max_ece_after: float = 1.0
    min_referral_coverage: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class SplitMetrics:
    """Test metrics of one model on one test split (identified by its dataset version)."""

    model_version: str
    dataset_version: str
    cells: int
    accuracy: float
    macro_f1: float

    @classmethod
    def from_report(cls, model_version: str, dataset_version: str, report: EvaluationReport) -> SplitMetrics:
        """For re-evaluating a champion on the challenger's test split (``dataset_version`` = the
        challenger's): load it with ``load_model``, predict that split, ``evaluate_logits``, then this."""
        return cls(model_version, dataset_version, report.cells, report.accuracy, report.macro_f1)


@dataclass(frozen=True)
class PromotionDecision:
    task: str
    model_version: str
    previous_champion: str | None
    action: Literal["promoted", "refused", "rolled_back"]
    reason: str
    decided_at: dt.datetime

    @property
    def promoted(self) -> bool:
        return self.action == "promoted"


def compare_on_same_split(challenger: SplitMetrics, champion: SplitMetrics, policy: PromotionPolicy) -> tuple[bool, str]:
    """Whether ``challenger`` beats ``champion`` by the policy's margins, and why (or why not). Both must
    have been measured on the same test split; anything else is a comparison of two different exams."""
    if challenger.dataset_version != champion.dataset_version or challenger.cells != champion.cells:
        raise ValueError(
            f"metrics from different test splits: challenger on {challenger.dataset_version} "
            f"({challenger.cells} cells), champion on {champion.dataset_version} ({champion.cells} cells)"
        )
    accuracy_gain = challenger.accuracy - champion.accuracy
    f1_gain = challenger.macro_f1 - champion.macro_f1
    summary = (
        f"accuracy {challenger.accuracy:.4f} vs {champion.accuracy:.4f} ({accuracy_gain:+.4f}, needs "
        f"{policy.min_accuracy_gain:+.4f}); macro F1 {challenger.macro_f1:.4f} vs {champion.macro_f1:.4f} "
        f"({f1_gain:+.4f}, needs {policy.min_macro_f1_gain:+.4f}) on {challenger.dataset_version}"
    )
    # A tiny tolerance so that a gain equal to the margin is not lost to floating-point rounding.
    beats = accuracy_gain >= policy.min_accuracy_gain - 1e-12 and f1_gain >= policy.min_macro_f1_gain - 1e-12
    return beats, summary


def failed_checks(row: Mapping[str, Any], policy: PromotionPolicy, checks: Mapping[str, bool]) -> list[str]:
    """The policy floors and external checks ``row`` (a ``models`` row) fails."""
    failures = [f"check {name} failed" for name, passed in sorted(checks.items()) if not passed]
    if row["accuracy"] < policy.min_accuracy:
        failures.append(f"accuracy {row['accuracy']:.4f} < {policy.min_accuracy:.4f}")
    if row["macro_f1"] < policy.min_macro_f1:
        failures.append(f"macro F1 {row['macro_f1']:.4f} < {policy.min_macro_f1:.4f}")
    if row["ece_after"] > policy.max_ece_after:
        failures.append(f"ECE after calibration {row['ece_after']:.4f} > {policy.max_ece_after:.4f}")
    if row["referral_coverage"] < policy.min_referral_coverage:
        failures.append(f"referral coverage {row['referral_coverage']:.4f} < {policy.min_referral_coverage:.4f}")
    return failures


def decide_promotion(
    warehouse: Warehouse,
    task: str,
    challenger_version: str,
    policy: PromotionPolicy | None = None,
    checks: Mapping[str, bool] | None = None,
    champion_on_challenger_split: SplitMetrics | None = None,
) -> PromotionDecision:
    """Promote ``challenger_version`` to champion of ``task`` or refuse it; record the decision.

    If the champion was tested on a different dataset version than the challenger, its stored metrics
    are not comparable: pass ``champion_on_challenger_split`` (the champion re-evaluated on the
    challenger's test split, see ``SplitMetrics.from_report``), or this raises ``ValueError``."""
    policy = policy or PromotionPolicy()
    # One decision per task at a time: the gate, an operator's promote and a rollback all read the
    # promotion log's last sequence number and append the next.
    with warehouse.transaction(serialise_on=f"promotion:{task}") as connection:
        decision = _decide(connection, task, challenger_version, policy, dict(checks or {}), champion_on_challenger_split)
        _record(connection, decision)
    return decision


def _decide(
    connection: duckdb.DuckDBPyConnection,
    task: str,
    challenger_version: str,
    policy: PromotionPolicy,
    checks: dict[str, bool],
    champion_on_challenger_split: SplitMetrics | None,
) -> PromotionDecision:
    now = utc_now()
    challenger = _model_record(connection, challenger_version)
    if challenger is None or challenger["task"] != task:
        raise LookupError(f"no model {challenger_version!r} registered for task {task!r}")
    stack = _champion_stack(connection, task)
    champion_version = stack[-1] if stack else None

    def decision(action: Literal["promoted", "refused"], reason: str) -> PromotionDecision:
        return PromotionDecision(task, challenger_version, champion_version, action, reason, now)

    if champion_version == challenger_version:
        return decision("refused", "already the champion")
    failures = failed_checks(challenger, policy, checks)
    if failures:
        return decision("refused", "checks failed: " + "; ".join(failures))
    if champion_version is None:
        return decision("promoted", "first model of the task to pass its checks")

    champion = _model_record(connection, champion_version)
    if champion is None:
        raise LookupError(f"champion {champion_version!r} of {task!r} is missing from the models table")
    if _class_names(connection, challenger_version) != _class_names(connection, champion_version):
        return decision("refused", "class names differ from the champion's: the models answer different questions")
    challenger_metrics = SplitMetrics(
        challenger_version,
        challenger["dataset_version"],
        int(challenger["test_cells"]),
        float(challenger["accuracy"]),
        float(challenger["macro_f1"]),
    )
    if champion["dataset_version"] == challenger["dataset_version"]:
        champion_metrics = SplitMetrics(
            champion_version,
            champion["dataset_version"],
            int(champion["test_cells"]),
            float(champion["accuracy"]),
            float(champion["macro_f1"]),
        )
    elif champion_on_challenger_split is None:
        raise ValueError(
            f"champion {champion_version} was tested on {champion['dataset_version']}, the challenger on "
            f"{challenger['dataset_version']}: re-evaluate the champion on the challenger's test split and "
            "pass it as champion_on_challenger_split"
        )
    else:
        champion_metrics = champion_on_challenger_split
        if champion_metrics.model_version != champion_version:
            raise ValueError(f"champion_on_challenger_split is for {champion_metrics.model_version}, not {champion_version}")
    beats, summary = compare_on_same_split(challenger_metrics, champion_metrics, policy)
    if beats:
        return decision("promoted", f"beats the champion: {summary}")
    return decision("refused", f"does not beat the champion: {summary}")


def rollback(warehouse: Warehouse, task: str, reason: str = "rolled back by operator") -> PromotionDecision:
    """Make the champion before the current one champion again; record it. Raises ``LookupError`` when
    there is no earlier champion to return to."""
    # One decision per task at a time: the gate, an operator's promote and a rollback all read the
    # promotion log's last sequence number and append the next.
    with warehouse.transaction(serialise_on=f"promotion:{task}") as connection:
        stack = _champion_stack(connection, task)
        if len(stack) < 2:
            raise LookupError(f"task {task!r} has no earlier champion to roll back to")
        decision = PromotionDecision(task, stack[-2], stack[-1], "rolled_back", reason, utc_now())
        _record(connection, decision)
    return decision


def promote_by_operator(warehouse: Warehouse, task: str, model_version: str, reason: str) -> PromotionDecision:
    """Make a registered model the task's champion on an operator's word, bypassing the gate's margins
    (after a clinical review of a candidate the gate refused, say); recorded in the promotion log like the
    gate's own decisions, with the reason. Refused (raises) for a model not registered for the task, the
    reigning champion, or one whose classes differ from the champion's: those answer another question."""
    reason = reason.strip()
    if not reason:
        raise ValueError("give a reason: it is recorded in the promotion log")
    # One decision per task at a time: the gate, an operator's promote and a rollback all read the
    # promotion log's last sequence number and append the next.
    with warehouse.transaction(serialise_on=f"promotion:{task}") as connection:
        record = _model_record(connection, model_version)
        if record is None or record["task"] != task:
            raise LookupError(f"no model {model_version!r} registered for task {task!r}")
        stack = _champion_stack(connection, task)
        champion = stack[-1] if stack else None
        if champion == model_version:
            raise ValueError(f"{model_version} is already the champion of {task!r}")
        if champion is not None and _class_names(connection, model_version) != _class_names(connection, champion):
            raise ValueError(f"{model_version}'s classes differ from champion {champion}'s")
        decision = PromotionDecision(task, model_version, champion, "promoted", f"by operator: {reason}", utc_now())
        _record(connection, decision)
    return decision


def current_champion(warehouse: Warehouse, task: str) -> str | None:
    return current_champions(warehouse, [task])[task]


def current_champions(warehouse: Warehouse, tasks: Sequence[str]) -> dict[str, str | None]:
    """Each task's champion as the ``model_champions`` view names it (the promotion log's latest
    champion-changing event), over one read-only connection; None for a task without one."""
    if not tasks or not warehouse.exists():
        return dict.fromkeys(tasks)
    placeholders = ", ".join("?" for _ in tasks)
    rows = warehouse.query(f"select task, model_version from model_champions where task in ({placeholders})", list(tasks))
    champions: dict[str, str | None] = dict.fromkeys(tasks)
    champions.update(zip(rows["task"], rows["model_version"], strict=True))
    return champions


def promotion_history(warehouse: Warehouse, task: str) -> pd.DataFrame:
    return warehouse_rows(warehouse, "select * from model_promotions where task = ? order by sequence", [task])


def _champion_stack(connection: duckdb.DuckDBPyConnection, task: str) -> list[str]:
    """Replay the decision log: a promotion pushes a champion, a rollback pops one. The top is the
    champion ``model_champions`` names; the one below is where a rollback goes (only writers replay)."""
    events = connection.execute(
        "select model_version, previous_champion, action from model_promotions where task = ? order by sequence",
        [task],
    ).fetchall()
    stack: list[str] = []
    for model_version, previous_champion, action in events:
        if action == "promoted":
            stack.append(model_version)
        elif action == "rolled_back":
            if len(stack) < 2 or stack[-1] != previous_champion or stack[-2] != model_version:
                raise RuntimeError(f"the promotion log of {task!r} is inconsistent at a rollback to {model_version}")
            stack.pop()
    return stack


def _record(connection: duckdb.DuckDBPyConnection, decision: PromotionDecision) -> None:
    (sequence,) = connection.execute(
        "select coalesce(max(sequence), 0) + 1 from model_promotions where task = ?", [decision.task]
    ).fetchall()[0]
    connection.execute(
        "insert into model_promotions (event_id, task, sequence, model_version, previous_champion, action, reason, "
        "decided_at) values (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            str(uuid.uuid4()),
            decision.task,
            sequence,
            decision.model_version,
            decision.previous_champion,
            decision.action,
            decision.reason,
            decision.decided_at,
        ],
    )
    if decision.action == "promoted":
        if decision.previous_champion is not None:
            _set_status(connection, decision.previous_champion, "retired")
        _set_status(connection, decision.model_version, "champion")
    elif decision.action == "rolled_back":
        if decision.previous_champion is not None:
            _set_status(connection, decision.previous_champion, "rolled_back")
        _set_status(connection, decision.model_version, "champion")
    else:
        # A refusal never demotes: asking to promote the reigning champion again is refused, and it
        # stays champion.
        connection.execute(
            "update models set status = 'refused' where model_version = ? and status <> 'champion'",
            [decision.model_version],
        )


def _set_status(connection: duckdb.DuckDBPyConnection, model_version: str, status: str) -> None:
    connection.execute("update models set status = ? where model_version = ?", [status, model_version])


def _model_record(connection: duckdb.DuckDBPyConnection, model_version: str) -> dict[str, Any] | None:
    frame = connection.execute("select * from models where model_version = ?", [model_version]).df()
    return None if frame.empty else {str(column): value for column, value in frame.iloc[0].items()}


def _class_names(connection: duckdb.DuckDBPyConnection, model_version: str) -> list[str]:
    rows = connection.execute(
        "select class_name from model_evaluations where model_version = ? order by class_index", [model_version]
    ).fetchall()
    return [name for (name,) in rows]


def load_champion(store: ObjectStore, warehouse: Warehouse, task: str) -> LoadedModel:
    """The current champion of ``task``, checked against its card's hash like any registered model."""
    champion = current_champion(warehouse, task)
    if champion is None:
        raise LookupError(f"task {task!r} has no champion model")
    return load_model(store, warehouse, task, champion)
