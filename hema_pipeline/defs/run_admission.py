"""Refuse an import run up front when it could only fail: no usable pseudonymisation key, or a key other
than the one the warehouse was built with.

The inbox sensor and the nightly sweep already skip their ticks in that case; this covers runs launched
from the UI, the GraphQL API or a backfill. ``dagster.yaml`` names this class as the run coordinator: it
is Dagster's ``QueuedRunCoordinator`` with one check before a run is queued. A refused run is marked
failed at once with the (redacted) reason and no worker ever starts. The check reads the key from the
environment of the process that submits (the webserver or the daemon), which is the code location's
environment on the embedded default; where it is not (a deployment whose key lives only in the user-code
pods), set ``refuse_imports_without_key: false``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster._config import Field, UserConfigSchema
from dagster._core.run_coordinator import QueuedRunCoordinator, SubmitRunContext
from dagster._core.storage.tags import MAX_RETRIES_TAG
from dagster._serdes import ConfigurableClassData

IMPORT_JOB_NAME = "import_smears"
IMPORT_ASSET_KEY = dg.AssetKey("imported_smear")


class ImportRefused(RuntimeError):
    """The run was not queued; the message says why and names no key, path or identifier."""


def run_needs_pseudonym_key(run: dg.DagsterRun) -> bool:
    if run.job_name == IMPORT_JOB_NAME:
        return True
    return IMPORT_ASSET_KEY in (run.asset_selection or set())


def import_refusal_reason() -> str | None:
    """Why an import run would fail for want of a usable key, with the settings the code location uses."""
    from hema_pipeline.defs.resources import PseudonymKeyResource, WarehouseResource, default_resources

    resources = default_resources()
    pseudonyms, warehouse = resources["pseudonyms"], resources["warehouse"]
    if not isinstance(pseudonyms, PseudonymKeyResource) or not isinstance(warehouse, WarehouseResource):
        raise TypeError("default_resources() must hold the pseudonyms and warehouse resources")
    return pseudonyms.problem(warehouse)


def _queued_config_fields() -> dict[str, Any]:
    fields = QueuedRunCoordinator.config_type()
    if not isinstance(fields, Mapping):
        raise TypeError("QueuedRunCoordinator.config_type() is no longer a mapping of fields")
    return dict(fields)


class KeyCheckingRunCoordinator(QueuedRunCoordinator):
    def __init__(self, refuse_imports_without_key: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refuse_imports_without_key = refuse_imports_without_key

    @classmethod
    def config_type(cls) -> UserConfigSchema:
        return {
            **_queued_config_fields(),
            "refuse_imports_without_key": Field(
                bool,
                is_required=False,
                default_value=True,
                description="Fail an import run at submission when the pseudonymisation key is unusable.",
            ),
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]) -> KeyCheckingRunCoordinator:
        # The queued coordinator's settings are its constructor's keyword arguments, one to one.
        queued = {name: config_value.get(name) for name in _queued_config_fields()}
        return cls(
            refuse_imports_without_key=config_value.get("refuse_imports_without_key", True),
            inst_data=inst_data,
            **queued,
        )

    def submit_run(self, context: SubmitRunContext) -> dg.DagsterRun:
        if self.refuse_imports_without_key and run_needs_pseudonym_key(context.dagster_run):
            reason = import_refusal_reason()
            if reason:
                # Dagster marks a run whose submission raised as failed; a retry would be refused the
                # same way, so run retries must not launch one.
                self._instance.add_run_tags(context.dagster_run.run_id, {MAX_RETRIES_TAG: "0"})
                raise ImportRefused(f"import run refused before it started: {reason}")
        return super().submit_run(context)
