"""Dagster resources: configuration in, domain objects out. Defaults come from the environment
(``hema_pipeline.settings``); every field can also be set in the launchpad or in Dagster config."""

import os

import dagster as dg

from hema_pipeline import settings
from hema_pipeline.anonymise.pseudonymise import (
    PseudonymConfigError,
    PseudonymKey,
    check_pseudonym_scheme,
    load_pseudonym_key,
)
from hema_pipeline.ingest.inbox import Inbox
from hema_pipeline.ingest.smear_import import ImportTargets
from hema_pipeline.storage.object_store import ObjectStore, open_object_store
from hema_pipeline.storage.warehouse import Warehouse


class InboxResource(dg.ConfigurableResource):
    """Where smear exports arrive: a local folder or s3://bucket/prefix. Read-only to the pipeline unless
    ``archive_url`` is set: then each export moves there once imported, so that the inbox holds only what
    is waiting (identifiable zone: same access rules as the inbox)."""

    url: str
    s3_endpoint_url: str = ""
    settle_seconds: float = 300.0
    archive_url: str = ""

    def inbox(self) -> Inbox:
        endpoint = self.s3_endpoint_url or None
        archive = open_object_store(self.archive_url, endpoint_url=endpoint, private=True) if self.archive_url else None
        return Inbox(open_object_store(self.url, endpoint_url=endpoint), self.settle_seconds, archive)


class StorageResource(dg.ConfigurableResource):
    """The anonymised lake (images, Parquet, model artefacts) and the identifiable quarantine store."""

    lake_url: str
    quarantine_url: str
    s3_endpoint_url: str = ""

    def lake(self) -> ObjectStore:
        return open_object_store(self.lake_url, endpoint_url=self.s3_endpoint_url or None)

    def quarantine(self) -> ObjectStore:
        # Identifiable zone: its files are the inbox's, so they are readable by the pipeline's user only.
        return open_object_store(self.quarantine_url, endpoint_url=self.s3_endpoint_url or None, private=True)


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse the lab queries: a DuckDB file (the embedded default) or a ``postgresql://user@host/db``
    URL (many writers; the password comes from PGPASSWORD or PGPASSFILE, never from this config)."""

    path: str

    def warehouse(self) -> Warehouse:
        return Warehouse(self.path)


class PseudonymKeyResource(dg.ConfigurableResource):
    """The HMAC key behind every pseudonym. Set HEMA_PSEUDONYM_KEY (hex, at least 64 characters) or
    HEMA_PSEUDONYM_KEY_FILE (a 0600/0400 file holding it); without either, nothing is imported unless demo
    mode (HEMA_DEMO=1) made a local key file. Sensors and schedules call ``problem()`` and skip with its
    reason instead of requesting runs that could only fail."""

    key_file: str = ""
    demo_mode: bool = False
    # Empty: HEMA_RECORD_NUMBER_NORMALISATION, else "compact". See hema_pipeline.anonymise.pseudonymise.
    record_number_normalisation: str = ""

    def key(self) -> PseudonymKey:
        # Read at use, never stored as resource config, so the secret does not appear in run config or the UI.
        return load_pseudonym_key(
            os.environ.get("HEMA_PSEUDONYM_KEY"),
            self.key_file or None,
            self.demo_mode,
            self.record_number_normalisation or None,
        )

    def problem(self, warehouse: "Warehouse | WarehouseResource | None" = None) -> str | None:
        """Why no import can run now, or None: the key is missing or unusable, the normalisation setting is
        unknown, or (given ``warehouse``) the warehouse was built under another key or normalisation
        (checked read-only; never waits for a writer). Redacted: never contains the key."""
        try:
            key = self.key()
            if warehouse is not None:
                target = warehouse.warehouse() if isinstance(warehouse, WarehouseResource) else warehouse
                check_pseudonym_scheme(target, key)
        except PseudonymConfigError as error:
            return str(error)
        return None


class PartitionRetentionResource(dg.ConfigurableResource):
    """How long a settled smear (imported, and predicted or with nothing to predict) keeps its Dagster
    partition; 0 keeps every partition. See hema_pipeline.monitoring.retention."""

    retention_days: float = 14.0
    max_retired_per_tick: int = 5000


def import_targets(storage: StorageResource, warehouse: WarehouseResource) -> ImportTargets:
    return ImportTargets(lake=storage.lake(), quarantine=storage.quarantine(), warehouse=warehouse.warehouse())


def default_resources() -> dict[str, dg.ConfigurableResource | dg.ConfigurableIOManager]:
    from hema_pipeline.defs.handles import HandleIOManager

    endpoint = settings.s3_endpoint_url()
    return {
        "io_manager": HandleIOManager(lake_url=settings.lake_url(), s3_endpoint_url=endpoint),
        "inbox": InboxResource(
            url=settings.inbox_url(),
            s3_endpoint_url=endpoint,
            settle_seconds=settings.inbox_settle_seconds(),
            archive_url=settings.inbox_archive_url(),
        ),
        "storage": StorageResource(
            lake_url=settings.lake_url(), quarantine_url=settings.quarantine_url(), s3_endpoint_url=endpoint
        ),
        "warehouse": WarehouseResource(path=settings.warehouse_path()),
        "pseudonyms": PseudonymKeyResource(key_file=settings.pseudonym_key_file(), demo_mode=settings.demo_mode()),
        "partition_retention": PartitionRetentionResource(retention_days=settings.partition_retention_days()),
    }
