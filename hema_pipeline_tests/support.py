"""Helpers the tests share: run the import through real Dagster materialisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import dagster as dg

from hema_pipeline.anonymise.pseudonymise import PseudonymKey
from hema_pipeline.defs.ingest import imported_smear, smear_partitions
from hema_pipeline.modeling.contract import ModelContract
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


def model_contract(
    task: str,
    model_version: str,
    class_names: Sequence[str],
    input_size: int,
    temperature: float,
    class_thresholds: Mapping[str, float | None],
    ood_threshold: float | None = None,
    last_conv_layer: str = "last_conv",
    *,
    ood_method: str | None = None,
    energy_temperature: float = 1.0,
    crop_fraction: float = 1.0,
    test_time_views: int = 1,
    features_layer: str = "features",
    pixel_range: float | None = None,
) -> ModelContract:
    """A ``ModelContract`` for a hand-built test model: the whole image, one view, the energy score where an
    OOD threshold is given, and the network's own pixel-scaling layer, unless a test says otherwise."""
    return ModelContract(
        task=task,
        model_version=model_version,
        class_names=tuple(class_names),
        input_size=input_size,
        pixel_range=pixel_range,
        crop_fraction=crop_fraction,
        test_time_views=test_time_views,
        temperature=temperature,
        class_thresholds=class_thresholds,
        ood_method=ood_method or (None if ood_threshold is None else "energy"),
        ood_threshold=ood_threshold,
        energy_temperature=energy_temperature,
        features_layer=features_layer,
        last_conv_layer=last_conv_layer,
    )
