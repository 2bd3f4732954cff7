"""When a task deserves a new model: enough newly verified cells, or the champion referring too many.

Plain Python over the warehouse tables (no Dagster): ``gather_evidence`` reads what happened since the
champion was trained, ``decide_retraining`` turns evidence plus the previous decision state into
triggers and the next state. The state is what a sensor keeps in its cursor, so the same evidence never
triggers twice, across restarts included.

- **New verified cells**: technologist-verified cells whose label the task learns and which are not in
  the champion's dataset manifest (verified or imported after the champion's dataset was built). A task
  with no champion counts every such cell, so a task that lacked data trains once it has some. After a
  trigger the count is remembered; the next trigger needs another ``min_new_verified_cells`` on top, so
  a challenger refused by the promotion gate does not cause a retraining loop.
- **Referral drift**: the share of the champion's predictions referred to a technologist, over the
  predictions made since the champion was promoted (or since the last drift trigger), once at least
  ``min_predictions_for_drift`` of them exist. A rising referred share is the first sign of a new stain,
  a new analyser or a changed population.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb

from hema_pipeline.datasets.tasks import Task

NEW_VERIFIED_CELLS = "new_verified_cells"
REFERRAL_DRIFT = "referral_drift"


@dataclass(frozen=True)
class RetrainingPolicy:
    min_new_verified_cells: int = 500
    max_referred_share: float = 0.25
    min_predictions_for_drift: int = 1000

    def __post_init__(self) -> None:
        if self.min_new_verified_cells < 1:
            raise ValueError("min_new_verified_cells must be at least 1")
        if not 0.0 < self.max_referred_share <= 1.0:
            raise ValueError("max_referred_share must be in (0, 1]")
        if self.min_predictions_for_drift < 1:
            raise ValueError("min_predictions_for_drift must be at least 1")


@dataclass(frozen=True)
class TaskEvidence:
    task: str
    champion: str | None
    champion_dataset_version: str | None
    new_verified_cells: int  # verified task cells outside the champion's dataset
    drift_window_start: str | None  # ISO UTC; predictions after this count towards drift
    drift_window_end: str | None  # ISO UTC of the newest prediction counted
    predictions_in_window: int
    referred_in_window: int

    @property
    def referred_share(self) -> float:
        return self.referred_in_window / self.predictions_in_window if self.predictions_in_window else 0.0


@dataclass(frozen=True)
class TaskRetrainingState:
    """What the last decision for a task remembered (one entry of the sensor cursor)."""

    champion: str | None = None
    verified_cells_at_last_trigger: int = 0
    drift_checked_until: str | None = None  # ISO UTC: predictions up to here already judged by a drift trigger

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TaskRetrainingState:
        return cls(
            champion=values.get("champion"),
            verified_cells_at_last_trigger=int(values.get("verified_cells_at_last_trigger", 0)),
            drift_checked_until=values.get("drift_checked_until"),
        )


@dataclass(frozen=True)
class RetrainingTrigger:
    task: str
    reason: str  # NEW_VERIFIED_CELLS | REFERRAL_DRIFT
    detail: str
    evidence: TaskEvidence = field(compare=False)

    @property
    def run_key(self) -> str:
        """Identical for identical evidence: a launcher that deduplicates by run key launches once even
        if the state was lost between deciding and saving."""
        marker = (
            str(self.evidence.new_verified_cells) if self.reason == NEW_VERIFIED_CELLS else str(self.evidence.drift_window_end)
        )
        return f"retrain:{self.task}:{self.evidence.champion or 'none'}:{self.reason}:{marker}"


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None).isoformat(timespec="microseconds")
    return str(value)


def gather_evidence(connection: duckdb.DuckDBPyConnection, task: Task, drift_checked_until: str | None = None) -> TaskEvidence:
    """Read the task's champion, its dataset and what arrived since, from the warehouse."""
    champion_row = connection.execute(
        """
        select c.model_version, m.dataset_version, c.decided_at
        from model_champions c join models m using (model_version)
        where c.task = ?
        """,
        [task.name],
    ).fetchone()
    champion, dataset_version, promoted_at = champion_row if champion_row else (None, None, None)
    labels = sorted(task.label_map)
    placeholders = ", ".join("?" for _ in labels)
    new_verified_row = connection.execute(
        f"""
        select count(*) from cells c
        where c.verified_class in ({placeholders})
          and not exists (
              select 1 from dataset_manifests d where d.dataset_version = ? and d.cell_uid = c.cell_uid
          )
        """,
        [*labels, dataset_version or ""],
    ).fetchone() or (0,)
    new_verified = int(new_verified_row[0])

    window_start = max((value for value in (_iso(promoted_at), drift_checked_until) if value is not None), default=None)
    predictions = referred = 0
    window_end = None
    if champion is not None:
        predictions, referred, newest = connection.execute(
            """
            select count(*), count(*) filter (where not accepted), max(predicted_at)
            from predictions
            where model_version = ? and (cast(? as timestamp) is null or predicted_at > cast(? as timestamp))
            """,
            [champion, window_start, window_start],
        ).fetchone() or (0, 0, None)
        window_end = _iso(newest)
    return TaskEvidence(
        task=task.name,
        champion=champion,
        champion_dataset_version=dataset_version,
        new_verified_cells=int(new_verified),
        drift_window_start=window_start,
        drift_window_end=window_end,
        predictions_in_window=int(predictions),
        referred_in_window=int(referred),
    )


def decide_retraining(
    evidence: TaskEvidence, state: TaskRetrainingState, policy: RetrainingPolicy
) -> tuple[list[RetrainingTrigger], TaskRetrainingState]:
    """Triggers for one task and the state to remember. A new champion starts a fresh count."""
    if state.champion != evidence.champion:
        state = TaskRetrainingState(champion=evidence.champion)
    triggers: list[RetrainingTrigger] = []
    baseline = min(state.verified_cells_at_last_trigger, evidence.new_verified_cells)
    if evidence.new_verified_cells - baseline >= policy.min_new_verified_cells:
        since = (
            f"the champion's dataset {evidence.champion_dataset_version}" if evidence.champion else "the start (no champion yet)"
        )
        triggers.append(
            RetrainingTrigger(
                evidence.task,
                NEW_VERIFIED_CELLS,
                f"{evidence.new_verified_cells} technologist-verified cells not in {since} "
                f"(threshold {policy.min_new_verified_cells} beyond {baseline} at the last trigger)",
                evidence,
            )
        )
        state = TaskRetrainingState(state.champion, evidence.new_verified_cells, state.drift_checked_until)
    else:
        state = TaskRetrainingState(state.champion, baseline, state.drift_checked_until)
    if (
        evidence.champion is not None
        and evidence.predictions_in_window >= policy.min_predictions_for_drift
        and evidence.referred_share > policy.max_referred_share
    ):
        triggers.append(
            RetrainingTrigger(
                evidence.task,
                REFERRAL_DRIFT,
                f"champion {evidence.champion} referred {evidence.referred_in_window} of "
                f"{evidence.predictions_in_window} cells ({evidence.referred_share:.1%}) since "
                f"{evidence.drift_window_start or 'its promotion'}, above {policy.max_referred_share:.1%}",
                evidence,
            )
        )
        state = TaskRetrainingState(state.champion, state.verified_cells_at_last_trigger, evidence.drift_window_end)
    return triggers, state
