"""Train / validation / calibration / test splits, stratified by class and grouped by patient.

All cells of one patient go to one split: cells from one smear share stain, analyser and patient-specific
morphology, and a model tested on the patients it learnt from reports an accuracy no new patient will see
(the leakage behind the "99.9% validation" of public blood-cell sets).

How patients are assigned. scikit-learn's ``StratifiedGroupKFold`` makes equal folds; mapping 12/3/2/3 of
20 folds onto the splits works for large cohorts, but a lab's task often has tens of patients, where equal
folds fit unequal fractions badly. On synthetic cohorts (8 imbalanced classes, 20-120 cells and a different
class mix per patient, fractions 0.6/0.15/0.1/0.15, 20 cohorts per size), the deviation of a class's share
in a split from its target, mean (worst) over cohorts of the worst class and split:

    patients                    20            50            200           1000
    StratifiedGroupKFold        0.265 (0.363) 0.121 (0.236) 0.024 (0.053) 0.003 (0.006)
    this module                 0.105 (0.225) 0.033 (0.041) 0.005 (0.006) 0.001 (0.001)

at the same speed (0.5 s for 1,000 patients and 69,000 cells). The assignment generalises the greedy idea
behind ``StratifiedGroupKFold`` to unequal targets: patients are placed largest first (a size bucket per
power of two, shuffled by ``seed`` within the bucket), each into the split where it most reduces the
squared shortfall of every class against that split's target, classes weighted equally whatever their size
so a rare class is placed as carefully as a common one. Single-patient moves then lower the shortfall
further, and the best of eight such attempts (differently ordered, all from ``seed``) is kept. The result
depends only on the rows' (patient, label) content and the seed, never on row order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import pandas as pd

TRAIN: Final = "train"
VALIDATION: Final = "validation"
CALIBRATION: Final = "calibration"
TEST: Final = "test"
SPLIT_NAMES: Final[tuple[str, ...]] = (TRAIN, VALIDATION, CALIBRATION, TEST)

SPLIT_COLUMN: Final = "split"


@dataclass(frozen=True)
class SplitFractions:
    train: float = 0.60
    validation: float = 0.15
    calibration: float = 0.10
    test: float = 0.15

    def __post_init__(self) -> None:
        values = self.as_tuple()
        if any(value < 0 for value in values):
            raise ValueError(f"split fractions must not be negative: {self.as_dict()}")
        if self.train <= 0:
            raise ValueError("the train fraction must be positive")
        if abs(sum(values) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {sum(values):.6f}: {self.as_dict()}")

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.train, self.validation, self.calibration, self.test)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(SPLIT_NAMES, self.as_tuple(), strict=True))


@dataclass(frozen=True)
class PatientSplit:
    # The split name of every input row, indexed like the input frame.
    assignments: pd.Series
    # Cells per split (rows, in SPLIT_NAMES order) and class (columns).
    class_counts: pd.DataFrame
    # Distinct patients per split.
    patient_counts: dict[str, int]

    def cell_counts(self) -> dict[str, int]:
        return {name: int(count) for name, count in self.class_counts.sum(axis=1).items()}

    def class_shares(self) -> pd.DataFrame:
        """Each class's share of its cells in each split (columns sum to 1), to compare with the fractions."""
        totals = self.class_counts.sum(axis=0).replace(0, np.nan)
        return self.class_counts.div(totals, axis=1).fillna(0.0)

    def report(self) -> dict[str, dict[str, int]]:
        """Plain nested dict, split -> class -> cells, for logs and metadata."""
        return {split: {str(label): int(count) for label, count in row.items()} for split, row in self.class_counts.iterrows()}


# Greedy passes from different patient orders; the assignment with the lowest shortfall wins.
_RESTARTS: Final = 8
_MAX_IMPROVEMENT_PASSES: Final = 20


class _Placement:
    """Patients (rows of ``counts``: cells per class) placed into splits (rows of ``targets``)."""

    def __init__(self, counts: np.ndarray, targets: np.ndarray, open_splits: np.ndarray) -> None:
        self.counts = counts
        self.targets = targets
        self.open_splits = open_splits
        # equal weight per class on its relative shortfall: ((assigned - target) / class_total)^2
        self.class_weights = 1.0 / np.maximum(counts.sum(axis=0), 1.0) ** 2
        self.assigned = np.zeros_like(targets)
        self.split_of = np.full(len(counts), -1, dtype=np.int64)

    def cost(self) -> float:
        return float((((self.assigned - self.targets) ** 2) * self.class_weights).sum())

    def growth_if_added(self, patient: int) -> np.ndarray:
        """Change of the cost if ``patient`` joined each split (closed splits: infinite)."""
        cells = self.counts[patient]
        growth = ((cells**2 + 2.0 * cells * (self.assigned - self.targets)) * self.class_weights).sum(axis=1)
        growth[~self.open_splits] = np.inf
        return growth

    def move(self, patient: int, split: int) -> None:
        previous = self.split_of[patient]
        if previous >= 0:
            self.assigned[previous] -= self.counts[patient]
        self.assigned[split] += self.counts[patient]
        self.split_of[patient] = split

    def place_greedily(self, order: np.ndarray) -> None:
        for patient in order:
            self.move(patient, int(np.argmin(self.growth_if_added(patient))))

    def fill_empty_splits(self, sizes: np.ndarray) -> None:
        """Greedy can leave a small split empty in a tiny cohort; a split with a positive fraction gets at
        least one patient: the smallest patient of the most populous split."""
        for empty in np.flatnonzero(self.open_splits):
            if np.any(self.split_of == empty):
                continue
            donor = int(np.argmax(np.bincount(self.split_of, minlength=len(self.targets))))
            members = np.flatnonzero(self.split_of == donor)
            self.move(int(members[np.argmin(sizes[members])]), int(empty))  # first of equals: deterministic

    def improve_by_moves(self) -> None:
        """Move single patients to another split while that lowers the cost; never empties a split."""
        for _ in range(_MAX_IMPROVEMENT_PASSES):
            improved = False
            for patient in range(len(self.counts)):
                current = int(self.split_of[patient])
                if np.count_nonzero(self.split_of == current) <= 1:
                    continue
                cells = self.counts[patient]
                removal = ((cells**2 - 2.0 * cells * (self.assigned[current] - self.targets[current])) * self.class_weights).sum()
                change = removal + self.growth_if_added(patient)
                change[current] = 0.0
                best = int(np.argmin(change))
                if change[best] < -1e-12:
                    self.move(patient, best)
                    improved = True
            if not improved:
                return


