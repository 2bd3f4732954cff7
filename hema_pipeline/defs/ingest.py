"""Import stage: one dynamic partition per smear (keyed by the smear pseudonym), the inbox sensor and the
nightly sweep."""

import datetime as dt
import json
import time
from dataclasses import dataclass

import dagster as dg

from hema_pipeline import settings
from hema_pipeline.anonymise.pseudonymise import PseudonymConfigError, PseudonymKey
from hema_pipeline.defs.kubernetes import IMPORT_RUN_POD, k8s_tags
from hema_pipeline.defs.resources import (
    InboxResource,
    PartitionRetentionResource,
    PseudonymKeyResource,
    StorageResource,
    WarehouseResource,
    import_targets,
)
from hema_pipeline.ingest.errors import ContainedError, identifiable_zone
from hema_pipeline.ingest.inbox import Inbox
from hema_pipeline.ingest.smear_import import ImportLimits, import_smear
from hema_pipeline.monitoring.retention import settled_smears

SMEAR_PARTITIONS = "smears"
smear_partitions = dg.DynamicPartitionsDefinition(name=SMEAR_PARTITIONS)

# Every asset that writes the DuckDB file runs in this pool; dagster.yaml limits pools to one slot,
# because DuckDB allows a single writing process per file.
DUCKDB_WRITER_POOL = "duckdb_writer"
# Quarantine lines written to the run's log and to its materialisation metadata (the table has them all).
MAX_LOGGED_REASONS = 20
MAX_METADATA_REASONS = 200


class InboxScanFailed(RuntimeError):
    """A sensor or schedule tick could not scan the inbox; the message names no path (tick storage and the
    daemon log keep it)."""


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
    smear_id = context.partition_key
    try:
        with identifiable_zone("the import", smear_id, safe=(PseudonymConfigError,)):
            key = pseudonyms.key()
            source = inbox.inbox()
            located = source.locate(smear_id, key)
            if located is None:
                raise ContainedError(f"no folder in the inbox or its archive pseudonymises to smear {smear_id}; was it removed?")
            report = import_smear(
                located.store,
                located.smear,
                key,
                import_targets(storage, warehouse),
                context.run.run_id,
                ImportLimits.from_settings(),
            )
            archive = source.archive_imported(located, smear_id)
    except (PseudonymConfigError, ContainedError) as error:
        # Both messages are safe by construction: no key, path or identifier.
        raise dg.Failure(description=str(error)) from None
    if report.quarantined:
        # One line per reason, not per cell: a smear of 20,000 missing images is one warning, not 20,000.
        counts = ", ".join(f"{count} {code}" for code, count in report.quarantine_counts.items())
        examples = "; ".join(report.quarantine_reasons[:MAX_LOGGED_REASONS])
        more = len(report.quarantined) - MAX_LOGGED_REASONS
        context.log.warning(f"smear {smear_id} quarantined {counts}: {examples}" + (f"; and {more} more" if more > 0 else ""))
    context.log.info(
        f"smear {smear_id}: {report.status}; {report.cells_imported} imported ({report.cells_updated} of them "
        f"updated), {report.cells_skipped_existing} already present, {report.cells_withdrawn} withdrawn, "
        f"{report.cells_quarantined} cells quarantined; export {archive.status.replace('_', ' ')}"
        + (f", {archive.left_in_inbox} unmovable entries left in the inbox" if archive.left_in_inbox else "")
    )
    listed = report.quarantine_reasons[:MAX_METADATA_REASONS]
    if len(report.quarantined) > MAX_METADATA_REASONS:
        listed.append(f"... and {len(report.quarantined) - MAX_METADATA_REASONS} more (see the quarantine table)")
    return dg.MaterializeResult(
        metadata={
            "status": report.status,
            "import_run_id": report.import_run_id,
            "files_seen": report.files_seen,
            "cells_imported": report.cells_imported,
            "cells_updated": report.cells_updated,
            "cells_withdrawn": report.cells_withdrawn,
            "cells_skipped_existing": report.cells_skipped_existing,
            "cells_quarantined": report.cells_quarantined,
            "quarantine_counts": dg.MetadataValue.json(report.quarantine_counts),
            "quarantine": dg.MetadataValue.md("\n".join(f"- {line}" for line in listed) or "nothing quarantined"),
            "class_counts": dg.MetadataValue.json(report.class_counts),
            "export": archive.status,
            "archive_version": archive.version,
        },
        data_version=dg.DataVersion(
            f"{report.import_run_id}" if report.cells_imported or report.cells_withdrawn or report.cells_updated else "unchanged"
        ),
    )


