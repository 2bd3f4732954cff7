"""A record of failed pipeline runs in the warehouse (``run_failures``), for the lab's own monitoring
queries beside Dagster's run history.

Error texts are redacted before they are stored: an exception raised while reading the inbox can quote
a path, and inbox folder and file names are accession numbers and analyser file names, which must not
reach the warehouse. Paths and URLs become ``<path>``; the full error stays in Dagster's run log.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass

from hema_pipeline.storage.warehouse import Warehouse

MAX_MESSAGE_CHARS = 2000
# s3://..., file://..., absolute POSIX paths, Windows drive paths, and quoted relative paths with a slash.
_PATH_PATTERN = re.compile(
    r"(?:[a-zA-Z][a-zA-Z0-9+.-]*://\S+)"
    r"|(?:[A-Za-z]:\\\S+)"
    r"|(?:(?<![\w.])/[^\s'\"),;]+)"
    r"|(?:(?<=['\"])[^'\"\s]*/[^'\"]*(?=['\"]))"
)


def redact_paths(text: str) -> str:
    return _PATH_PATTERN.sub("<path>", text)[:MAX_MESSAGE_CHARS]


@dataclass(frozen=True)
class RunFailure:
    run_id: str
    job_name: str
    partition_key: str | None  # a smear pseudonym for partitioned jobs
    trigger: str | None  # the run's hema/trigger tag: inbox, nightly, retraining, ...
    failed_steps: Sequence[str]
    error_types: Sequence[str]
    message: str
    failed_at: dt.datetime  # UTC


def record_run_failure(warehouse: Warehouse, failure: RunFailure) -> bool:
    """Insert the failure once per run; returns False if the run was already recorded."""
    with warehouse.connect() as connection:
        inserted = connection.execute(
            """
            insert into run_failures
                (run_id, job_name, partition_key, trigger, failed_steps, error_types, message, failed_at, recorded_at)
            values (?, ?, ?, ?, ?, ?, ?, ?, ?)
            on conflict (run_id) do nothing
            returning run_id
            """,
            [
                failure.run_id,
                failure.job_name,
                failure.partition_key,
                failure.trigger,
                list(failure.failed_steps),
                list(failure.error_types),
                redact_paths(failure.message),
                failure.failed_at.replace(tzinfo=None),
                dt.datetime.now(dt.UTC).replace(tzinfo=None),
            ],
        ).fetchall()
    return bool(inserted)