def _place_patients(counts: np.ndarray, fractions: np.ndarray, seed: int) -> np.ndarray:
    """Split index per patient. ``counts`` is patients x classes (cells), ``fractions`` the split targets."""
    targets = fractions[:, None] * counts.sum(axis=0)[None, :]
    sizes = counts.sum(axis=1)
    size_bucket = np.floor(np.log2(np.maximum(sizes, 1)))
    rng = np.random.default_rng(seed)

    def attempt(restart: int) -> _Placement:
        shuffled = rng.permutation(len(counts))
        # largest first by power-of-two bucket; later restarts blur the buckets to explore other orders
        jitter = rng.uniform(0.0, 1.5, size=len(counts)) if restart else np.zeros(len(counts))
        order = shuffled[np.argsort(-(size_bucket[shuffled] + jitter), kind="stable")]
        placement = _Placement(counts, targets, fractions > 0)
        placement.place_greedily(order)
        placement.fill_empty_splits(sizes)
        placement.improve_by_moves()
        return placement

    # attempts run in order (they share the generator); min keeps the first of equal costs
    return min((attempt(restart) for restart in range(_RESTARTS)), key=_Placement.cost).split_of


def split_by_patient(
    rows: pd.DataFrame,
    label_column: str = "label",
    group_column: str = "patient_id",
    fractions: SplitFractions | None = None,
    seed: int = 0,
    class_order: tuple[str, ...] | None = None,
) -> PatientSplit:
    """Assign every row to a split; a patient's rows (``group_column``) all go to the same split.

    ``class_order`` fixes the columns of ``class_counts`` (e.g. a task's classes); by default the labels
    present, sorted. Raises ``ValueError`` for missing labels or groups, or fewer patients than splits with a
    positive fraction."""
    fractions = fractions or SplitFractions()
    if rows.empty:
        raise ValueError("no rows to split")
    for column in (label_column, group_column):
        if column not in rows.columns:
            raise ValueError(f"no column {column!r} to split by")
        if rows[column].isna().any():
            raise ValueError(f"column {column!r} has missing values; every row needs a label and a patient")
    fraction_array = np.array(fractions.as_tuple(), dtype=np.float64)
    labels = rows[label_column].astype(str).to_numpy()
    groups = rows[group_column].astype(str).to_numpy()

    # Sorted codes make the result independent of row order.
    patient_ids, patient_codes = np.unique(groups, return_inverse=True)
    present_labels, label_codes = np.unique(labels, return_inverse=True)
    open_split_count = int(np.count_nonzero(fraction_array > 0))
    if len(patient_ids) < open_split_count:
        raise ValueError(
            f"{len(patient_ids)} patients cannot fill {open_split_count} splits: a patient's cells never straddle splits"
        )
    if class_order is not None:
        unknown = sorted(set(present_labels) - set(class_order))
        if unknown:
            raise ValueError(f"labels outside class_order: {unknown}")
    counts = np.zeros((len(patient_ids), len(present_labels)), dtype=np.float64)
    np.add.at(counts, (patient_codes, label_codes), 1.0)

    split_of_patient = _place_patients(counts, fraction_array, seed)
    row_splits = np.asarray(SPLIT_NAMES, dtype=object)[split_of_patient[patient_codes]]
    assignments = pd.Series(row_splits, index=rows.index, name=SPLIT_COLUMN).astype(str)

    columns = list(class_order) if class_order is not None else [str(label) for label in present_labels]
    class_counts = (
        pd.crosstab(assignments, pd.Series(labels, index=rows.index))
        .reindex(index=list(SPLIT_NAMES), columns=columns, fill_value=0)
        .astype("int64")
    )
    class_counts.index.name = SPLIT_COLUMN
    class_counts.columns.name = label_column
    patient_counts = {name: int(len(np.unique(patient_codes[row_splits == name]))) for name in SPLIT_NAMES}
    return PatientSplit(assignments=assignments, class_counts=class_counts, patient_counts=patient_counts)