@dataclass(frozen=True)
class ImportPlan:
    new_partitions: list[str]
    run_requests: list[dg.RunRequest]
    cursor: float  # every smear whose newest change is older than this has been requested
    requested_at_cursor: list[str]  # run keys already requested among smears changed at or after it
    skipped: dict[str, int]  # root entries of the inbox that are not smear folders, by reason
    waiting: int  # smear folders not ready yet (no metadata, still changing)


def plan_imports(
    source: Inbox,
    key: PseudonymKey,
    known_partitions: set[str],
    newer_than: float = 0.0,
    now: float | None = None,
    already_requested: frozenset[str] = frozenset(),
    trigger: str = "inbox",
) -> ImportPlan:
    """New partitions and run requests for the ready smears whose newest change is at or after
    ``newer_than``.

    The run key is the partition plus a fingerprint of the folder's listing: Dagster launches a run key
    once per sensor or schedule, so a smear is imported exactly once per version of its export, across
    restarts and across both triggers' overlapping scans. The cursor errs on the side of looking again: a
    smear changed in the same second as the cursor (file times of SMB shares and S3 have one-second
    resolution) is looked at again and requested unless its run key is in ``already_requested``, and the
    cursor never passes a folder that is still waiting to settle."""
    now = time.time() if now is None else now
    listing = source.listing()
    new_partitions: list[str] = []
    requests: list[dg.RunRequest] = []
    newest = newer_than
    oldest_waiting: float | None = None
    waiting = 0
    candidates: list[tuple[float, str]] = []
    for smear_id, smear in sorted(source.by_smear_id(list(listing.smears), key).items()):
        if smear.newest_change < newer_than:
            continue
        if not source.is_ready(smear, now):
            waiting += 1
            oldest_waiting = smear.newest_change if oldest_waiting is None else min(oldest_waiting, smear.newest_change)
            continue
        run_key = f"{smear_id}:{smear.fingerprint}"
        candidates.append((smear.newest_change, run_key))
        newest = max(newest, smear.newest_change)
        if run_key in already_requested:
            continue
        if smear_id not in known_partitions and smear_id not in new_partitions:
            new_partitions.append(smear_id)
        requests.append(dg.RunRequest(run_key=run_key, partition_key=smear_id, tags={"hema/trigger": trigger}))
    if oldest_waiting is not None:
        newest = min(newest, oldest_waiting)
    at_cursor = sorted(run_key for changed, run_key in candidates if changed >= newest)
    return ImportPlan(new_partitions, requests, newest, at_cursor, listing.skipped, waiting)


def _describe(plan: ImportPlan) -> str:
    skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(plan.skipped.items())) or "none"
    return f"{len(plan.run_requests)} smear(s) requested, {plan.waiting} waiting to settle; inbox entries skipped: {skipped}"


import_smears_job = dg.define_asset_job(
    "import_smears",
    selection=dg.AssetSelection.assets(imported_smear),
    description="Import (and anonymise) one smear partition from the inbox.",
    # An import takes seconds to minutes; one left STARTED by a crash of its code server is ended by run
    # monitoring after HEMA_IMPORT_MAX_RUNTIME_SECONDS, not after the instance-wide limit sized for training.
    tags={"dagster/max_runtime": str(settings.import_max_runtime_seconds()), **k8s_tags(IMPORT_RUN_POD)},
)


