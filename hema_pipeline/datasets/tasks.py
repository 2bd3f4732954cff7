"""Clinical tasks: which import labels one model learns, and as which classes.

A task maps taxonomy labels (``hema_pipeline.taxonomy.CELL_CLASSES``) onto its own ordered classes; the
order is the model's output order. Labels a task does not map are excluded from its dataset, never folded
into a catch-all class: a model must not learn "other" from whatever happened to be left over.

Models learn from the technologist-verified class only (``verified_class``); the analyser's
pre-classification is wrong for roughly one cell in ten and is never a training label.

``task_coverage`` says which task classes have no or too few cells (or patients) so a caller can skip
training a task cleanly instead of failing halfway through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import pandas as pd

from hema_pipeline import taxonomy

VERIFIED_LABEL_COLUMN: Final = "verified_class"
PATIENT_COLUMN: Final = "patient_id"
# Columns ``Task.select_rows`` adds: the task class name and its index in ``Task.classes``.
TASK_LABEL_COLUMN: Final = "label"
TASK_LABEL_INDEX_COLUMN: Final = "label_index"

# Architecture hints for the model builder: "compact" suits binary tasks (a DysplasiaNet-sized network
# of ~10^5 parameters reached 97.7% on dysplastic neutrophils); "standard" suits multi-class typing from
# scratch; "efficientnet_lite0" starts from ImageNet weights: on the real PBC images it gave the best
# single network measured and refused a foreign analyser's cells (benchmarks/RESULTS.md), so the typing
# tasks, which have real images, use it.
ARCHITECTURE_COMPACT: Final = "compact"
ARCHITECTURE_STANDARD: Final = "standard"
ARCHITECTURE_PRETRAINED: Final = "efficientnet_lite0"
ARCHITECTURE_HINTS: Final = (ARCHITECTURE_COMPACT, ARCHITECTURE_STANDARD, ARCHITECTURE_PRETRAINED)


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    # import label (taxonomy) -> task class; excluded from hashing so the frozen dataclass stays hashable
    label_map: Mapping[str, str] = field(hash=False)
    architecture_hint: str
    # The input size (pixels a side) of the task's datasets unless configured otherwise: what the hinted
    # network was measured at.
    image_size: int
    description: str

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError(f"task {self.name!r}: a classifier needs at least two classes")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task {self.name!r}: duplicate class names in {self.classes}")
        unknown_labels = sorted(set(self.label_map) - set(taxonomy.CELL_CLASSES))
        if unknown_labels:
            raise ValueError(f"task {self.name!r}: labels not in the taxonomy: {unknown_labels}")
        unknown_targets = sorted(set(self.label_map.values()) - set(self.classes))
        if unknown_targets:
            raise ValueError(f"task {self.name!r}: mapped to classes it does not declare: {unknown_targets}")
        unfed = [name for name in self.classes if name not in self.label_map.values()]
        if unfed:
            raise ValueError(f"task {self.name!r}: no import label maps to {unfed}")
        if self.architecture_hint not in ARCHITECTURE_HINTS:
            raise ValueError(f"task {self.name!r}: unknown architecture hint {self.architecture_hint!r}")
        if self.image_size < 8:
            raise ValueError(f"task {self.name!r}: image size {self.image_size} is too small to show a cell")
        # a private copy, so a caller mutating the dict it passed in cannot change a registered task
        object.__setattr__(self, "label_map", dict(self.label_map))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def task_class_of(self, label: str | None) -> str | None:
        """The task class an import label counts as, or None where the task excludes it."""
        if label is None:
            return None
        return self.label_map.get(label)

    def class_index(self, task_class: str) -> int:
        return self.classes.index(task_class)

    def source_labels(self, task_class: str) -> tuple[str, ...]:
        """The import labels that count as ``task_class``, in taxonomy order."""
        if task_class not in self.classes:
            raise KeyError(f"task {self.name!r} has no class {task_class!r}")
        return tuple(label for label in taxonomy.CELL_CLASSES if self.label_map.get(label) == task_class)

    def select_rows(self, cells: pd.DataFrame) -> pd.DataFrame:
        """The rows this task learns from (verified label mapped by the task), with the task class in
        ``label`` and its output index in ``label_index``. Unverified and unmapped rows are dropped."""
        mapped = cells[VERIFIED_LABEL_COLUMN].map(self.label_map)
        selected = cells.loc[mapped.notna()].copy()
        selected[TASK_LABEL_COLUMN] = mapped[mapped.notna()].astype(str)
        selected[TASK_LABEL_INDEX_COLUMN] = selected[TASK_LABEL_COLUMN].map(self.class_index).astype("int32")
        return selected


def _one_to_one(*labels: str) -> dict[str, str]:
    return {label: label for label in labels}


PBC8: Final = Task(
    name="pbc8",
    classes=(
        taxonomy.NEUTROPHIL,
        taxonomy.EOSINOPHIL,
        taxonomy.BASOPHIL,
        taxonomy.LYMPHOCYTE,
        taxonomy.MONOCYTE,
        taxonomy.IMMATURE_GRANULOCYTE,
        taxonomy.ERYTHROBLAST,
        taxonomy.PLATELET,
    ),
    # The eight normal PBC classes. Hypogranulated neutrophils and malignant lymphocytes are deliberately
    # unmapped: calling them "neutrophil" / "lymphocyte" would teach the model to hide the abnormality.
    label_map=_one_to_one(
        taxonomy.NEUTROPHIL,
        taxonomy.EOSINOPHIL,
        taxonomy.BASOPHIL,
        taxonomy.LYMPHOCYTE,
        taxonomy.MONOCYTE,
        taxonomy.IMMATURE_GRANULOCYTE,
        taxonomy.ERYTHROBLAST,
        taxonomy.PLATELET,
    ),
    architecture_hint=ARCHITECTURE_PRETRAINED,
    image_size=128,
    description="Eight normal peripheral-blood cell types (PBC classes).",
)

WBC4: Final = Task(
    name="wbc4",
    classes=(taxonomy.EOSINOPHIL, taxonomy.LYMPHOCYTE, taxonomy.MONOCYTE, taxonomy.NEUTROPHIL),
    label_map=_one_to_one(taxonomy.EOSINOPHIL, taxonomy.LYMPHOCYTE, taxonomy.MONOCYTE, taxonomy.NEUTROPHIL),
    architecture_hint=ARCHITECTURE_PRETRAINED,
    image_size=128,
    description="Four common leucocyte types (the BCCD white-cell classes).",
)

MONO_POLY: Final = Task(
    name="mono_poly",
    classes=("mononuclear", "polynuclear"),
    label_map={
        taxonomy.LYMPHOCYTE: "mononuclear",
        taxonomy.MONOCYTE: "mononuclear",
        taxonomy.NEUTROPHIL: "polynuclear",
        taxonomy.EOSINOPHIL: "polynuclear",
        taxonomy.BASOPHIL: "polynuclear",
    },
    architecture_hint=ARCHITECTURE_PRETRAINED,
    image_size=128,
    description="Mononuclear (lymphocyte, monocyte) versus polynuclear (neutrophil, eosinophil, basophil) leucocytes.",
)

LYMPHOCYTE_MALIGNANCY: Final = Task(
    name="lymphocyte_malignancy",
    classes=(taxonomy.LYMPHOCYTE, taxonomy.MALIGNANT_LYMPHOCYTE),
    label_map=_one_to_one(taxonomy.LYMPHOCYTE, taxonomy.MALIGNANT_LYMPHOCYTE),
    # No public images of these abnormal cells are at hand to measure a pretrained network on: the
    # from-scratch DysplasiaNet-sized network stays until a lab's own verified cells show otherwise.
    architecture_hint=ARCHITECTURE_COMPACT,
    image_size=96,
    description="Normal versus malignant lymphocytes.",
)

NEUTROPHIL_DYSPLASIA: Final = Task(
    name="neutrophil_dysplasia",
    classes=(taxonomy.NEUTROPHIL, taxonomy.HYPOGRANULATED_NEUTROPHIL),
    label_map=_one_to_one(taxonomy.NEUTROPHIL, taxonomy.HYPOGRANULATED_NEUTROPHIL),
    architecture_hint=ARCHITECTURE_COMPACT,
    image_size=96,
    description="Normal versus hypogranulated (dysplastic) neutrophils.",
)

TASKS: Final[dict[str, Task]] = {task.name: task for task in (PBC8, WBC4, MONO_POLY, LYMPHOCYTE_MALIGNANCY, NEUTROPHIL_DYSPLASIA)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


# Defaults for "enough data to train". A class seen in a single patient cannot be both learnt and
# honestly tested (patients never straddle splits), so two patients is the floor.
DEFAULT_MIN_CELLS_PER_CLASS: Final = 20
DEFAULT_MIN_PATIENTS_PER_CLASS: Final = 2


@dataclass(frozen=True)
class ClassCoverage:
    task_class: str
    cells: int
    patients: int


@dataclass(frozen=True)
class TaskCoverage:
    task: str
    classes: tuple[ClassCoverage, ...]
    min_cells_per_class: int
    min_patients_per_class: int

    def _is_sufficient(self, item: ClassCoverage) -> bool:
        return item.cells >= self.min_cells_per_class and item.patients >= self.min_patients_per_class

    @property
    def missing_classes(self) -> tuple[str, ...]:
        """Task classes without a single verified cell."""
        return tuple(item.task_class for item in self.classes if item.cells == 0)

    @property
    def scarce_classes(self) -> tuple[str, ...]:
        """Task classes with some verified cells, but fewer cells or patients than the minimums."""
        return tuple(item.task_class for item in self.classes if item.cells > 0 and not self._is_sufficient(item))

    @property
    def insufficient_classes(self) -> tuple[str, ...]:
        """Missing and scarce classes, in task order."""
        return tuple(item.task_class for item in self.classes if not self._is_sufficient(item))

    @property
    def is_trainable(self) -> bool:
        return not self.insufficient_classes

    def cell_counts(self) -> dict[str, int]:
        return {item.task_class: item.cells for item in self.classes}

    def summary(self) -> str:
        """One line a person can act on, e.g. for run logs and asset metadata."""
        if self.is_trainable:
            return (
                f"{self.task}: every class has at least {self.min_cells_per_class} cells "
                f"from {self.min_patients_per_class} patients"
            )
        parts = []
        if self.missing_classes:
            parts.append(f"no verified cells for {', '.join(self.missing_classes)}")
        for item in self.classes:
            if item.task_class in self.scarce_classes:
                parts.append(f"{item.task_class} has {item.cells} cells from {item.patients} patients")
        return (
            f"{self.task}: not enough data ({'; '.join(parts)}); the minimum is {self.min_cells_per_class} cells "
            f"from {self.min_patients_per_class} patients per class"
        )


class TaskDataError(ValueError):
    """A task lacks data for some of its classes, or too few patients to split; ``coverage`` says which."""

    def __init__(self, coverage: TaskCoverage, reason: str | None = None) -> None:
        super().__init__(reason or coverage.summary())
        self.coverage = coverage


def task_coverage(
    task: Task,
    cells: pd.DataFrame,
    min_cells_per_class: int = DEFAULT_MIN_CELLS_PER_CLASS,
    min_patients_per_class: int = DEFAULT_MIN_PATIENTS_PER_CLASS,
) -> TaskCoverage:
    """Verified cells and distinct patients per task class in ``cells`` (needs ``verified_class`` and
    ``patient_id``)."""
    if min_cells_per_class < 1 or min_patients_per_class < 1:
        raise ValueError("the minimum cells and patients per class must be at least 1")
    selected = task.select_rows(cells)
    cell_counts = selected[TASK_LABEL_COLUMN].value_counts()
    patient_counts = selected.groupby(TASK_LABEL_COLUMN)[PATIENT_COLUMN].nunique()
    return TaskCoverage(
        task=task.name,
        classes=tuple(
            ClassCoverage(
                task_class=name,
                cells=int(cell_counts.get(name, 0)),
                patients=int(patient_counts.get(name, 0)),
            )
            for name in task.classes
        ),
        min_cells_per_class=min_cells_per_class,
        min_patients_per_class=min_patients_per_class,
    )


def require_trainable(coverage: TaskCoverage) -> None:
    """Raise ``TaskDataError`` naming the classes that lack data; return quietly otherwise."""
    if not coverage.is_trainable:
        raise TaskDataError(coverage)
