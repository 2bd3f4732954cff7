"""Helpers the tests share: run the import through real Dagster materialisation."""

from __future__ import annotations

import dagster as dg

from hema_pipeline.anonymise.pseudonymise import PseudonymKey
from hema_pipeline.defs.ingest import imported_smear, smear_partitions
from hema_pipeline_tests.conftest import TEST_KEY_HEX, PipelineEnv

TEST_KEY = PseudonymKey(bytes.fromhex(TEST_KEY_HEX))


def materialise_smear(
    env: PipelineEnv, instance: dg.DagsterInstance, folder: str, raise_on_error: bool = True
) -> dg.ExecuteInProcessResult:
    smear_id = TEST_KEY.smear_id(folder)
    if not instance.has_dynamic_partition(smear_partitions.name, smear_id):
        instance.add_dynamic_partitions(smear_partitions.name, [smear_id])
    return dg.materialize(
        [imported_smear],
        partition_key=smear_id,
        resources=env.resources(),
        instance=instance,
        raise_on_error=raise_on_error,
    )


def materialise_inbox(env: PipelineEnv, instance: dg.DagsterInstance) -> list[dg.ExecuteInProcessResult]:
    folders = sorted(path.name for path in env.inbox.iterdir() if path.is_dir())
    return [materialise_smear(env, instance, folder) for folder in folders]


def import_metadata(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    [materialisation] = result.asset_materializations_for_node("imported_smear")
    return {key: value.value for key, value in materialisation.metadata.items()}


def sensor_resources(env: PipelineEnv) -> dict[str, object]:
    """What the inbox sensor and the nightly sweep take."""
    resources = env.resources()
    return {name: resources[name] for name in ("inbox", "pseudonyms", "warehouse")}