@dg.sensor(
    job=import_smears_job,
    minimum_interval_seconds=settings.inbox_sensor_interval_seconds(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the inbox; adds a partition per new smear and requests its import.",
)
def inbox_sensor(
    context: dg.SensorEvaluationContext,
    inbox: InboxResource,
    pseudonyms: PseudonymKeyResource,
    warehouse: WarehouseResource,
) -> dg.SensorResult:
    # Refuse up front: without a usable key (or under another key than the warehouse's) every requested
    # import would start only to fail.
    problem = pseudonyms.problem(warehouse)
    if problem:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no imports requested: {problem}"))
    cursor = json.loads(context.cursor) if context.cursor else {}
    known = set(context.instance.get_dynamic_partitions(SMEAR_PARTITIONS))
    try:
        with identifiable_zone("the inbox scan"):
            plan = plan_imports(
                inbox.inbox(),
                pseudonyms.key(),
                known,
                newer_than=float(cursor.get("newest_change", 0.0)),
                already_requested=frozenset(cursor.get("requested_at_cursor", [])),
            )
    except ContainedError as error:
        raise InboxScanFailed(str(error)) from None
    context.log.info(_describe(plan))
    return dg.SensorResult(
        run_requests=plan.run_requests,
        dynamic_partitions_requests=[smear_partitions.build_add_request(plan.new_partitions)] if plan.new_partitions else [],
        cursor=json.dumps({"newest_change": plan.cursor, "requested_at_cursor": plan.requested_at_cursor}),
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
    context: dg.ScheduleEvaluationContext,
    inbox: InboxResource,
    pseudonyms: PseudonymKeyResource,
    warehouse: WarehouseResource,
) -> list[dg.RunRequest] | dg.SkipReason:
    problem = pseudonyms.problem(warehouse)
    if problem:
        return dg.SkipReason(f"no imports requested: {problem}")
    known = set(context.instance.get_dynamic_partitions(SMEAR_PARTITIONS))
    try:
        with identifiable_zone("the nightly inbox sweep"):
            plan = plan_imports(inbox.inbox(), pseudonyms.key(), known, trigger="nightly")
    except ContainedError as error:
        raise InboxScanFailed(str(error)) from None
    context.log.info(_describe(plan))
    if plan.new_partitions:
        context.instance.add_dynamic_partitions(SMEAR_PARTITIONS, plan.new_partitions)
    return plan.run_requests


@dg.sensor(
    minimum_interval_seconds=settings.partition_retention_interval_seconds(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Bounds the live smear partitions: deletes the partition of each smear whose latest import is older "
        "than the retention period and which has a report (or nothing to predict). Its rows, runs and "
        "materialisation events stay; it is no longer re-predicted when a champion changes, and a new "
        "export of it adds the partition again. Setting: the `partition_retention` resource."
    ),
)
def smear_partition_retention_sensor(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource, partition_retention: PartitionRetentionResource
) -> dg.SensorResult | dg.SkipReason:
    if partition_retention.retention_days <= 0:
        return dg.SkipReason("partition retention is off (retention_days = 0): every smear keeps its partition")
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=partition_retention.retention_days)
    live = context.instance.get_dynamic_partitions(SMEAR_PARTITIONS)
    retired = settled_smears(warehouse.warehouse(), live, cutoff, partition_retention.max_retired_per_tick)
    if not retired:
        return dg.SkipReason(f"{len(live)} live smear partitions, none settled for {partition_retention.retention_days:g} days")
    context.log.info(f"retiring {len(retired)} of {len(live)} live smear partitions (settled before {cutoff:%Y-%m-%d %H:%M} UTC)")
    return dg.SensorResult(dynamic_partitions_requests=[smear_partitions.build_delete_request(retired)])
