"""Smear-level thresholds fitted on the lab's own labelled smears (`hema thresholds fit`).

The "review for myelodysplasia" flag fires when a smear's share of dysplastic (hypogranulated) neutrophils
exceeds a threshold: 0.123 in the source thesis (chapter 5, a smear-level ROC on its own smears). A lab
re-fits it on smears whose diagnosis it knows: ``fit_smear_threshold`` takes the shares the current
``neutrophil_dysplasia`` champion gives those smears and picks the threshold at the maximum of Youden's J.
Each fit is recorded in ``smear_threshold_fits`` (who fitted what, on how many smears, with which model,
why), like the promotion gate records its decisions; ``smear_flag_thresholds`` uses the newest fit unless
its config sets the value, so every report names the threshold it was flagged with.

Labels are keyed by smear pseudonym (find them with ``hema query``); a file naming smears by accession or
anything else is refused before anything is read from it into the warehouse: only a digest of the labels
and their counts are stored.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hema_pipeline.storage.warehouse import Warehouse, table_exists
from hema_pipeline.taxonomy import HYPOGRANULATED_NEUTROPHIL, NEUTROPHIL

DYSPLASIA_SHARE_THRESHOLD = "dysplasia_share_threshold"
DYSPLASIA_TASK = "neutrophil_dysplasia"
SMEAR_PSEUDONYM = re.compile(r"S[0-9a-f]{20}")
_TRUE = {"1", "true", "yes", "y", "mds"}
_FALSE = {"0", "false", "no", "n"}


class SmearLabelsError(ValueError):
    """The labels file cannot be used; the message names the line, never its content."""


@dataclass(frozen=True)
class SmearThresholdFit:
    """A smear is flagged when its share is strictly greater than ``threshold``."""

    threshold: float
    sensitivity: float
    specificity: float
    youden_j: float
    auc: float
    positive_smears: int
    negative_smears: int


def fit_smear_threshold(smear_shares: Sequence[float], smear_labels: Sequence[bool]) -> SmearThresholdFit:
    """Re-fit the dysplastic-share threshold on labelled smears (label True: myelodysplasia) at the
    maximum of Youden's J = sensitivity + specificity - 1 on the smear-level ROC curve.

    Candidate thresholds are the midpoints between consecutive distinct shares, so "share > threshold"
    classifies every training smear exactly as the ROC point does. Among thresholds with equal J the
    lowest (most sensitive) wins: a missed myelodysplasia costs more than one more smear to review."""
    from sklearn.metrics import roc_auc_score  # slow import, needed only here

    shares = np.asarray(smear_shares, dtype=np.float64)
    labels = np.asarray(smear_labels, dtype=bool)
    if shares.shape != labels.shape or shares.ndim != 1:
        raise ValueError(f"{shares.shape} shares for {labels.shape} labels")
    if not np.all(np.isfinite(shares)) or shares.min(initial=0.0) < 0.0 or shares.max(initial=0.0) > 1.0:
        raise ValueError("shares must be finite and within [0, 1]")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"a threshold needs labelled smears of both kinds; got {positives} positive, {negatives} negative")

    distinct = np.unique(shares)
    candidates = (distinct[:-1] + distinct[1:]) / 2.0
    if len(candidates) == 0:
        raise ValueError("every smear has the same share: no threshold separates them")
    flagged = shares[None, :] > candidates[:, None]  # [candidate, smear]
    sensitivity = (flagged & labels).sum(axis=1) / positives
    specificity = (~flagged & ~labels).sum(axis=1) / negatives
    youden = sensitivity + specificity - 1.0
    best_j = youden.max()
    if best_j <= 0.0:
        raise ValueError("no threshold does better than chance on these smears (Youden's J <= 0)")
    best = int(np.flatnonzero(np.isclose(youden, best_j, rtol=0.0, atol=1e-12))[0])  # ascending: lowest first
    return SmearThresholdFit(
        threshold=float(candidates[best]),
        sensitivity=float(sensitivity[best]),
        specificity=float(specificity[best]),
        youden_j=float(youden[best]),
        auc=float(roc_auc_score(labels, shares)),
        positive_smears=positives,
        negative_smears=negatives,
    )


def read_smear_labels(path: Path) -> dict[str, bool]:
    """A CSV with columns ``smear_id`` (the pseudonym) and ``myelodysplasia`` (yes/no, true/false, 1/0)."""
    labels: dict[str, bool] = {}
    with path.open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        if reader.fieldnames is None or not {"smear_id", "myelodysplasia"} <= {name.strip() for name in reader.fieldnames}:
            raise SmearLabelsError("the labels file needs a header with the columns smear_id and myelodysplasia")
        for line, row in enumerate(reader, start=2):
            row = {(key or "").strip(): (value or "").strip() for key, value in row.items()}
            smear_id, label = row["smear_id"], row["myelodysplasia"].lower()
            if not SMEAR_PSEUDONYM.fullmatch(smear_id):
                raise SmearLabelsError(
                    f"line {line}: smear_id is not a smear pseudonym (S followed by 20 hex digits); name smears by "
                    'pseudonym, never by accession (`hema query "select smear_id from smears"`)'
                )
            if label not in _TRUE | _FALSE:
                raise SmearLabelsError(f"line {line}: myelodysplasia must be yes/no, true/false or 1/0")
            if smear_id in labels:
                raise SmearLabelsError(f"line {line}: the smear is labelled twice")
            labels[smear_id] = label in _TRUE
    if not labels:
        raise SmearLabelsError("the labels file lists no smear")
    return labels


def dysplasia_shares(connection: Any, smear_ids: Sequence[str]) -> dict[str, tuple[float, str]]:
    """Each smear's dysplastic share among its accepted neutrophils under the current dysplasia champion
    (the ``current_predictions`` view), with that model's version; smears without such predictions, or
    without an accepted neutrophil, are absent."""
    rows = connection.execute(
        "select smear_id, model_version, "
        "count(*) filter (where accepted and predicted_class = ?) as dysplastic, "
        "count(*) filter (where accepted and predicted_class in (?, ?)) as neutrophils "
        "from current_predictions where task = ? group by smear_id, model_version",
        [HYPOGRANULATED_NEUTROPHIL, NEUTROPHIL, HYPOGRANULATED_NEUTROPHIL, DYSPLASIA_TASK],
    ).fetchall()
    wanted = set(smear_ids)
    return {
        smear_id: (int(dysplastic) / int(neutrophils), model_version)
        for smear_id, model_version, dysplastic, neutrophils in rows
        if smear_id in wanted and int(neutrophils) > 0
    }


@dataclass(frozen=True)
class RecordedThresholdFit:
    fit_id: str
    threshold_name: str
    fit: SmearThresholdFit
    model_version: str
    labels_sha256: str
    reason: str
    fitted_at: dt.datetime


def _labels_digest(labels: dict[str, bool]) -> str:
    canonical = "\n".join(f"{smear_id}\t{int(label)}" for smear_id, label in sorted(labels.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()


def fit_dysplasia_threshold(
    warehouse: Warehouse, labels: dict[str, bool], reason: str, record: bool = True
) -> RecordedThresholdFit:
    """Fit the dysplastic-share threshold on ``labels`` with the current dysplasia champion's shares, and
    (``record``) write it to ``smear_threshold_fits`` in one transaction. Every labelled smear must have
    the champion's predictions: a fit on the subset that happens to have them would be a different study."""
    if not reason.strip():
        raise ValueError("a threshold fit needs a reason (who asked, which study)")
    with warehouse.connect(read_only=True) as connection:
        shares = dysplasia_shares(connection, list(labels))
    missing = sorted(set(labels) - set(shares))
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(labels)} labelled smears have no accepted neutrophil predicted by the current "
            f"{DYSPLASIA_TASK} champion (first: {missing[0]}); predict them first, or leave them out"
        )
    versions = {version for _, version in shares.values()}
    if len(versions) != 1:
        raise ValueError(f"the shares come from {len(versions)} model versions; re-predict the smears with one champion")
    ordered = sorted(labels)
    fit = fit_smear_threshold([shares[smear][0] for smear in ordered], [labels[smear] for smear in ordered])
    recorded = RecordedThresholdFit(
        fit_id=uuid.uuid4().hex,
        threshold_name=DYSPLASIA_SHARE_THRESHOLD,
        fit=fit,
        model_version=versions.pop(),
        labels_sha256=_labels_digest(labels),
        reason=reason.strip(),
        fitted_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
    )
    if record:
        with warehouse.transaction(serialise_on=f"threshold:{DYSPLASIA_SHARE_THRESHOLD}") as connection:
            connection.execute(
                "insert into smear_threshold_fits (fit_id, threshold_name, threshold, sensitivity, specificity, youden_j, "
                "auc, positive_smears, negative_smears, model_version, labels_sha256, reason, fitted_at) "
                "values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    recorded.fit_id,
                    recorded.threshold_name,
                    fit.threshold,
                    fit.sensitivity,
                    fit.specificity,
                    fit.youden_j,
                    fit.auc,
                    fit.positive_smears,
                    fit.negative_smears,
                    recorded.model_version,
                    recorded.labels_sha256,
                    recorded.reason,
                    recorded.fitted_at,
                ],
            )
    return recorded


def latest_threshold_fit(warehouse: Warehouse, threshold_name: str = DYSPLASIA_SHARE_THRESHOLD) -> dict[str, Any] | None:
    """The newest recorded fit of ``threshold_name`` as a plain dict, or None (read-only; an absent
    warehouse or table has none)."""
    if not warehouse.exists():
        return None
    with warehouse.connect(read_only=True) as connection:
        if not table_exists(connection, "smear_threshold_fits"):
            return None
        frame = connection.execute(
            "select * from smear_threshold_fits where threshold_name = ? order by fitted_at desc, fit_id limit 1",
            [threshold_name],
        ).df()
    if frame.empty:
        return None
    row = frame.iloc[0].to_dict()
    row["fitted_at"] = str(row["fitted_at"])
    return {key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()}


def describe(recorded: RecordedThresholdFit) -> dict[str, Any]:
    return {
        "fit_id": recorded.fit_id,
        "threshold_name": recorded.threshold_name,
        **asdict(recorded.fit),
        "model_version": recorded.model_version,
        "labels_sha256": recorded.labels_sha256,
        "reason": recorded.reason,
        "fitted_at": recorded.fitted_at.isoformat(),
    }
