"""The per-cell prediction table and two-stage routing, without TensorFlow.

A prediction table (``predict.predict_images``) has one row per cell and model (``PREDICTION_COLUMNS``).
Routing sends the cells one model called ``from_class`` to a specialist model: in the thesis's system the
8-class model's neutrophils go to the neutrophil-dysplasia model and its lymphocytes to the
lymphocyte-malignancy model. ``merge_cell_results`` folds the stages back into one row per cell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from hema_pipeline.modeling.contract import LOW_CONFIDENCE, UNFAMILIAR, ModelContract
from hema_pipeline.taxonomy import LYMPHOCYTE, NEUTROPHIL

# Referral reasons (``contract.triage_cells``), in order of precedence: an unfamiliar cell's confidence
# means little, so a cell that is both is reported as unfamiliar.
REFERRAL_REASONS: tuple[str, ...] = (UNFAMILIAR, LOW_CONFIDENCE)

PREDICTION_COLUMNS: tuple[str, ...] = (
    "cell_key",  # the caller's identifier of the image: cell_uid in the pipeline, the file in `hema classify`
    "task",
    "model_version",
    "predicted_class",
    "confidence",  # calibrated probability of predicted_class
    "energy",  # -T logsumexp(logits / T), T the card's energy temperature: higher is less familiar
    "ood_score",  # the score the card's ood_threshold applies to (energy or e.g. Mahalanobis); NaN without one
    "accepted",
    "referral_reason",  # None when accepted, else one of REFERRAL_REASONS
    "probabilities",  # dict class -> calibrated probability, in the card's class order
)

CELL_RESULT_COLUMNS: tuple[str, ...] = (
    "cell_key",
    "primary_class",  # what the first model called the cell
    "final_class",  # the most specific class an accepting stage gave it
    "accepted",  # every stage that saw the cell accepted it
    "referral_reason",
    "referred_by_task",
)


@dataclass(frozen=True)
class Route:
    """Cells that ``from_task``'s model accepted as ``from_class`` are also classified by ``to_task``'s.

    Only accepted cells are routed: a cell the first model referred goes to a technologist anyway, and
    counting it would put a cell that may not be a neutrophil into the dysplastic-neutrophil share."""

    from_task: str
    from_class: str
    to_task: str


def thesis_routes(primary_task: str, neutrophil_dysplasia_task: str, lymphocyte_malignancy_task: str) -> tuple[Route, ...]:
    """The two-stage system of the thesis: neutrophils to the dysplasia model, lymphocytes to the
    malignancy model."""
    return (
        Route(primary_task, NEUTROPHIL, neutrophil_dysplasia_task),
        Route(primary_task, LYMPHOCYTE, lymphocyte_malignancy_task),
    )


def validate_routes(primary_task: str, routes: Sequence[Route], contracts: Mapping[str, ModelContract]) -> None:
    """Every route must start from a task already run (the primary or an earlier route's target), name a
    class that model has, and lead to a model that is available and not already upstream."""
    if primary_task not in contracts:
        raise ValueError(f"no model for the primary task {primary_task!r}; have {sorted(contracts)}")
    reached = {primary_task}
    for route in routes:
        if route.from_task not in reached:
            raise ValueError(f"{route}: {route.from_task!r} has not run before this route (order routes upstream first)")
        if route.from_class not in contracts[route.from_task].class_names:
            raise ValueError(f"{route}: {route.from_task!r} has no class {route.from_class!r}")
        if route.to_task not in contracts:
            raise ValueError(f"{route}: no model for {route.to_task!r}; have {sorted(contracts)}")
        if route.to_task == primary_task or route.to_task == route.from_task:
            raise ValueError(f"{route}: a route may not lead back to a model upstream of it")
        reached.add(route.to_task)


def stage_order(primary_task: str, routes: Sequence[Route]) -> list[str]:
    """Tasks in the order they run: the primary, then each route's target once."""
    order = [primary_task]
    for route in routes:
        if route.to_task not in order:
            order.append(route.to_task)
    return order


def cells_to_route(predictions: pd.DataFrame, route: Route) -> list[str]:
    """Keys of the cells ``route`` sends on, in the order they appear."""
    source = predictions[
        (predictions["task"] == route.from_task)
        & (predictions["predicted_class"] == route.from_class)
        & predictions["accepted"].astype(bool)
    ]
    return source["cell_key"].tolist()


def merge_cell_results(predictions: pd.DataFrame, primary_task: str, routes: Sequence[Route]) -> pd.DataFrame:
    """One row per cell (``CELL_RESULT_COLUMNS``) from the per-stage rows.

    Stages are applied in routing order: an accepting stage refines ``final_class``; the first stage that
    refers the cell stops refinement and gives the referral reason. Stage class names are expected to be
    ``hema_pipeline.taxonomy`` classes, so a refined class is itself a cell class
    (``hypogranulated_neutrophil``, ``malignant_lymphocyte``)."""
    primary = predictions[predictions["task"] == primary_task]
    if primary["cell_key"].duplicated().any():
        raise ValueError(f"cell keys repeat in the {primary_task!r} predictions")
    result = pd.DataFrame(
        {
            "cell_key": primary["cell_key"].to_numpy(),
            "primary_class": primary["predicted_class"].to_numpy(),
            "final_class": primary["predicted_class"].to_numpy(),
            "accepted": primary["accepted"].astype(bool).to_numpy(),
            "referral_reason": primary["referral_reason"].to_numpy(dtype=object),
            "referred_by_task": [None if accepted else primary_task for accepted in primary["accepted"]],
        }
    )
    result["referred_by_task"] = result["referred_by_task"].astype(object)
    for task in stage_order(primary_task, routes)[1:]:
        stage = predictions[predictions["task"] == task].drop_duplicates("cell_key").set_index("cell_key")
        aligned = stage.reindex(result["cell_key"])
        seen = aligned["predicted_class"].notna().to_numpy()
        still_accepted = result["accepted"].to_numpy()
        stage_accepted = aligned["accepted"].fillna(False).astype(bool).to_numpy()
        refine = seen & still_accepted & stage_accepted
        refer = seen & still_accepted & ~stage_accepted
        result.loc[refine, "final_class"] = aligned["predicted_class"].to_numpy()[refine]
        result.loc[refer, "accepted"] = False
        result.loc[refer, "referral_reason"] = aligned["referral_reason"].to_numpy(dtype=object)[refer]
        result.loc[refer, "referred_by_task"] = task
    return result.loc[:, list(CELL_RESULT_COLUMNS)]
