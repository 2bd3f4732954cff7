"""A snapshot of the asset graph (keys, dependencies, checks, partitions, groups, jobs, automation), so a
rename or a re-wiring shows up in review as a diff of `snapshots/asset_graph.json`, not as a surprise in
a lab's UI. After an intended change: HEMA_UPDATE_SNAPSHOTS=1 pytest hema_pipeline_tests/test_asset_graph_snapshot.py"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from hema_pipeline.defs.definitions import defs

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


def _describe_partitions(partitions: dg.PartitionsDefinition | None) -> str | None:
    if partitions is None:
        return None
    if isinstance(partitions, dg.DynamicPartitionsDefinition):
        return f"dynamic:{partitions.name}"
    return type(partitions).__name__


def graph_snapshot() -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda item: item.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "depends_on": sorted(parent.to_user_string() for parent in node.parent_keys),
            "partitions": _describe_partitions(node.partitions_def),
            "checks": sorted(check.name for check in node.check_keys),
            "automation": node.automation_condition is not None,
            "kinds": sorted(node.kinds),
            "pool": node.pools and sorted(node.pools) or None,
        }
    checks = {}
    for check_key in sorted(graph.asset_check_keys, key=lambda item: (item.asset_key.to_user_string(), item.name)):
        spec = graph.get_check_spec(check_key)
        checks[f"{check_key.asset_key.to_user_string()}:{check_key.name}"] = {"blocking": bool(spec.blocking)}
    jobs = {}
    for job in sorted(defs.jobs or [], key=lambda item: item.name):
        resolved = defs.resolve_job_def(job.name)
        jobs[job.name] = {
            "assets": sorted(key.to_user_string() for key in resolved.asset_layer.executable_asset_keys),
            "tags": dict(sorted(resolved.tags.items())),
            "partitions": _describe_partitions(resolved.partitions_def),
        }
    return {
        "assets": assets,
        "checks": checks,
        "jobs": jobs,
        "sensors": sorted(sensor.name for sensor in defs.sensors or []),
        "schedules": sorted(f"{schedule.name} -> {schedule.job_name}" for schedule in defs.schedules or []),
    }


def test_the_asset_graph_matches_its_snapshot():
    current = graph_snapshot()
    text = json.dumps(current, indent=2, sort_keys=True) + "\n"
    if os.environ.get("HEMA_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text)
    recorded = json.loads(SNAPSHOT.read_text())
    assert current == recorded, (
        "the asset graph changed; review the difference and, if intended, regenerate the snapshot with "
        "HEMA_UPDATE_SNAPSHOTS=1 (see this module's docstring)"
    )
    # The snapshot is not vacuous: the whole chain, its blocking gates and the per-smear partitions are in it.
    assert recorded["assets"]["pbc8_model"]["depends_on"] == ["pbc8_calibration", "pbc8_dataset", "pbc8_trained_model"]
    assert recorded["assets"]["imported_smear"]["partitions"] == "dynamic:smears"
    assert all(check["blocking"] for name, check in recorded["checks"].items() if name.startswith("pbc8_dataset:"))
