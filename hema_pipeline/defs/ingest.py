"""Import stage: one dynamic partition per smear (keyed by the smear pseudonym), the inbox sensor and the
nightly sweep."""


import json

import dagster as dg

from hema_pipeline.anonymise.pseudonymise import PseudonymKey
from hema_pipeline.defs.resources import (
    InboxResource,
    PseudonymKeyResource,
    StorageResource,
    WarehouseResource,
    import_targets,
)
from hema_pipeline.ingest.inbox import Inbox, InboxSmear
from hema_pipeline.ingest.smear_import import import_smear
from hema_pipeline import settings

smear_partitions = dg.DynamicPartitionsDefinition(name="smears")

# Every asset that writes the DuckDB file runs in this pool; dagster.yaml limits pools to one slot,
# because DuckDB allows a single writing process per file.
DUCKDB_WRITER_POOL = "duckdb_writer"


@dg.asset(
    partitions_def=smear_partitions,
    group_name="ingest",
    kinds={"duckdb", "parquet"},
    owners=["team:lab-informatics"],
    tags={"stage": "import"},
    pool=DUCKDB_WRITER_POOL,
    description=(
        "One smear from the inbox, checked file by file, anonymised (keyed pseudonyms, age band, "
        "collection date; names, free text, file names and image metadata dropped) and written to the "
        "`cells`, `smears`, `quarantine` and `import_runs` tables, to Parquet, and to the content-addressed "
        "image store. Bad cells and smears are quarantined; re-runs never duplicate rows."
    ),
)
def imported_smear(
    context: dg.AssetExecutionContext,
    inbox: InboxResource,
    storage: StorageResource,
    warehouse: WarehouseResource,
    pseudonyms: PseudonymKeyResource,
) -> dg.MaterializeResult:
    key = pseudonyms.key()
    smear_id = context.partition_key
    source = inbox.inbox()
    smear = source.find_by_smear_id(smear_id, key)
    if smear is None:
        raise dg.Failure(f"no folder in the inbox pseudonymises to smear {smear_id}; was it removed?")
    report = import_smear(source.store, smear, key, import_targets(storage, warehouse), context.run_id)
    for line in report.quarantine_reasons:
        context.log.warning(f"smear {smear_id} quarantined {line}")
    context.log.info(
        f"smear {smear_id}: {report.status}; {report.cells_imported} imported, "
        f"{report.cells_skipped_existing} already present, {report.cells_quarantined} cells quarantined"
    )
    return dg.MaterializeResult(
        metadata={
            "status": report.status,
            "import_run_id": report.import_run_id,
            "files_seen": report.files_seen,
            "cells_imported": report.cells_imported,
            "cells_skipped_existing": report.cells_skipped_existing,
            "cells_quarantined": report.cells_quarantined,
            "quarantine": dg.MetadataValue.md(
                "\n".join(f"- {line}" for line in report.quarantine_reasons) or "nothing quarantined"
            ),
            "class_counts": dg.MetadataValue.json(report.class_counts),
        },
        data_version=dg.DataVersion(f"{report.import_run_id}" if report.cells_imported else "unchanged"),
    )


def plan_imports(
    source: Inbox,
    key: PseudonymKey,
    known_partitions: set[str],
    newer_than: float = 0.0,
) -> tuple[list[str], list[dg.RunRequest], float]:
    """New partitions and run requests for the ready smears changed after ``newer_than``.

    The run key is the partition plus a fingerprint of the folder's listing: Dagster launches a run key
    once per sensor or schedule, so a smear is imported exactly once per version of its export, across
    restarts and across both triggers' overlapping scans."""
    new_partitions: list[str] = []
    requests: list[dg.RunRequest] = []
    newest = newer_than
    smear: InboxSmear
    for smear in source.ready_smears():
        if smear.newest_change <= newer_than:
            continue
        smear_id = key.smear_id(smear.folder)
        if smear_id not in known_partitions and smear_id not in new_partitions:
            new_partitions.append(smear_id)
        requests.append(
            dg.RunRequest(
                run_key=f"{smear_id}:{smear.fingerprint}",
                partition_key=smear_id,
                tags={"hema/trigger": "inbox"},
            )
        )
        newest = max(newest, smear.newest_change)
    return new_partitions, requests, newest


import_smears_job = dg.define_asset_job(
    "import_smears",
    selection=dg.AssetSelection.assets(imported_smear),
    partitions_def=smear_partitions,
    description="Import (and anonymise) one smear partition from the inbox.",
)


@dg.sensor(
    job=import_smears_job,
    minimum_interval_seconds=settings.inbox_sensor_interval_seconds(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the inbox; adds a partition per new smear and requests its import.",
)
def inbox_sensor(
    context: dg.SensorEvaluationContext, inbox: InboxResource, pseudonyms: PseudonymKeyResource
) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    known = set(context.instance.get_dynamic_partitions(smear_partitions.name))
    new_partitions, requests, newest = plan_imports(
        inbox.inbox(), pseudonyms.key(), known, newer_than=float(cursor.get("newest_change", 0.0))
    )
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[smear_partitions.build_add_request(new_partitions)] if new_partitions else [],
        cursor=json.dumps({"newest_change": newest}),
    )


@dg.schedule(
    job=import_smears_job,
    cron_schedule=settings.nightly_import_cron(),
    execution_timezone=settings.schedule_timezone(),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Nightly sweep of the whole inbox: imports whatever the sensor did not (a smear copied with an old "
        "timestamp, a sensor that was switched off). Already imported exports are skipped by run key."
    ),
)
def nightly_import_schedule(
    context: dg.ScheduleEvaluationContext, inbox: InboxResource, pseudonyms: PseudonymKeyResource
) -> list[dg.RunRequest]:
    known = set(context.instance.get_dynamic_partitions(smear_partitions.name))
    new_partitions, requests, _ = plan_imports(inbox.inbox(), pseudonyms.key(), known)
    if new_partitions:
        context.instance.add_dynamic_partitions(smear_partitions.name, new_partitions)
    return requests
