"""The champions' classifiers, loaded once per process.

A process that predicts several smears (a multi-smear prediction run, ``dagster dev``'s in-process
execution, the benchmarks) loads and traces each model once. Entries are keyed by lake and model version:
a new champion has a new version, so it is never served from a stale entry, and a replaced one is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hema_pipeline.modeling.promotion import current_champions
from hema_pipeline.modeling.registry import load_model
from hema_pipeline.storage.object_store import ObjectStore
from hema_pipeline.storage.warehouse import Warehouse

if TYPE_CHECKING:
    from hema_pipeline.inference.predict import CellClassifier

_LOADED: dict[tuple[str, str], CellClassifier] = {}


def champion_classifiers(lake: ObjectStore, warehouse: Warehouse, tasks: Sequence[str]) -> dict[str, CellClassifier]:
    """A classifier for each of ``tasks`` that has a champion (a task without one is left out)."""
    from hema_pipeline.inference.predict import CellClassifier

    classifiers: dict[str, CellClassifier] = {}
    wanted = set()
    for task, version in current_champions(warehouse, tasks).items():
        if version is None:
            continue
        key = (lake.uri("models"), version)  # the lake's models folder names the lake
        wanted.add(key)
        if key not in _LOADED:
            loaded = load_model(lake, warehouse, task, version)
            _LOADED[key] = CellClassifier(loaded.model, loaded.card.contract())
        classifiers[task] = _LOADED[key]
    for stale in set(_LOADED) - wanted:
        del _LOADED[stale]
    return classifiers
