"""Great Expectations 1.x as a function: run expectations on a pandas frame, get GX's results back.

GX is imported lazily (it takes seconds) and its ephemeral context is built once per process and reused;
each run adds a uniquely named suite and validation definition and deletes them afterwards, so the
context never grows. Nothing here knows what is being checked (``quality.cell_suite`` does).
"""

from __future__ import annotations

import functools
import os
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from great_expectations.core.batch_definition import BatchDefinition
    from great_expectations.data_context import AbstractDataContext
    from great_expectations.expectations import Expectation

_GX_LOCK = threading.Lock()  # a GX context is not thread-safe; validations here are short


@dataclass(frozen=True)
class GxRuntime:
    context: AbstractDataContext
    batch_definition: BatchDefinition


@functools.lru_cache(maxsize=1)
def gx_runtime() -> GxRuntime:
    # no usage telemetry leaves a clinical deployment (GX reads this when first imported)
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # progress bars would print a line per validation into every run log
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas("hema_frames")
        .add_dataframe_asset("frame")
        .add_batch_definition_whole_dataframe("whole_frame")
    )
    return GxRuntime(context=context, batch_definition=batch_definition)


def run_expectations(frame: pd.DataFrame, expectations: Sequence[Expectation], max_examples: int) -> list[Any]:
    """GX's validation results for ``expectations`` on ``frame``, in the order given."""
    import great_expectations as gx

    runtime = gx_runtime()
    name = f"hema-{uuid.uuid4().hex}"
    for position, expectation in enumerate(expectations):
        expectation.meta = {"position": position}
    with _GX_LOCK:
        suite = runtime.context.suites.add(gx.ExpectationSuite(name=name, expectations=list(expectations)))
        definition = runtime.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=runtime.batch_definition, suite=suite)
        )
        try:
            result = definition.run(
                batch_parameters={"dataframe": frame},
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": max(max_examples, 1)},
            )
        finally:
            runtime.context.validation_definitions.delete(name)
            runtime.context.suites.delete(name)
    return sorted(result.results, key=lambda item: item.expectation_config.meta["position"])


def exception_messages(exception_info: Mapping[str, Any] | None) -> list[str]:
    """GX reports errors either flat or per metric; collect the messages from both shapes."""
    if not exception_info:
        return []
    if "raised_exception" in exception_info:
        entries: Iterable[Any] = [exception_info]
    else:
        entries = exception_info.values()
    return [
        str(entry.get("exception_message"))
        for entry in entries
        if isinstance(entry, Mapping) and entry.get("raised_exception") and entry.get("exception_message")
    ]
