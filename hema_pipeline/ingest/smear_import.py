"""Import one smear: check every file, anonymise, store clean images, write rows, quarantine the rest.

Guarantees:
- one bad cell never stops the others; a bad smear is quarantined whole, with every file kept;
- nothing identifying leaves the inbox: rows carry pseudonyms, images are metadata-stripped and stored
  under their content hash, and error messages name cells by number, never by original file name;
- re-running is safe: images are content-addressed, rows are upserted by key in one transaction, and a
  crash before the commit leaves the warehouse as it was, so the next run simply redoes the smear.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import duckdb
import pandas as pd
import pyarrow.parquet

from hema_pipeline.anonymise.images import ImageRejected, clean_cell_image
from hema_pipeline.anonymise.pseudonymise import AnonymousSmear, PseudonymKey, anonymise_smear
from hema_pipeline.export.format import (
    METADATA_FILE_NAME,
    CellEntry,
    ExportFormatError,
    SmearMetadata,
    parse_smear_metadata,
)
from hema_pipeline.ingest.inbox import InboxSmear
from hema_pipeline.storage.object_store import ObjectStore
from hema_pipeline.storage.warehouse import Warehouse, replace_rows
from hema_pipeline.taxonomy import is_known_class

CELL_COLUMNS = (
    "cell_uid",
    "smear_id",
    "patient_id",
    "cell_id",
    "image_sha256",
    "image_key",
    "width",
    "height",
    "analyser_class",
    "verified_class",
    "import_run_id",
    "imported_at",
)
# Columns that decide whether a re-imported cell is the same row as the one already stored.
CELL_IDENTITY = ("cell_id", "image_sha256", "analyser_class", "verified_class")


@dataclass(frozen=True)
class QuarantinedItem:
    cell_id: int | None
    reason_code: str
    reason: str
    kept_key: str | None
    content_sha256: str | None


@dataclass(frozen=True)
class ImportReport:
    import_run_id: str
    smear_id: str
    status: str
    files_seen: int
    cells_imported: int
    cells_quarantined: int
    cells_skipped_existing: int
    quarantined: tuple[QuarantinedItem, ...] = field(default_factory=tuple)
    class_counts: dict[str, int] = field(default_factory=dict)

    @property
    def quarantine_reasons(self) -> list[str]:
        return [
            f"{'smear' if item.cell_id is None else f'cell {item.cell_id}'}: {item.reason_code}: {item.reason}"
            for item in self.quarantined
        ]


@dataclass(frozen=True)
class ImportTargets:
    """Where an import writes: the anonymised lake (images, Parquet), the identifiable quarantine store,
    and the DuckDB warehouse."""

    lake: ObjectStore
    quarantine: ObjectStore
    warehouse: Warehouse


def image_key(sha256: str) -> str:
    return f"images/{sha256[:2]}/{sha256}.jpg"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class _CellOutcome:
    entry: CellEntry
    row: dict[str, object] | None
    quarantined: QuarantinedItem | None


class _SmearImport:
    def __init__(
        self,
        inbox: ObjectStore,
        smear: InboxSmear,
        key: PseudonymKey,
        targets: ImportTargets,
        dagster_run_id: str | None,
    ) -> None:
        self.inbox = inbox
        self.smear = smear
        self.key = key
        self.targets = targets
        self.dagster_run_id = dagster_run_id
        self.import_run_id = uuid.uuid4().hex
        self.started_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        self.smear_id = key.smear_id(smear.folder)

    def keep_in_quarantine(self, data: bytes) -> tuple[str, str]:
        digest = _sha256(data)
        kept_key = f"{self.smear_id}/{digest}.bin"
        if not self.targets.quarantine.exists(kept_key):
            self.targets.quarantine.put_bytes(kept_key, data)
        return kept_key, digest

    def quarantine_whole_smear(self, code: str, reason: str) -> ImportReport:
        items = []
        for info in self.smear.files:
            kept_key, digest = self.keep_in_quarantine(self.inbox.get_bytes(info.key))
            items.append(QuarantinedItem(None, code, reason, kept_key, digest))
        if not items:
            items.append(QuarantinedItem(None, code, reason, None, None))
        return self.finish(
            anonymous=None, rows=[], quarantined=items, status="quarantined", cells_quarantined=0
        )

    def run(self) -> ImportReport:
        metadata_key = f"{self.smear.folder}/{METADATA_FILE_NAME}"
        if not self.smear.files:
            return self.quarantine_whole_smear("empty_smear", "the smear folder holds no files")
        if not self.smear.has_metadata:
            return self.quarantine_whole_smear("missing_metadata", f"no {METADATA_FILE_NAME} in the smear folder")
        try:
            metadata = parse_smear_metadata(self.inbox.get_bytes(metadata_key))
        except ExportFormatError as error:
            return self.quarantine_whole_smear("malformed_metadata", f"{METADATA_FILE_NAME}: {error}")
        if metadata.accession != self.smear.folder.strip():
            return self.quarantine_whole_smear(
                "accession_mismatch", "the accession in the metadata differs from the smear folder's name"
            )
        if not metadata.cells:
            return self.quarantine_whole_smear("empty_smear", "the metadata lists no cells")
        anonymous = anonymise_smear(metadata, self.key)
        outcomes = self.import_cells(metadata, anonymous)
        rows = [outcome.row for outcome in outcomes if outcome.row is not None]
        quarantined = [outcome.quarantined for outcome in outcomes if outcome.quarantined is not None]
        quarantined += self.quarantine_unlisted_files(metadata)
        cells_quarantined = sum(1 for outcome in outcomes if outcome.quarantined is not None)
        if not rows:
            status = "quarantined"
        elif quarantined:
            status = "partially_quarantined"
        else:
            status = "imported"
        return self.finish(anonymous, rows, quarantined, status, cells_quarantined)

    def import_cells(self, metadata: SmearMetadata, anonymous: AnonymousSmear) -> list[_CellOutcome]:
        present = {info.key for info in self.smear.files}
        # Decoding dominates and Pillow releases the GIL while decoding, so threads scale on cores.
        workers = max(2, min(8, (os.cpu_count() or 2) * 2))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda entry: self.import_cell(entry, anonymous, present), metadata.cells))

    def import_cell(self, entry: CellEntry, anonymous: AnonymousSmear, present: set[str]) -> _CellOutcome:
        file_key = f"{self.smear.folder}/{entry.image}"
        if file_key not in present:
            reason = QuarantinedItem(entry.cell_id, "missing_image", "the image listed for this cell is absent", None, None)
            return _CellOutcome(entry, None, reason)
        data = self.inbox.get_bytes(file_key)
        # The offending label is not echoed: a free-text field is no place to trust with what reaches logs.
        unknown = [
            field_name
            for field_name, label in (("analyser_class", entry.analyser_class), ("verified_class", entry.verified_class))
            if label and not is_known_class(label)
        ]
        if unknown:
            kept_key, digest = self.keep_in_quarantine(data)
            reason = f"{' and '.join(unknown)} not in the taxonomy (see hema_pipeline.taxonomy)"
            return _CellOutcome(entry, None, QuarantinedItem(entry.cell_id, "unknown_class", reason, kept_key, digest))
        try:
            clean = clean_cell_image(data)
        except ImageRejected as rejected:
            kept_key, digest = self.keep_in_quarantine(data)
            return _CellOutcome(
                entry, None, QuarantinedItem(entry.cell_id, rejected.code, rejected.reason, kept_key, digest)
            )
        digest = _sha256(clean.jpeg)
        key = image_key(digest)
        if not self.targets.lake.exists(key):
            self.targets.lake.put_bytes(key, clean.jpeg)
        row = {
            "cell_uid": f"{anonymous.smear_id}:{entry.cell_id}",
            "smear_id": anonymous.smear_id,
            "patient_id": anonymous.patient_id,
            "cell_id": entry.cell_id,
            "image_sha256": digest,
            "image_key": key,
            "width": clean.width,
            "height": clean.height,
            "analyser_class": entry.analyser_class,
            "verified_class": entry.verified_class,
            "import_run_id": self.import_run_id,
            "imported_at": self.started_at,
        }
        return _CellOutcome(entry, row, None)

    def quarantine_unlisted_files(self, metadata: SmearMetadata) -> list[QuarantinedItem]:
        listed = {f"{self.smear.folder}/{cell.image}" for cell in metadata.cells}
        listed.add(f"{self.smear.folder}/{METADATA_FILE_NAME}")
        items = []
        for info in self.smear.files:
            if info.key not in listed:
                kept_key, digest = self.keep_in_quarantine(self.inbox.get_bytes(info.key))
                items.append(
                    QuarantinedItem(None, "unlisted_file", "a file in the smear folder is not listed in the metadata", kept_key, digest)
                )
        return items

    def finish(
        self,
        anonymous: AnonymousSmear | None,
        rows: list[dict[str, object]],
        quarantined: list[QuarantinedItem],
        status: str,
        cells_quarantined: int,
    ) -> ImportReport:
        finished_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        incoming = pd.DataFrame(rows, columns=list(CELL_COLUMNS))
        with self.targets.warehouse.connect() as connection:
            existing = connection.execute(
                f"select {', '.join(CELL_IDENTITY)} from cells where smear_id = ?", [self.smear_id]
            ).df()
            unchanged = _unchanged_cells(incoming, existing)
            changed = incoming[~incoming["cell_id"].isin(unchanged)]
            if status == "imported" and changed.empty:
                status = "already_present"
            connection.execute("begin transaction")
            try:
                replace_rows(connection, "cells", changed, ["cell_uid"])
                if anonymous is not None and not incoming.empty:
                    self.write_smear_row(connection, anonymous, finished_at)
                self.write_quarantine_rows(connection, quarantined, finished_at)
                if not incoming.empty:
                    connection.execute(
                        "update quarantine set resolved_by_import_run_id = ? where smear_id = ? and "
                        "resolved_by_import_run_id is null and cell_id in (select unnest(?::integer[]))",
                        [self.import_run_id, self.smear_id, [int(value) for value in incoming["cell_id"]]],
                    )
                connection.execute(
                    "insert into import_runs values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        self.import_run_id,
                        self.smear_id,
                        self.dagster_run_id,
                        self.started_at,
                        finished_at,
                        status,
                        len(self.smear.files),
                        len(changed),
                        cells_quarantined,
                        len(unchanged),
                    ],
                )
                connection.execute("commit")
            except BaseException:
                connection.execute("rollback")
                raise
            self.write_parquet(connection)
        class_counts = (
            incoming["verified_class"].fillna(incoming["analyser_class"]).value_counts().sort_index().to_dict()
            if not incoming.empty
            else {}
        )
        return ImportReport(
            import_run_id=self.import_run_id,
            smear_id=self.smear_id,
            status=status,
            files_seen=len(self.smear.files),
            cells_imported=len(changed),
            cells_quarantined=cells_quarantined,
            cells_skipped_existing=len(unchanged),
            quarantined=tuple(quarantined),
            class_counts={str(label): int(count) for label, count in class_counts.items()},
        )

    def write_smear_row(self, connection: duckdb.DuckDBPyConnection, anonymous: AnonymousSmear, now: dt.datetime) -> None:
        connection.execute("delete from smears where smear_id = ?", [anonymous.smear_id])
        connection.execute(
            "insert into smears select ?, ?, ?, ?, ?, ?, (select count(*) from cells where smear_id = ?), ?, ?",
            [
                anonymous.smear_id,
                anonymous.patient_id,
                anonymous.age_band,
                anonymous.sex,
                anonymous.collection_date,
                anonymous.analyser_id,
                anonymous.smear_id,
                self.import_run_id,
                now,
            ],
        )

    def write_quarantine_rows(self, connection: duckdb.DuckDBPyConnection, items: list[QuarantinedItem], now: dt.datetime) -> None:
        if not items:
            return
        frame = pd.DataFrame(
            [
                {
                    "quarantine_id": _sha256(
                        f"{self.smear_id}|{item.cell_id}|{item.content_sha256}|{item.reason_code}".encode()
                    )[:32],
                    "smear_id": self.smear_id,
                    "cell_id": item.cell_id,
                    "reason_code": item.reason_code,
                    "reason": item.reason,
                    "kept_key": item.kept_key,
                    "content_sha256": item.content_sha256,
                    "import_run_id": self.import_run_id,
                    "quarantined_at": now,
                    "resolved_by_import_run_id": None,
                }
                for item in items
            ]
        ).astype({"cell_id": "Int64"})
        # A file quarantined again for the same reason keeps its first row: re-runs add nothing.
        frame = frame.drop_duplicates("quarantine_id")
        connection.register("incoming_quarantine", frame)
        try:
            connection.execute(
                "insert into quarantine by name select * from incoming_quarantine "
                "where quarantine_id not in (select quarantine_id from quarantine)"
            )
        finally:
            connection.unregister("incoming_quarantine")

    def write_parquet(self, connection: duckdb.DuckDBPyConnection) -> None:
        """Mirror the smear's committed rows to Parquet, the files a data lake or a rebuild reads."""
        for table in ("cells", "smears", "quarantine"):
            rows = connection.sql(
                f"select * from {table} where smear_id = $smear_id order by all", params={"smear_id": self.smear_id}
            ).to_arrow_table()
            key = f"tables/{table}/smear_id={self.smear_id}/{table}.parquet"
            if rows.num_rows == 0 and not self.targets.lake.exists(key):
                continue
            buffer = io.BytesIO()
            pyarrow.parquet.write_table(rows, buffer)
            self.targets.lake.put_bytes(key, buffer.getvalue())


def _unchanged_cells(incoming: pd.DataFrame, existing: pd.DataFrame) -> set[int]:
    if incoming.empty or existing.empty:
        return set()
    merged = incoming[list(CELL_IDENTITY)].merge(existing, on=list(CELL_IDENTITY), how="inner")
    return {int(value) for value in merged["cell_id"]}


def import_smear(
    inbox: ObjectStore,
    smear: InboxSmear,
    key: PseudonymKey,
    targets: ImportTargets,
    dagster_run_id: str | None = None,
) -> ImportReport:
    return _SmearImport(inbox, smear, key, targets, dagster_run_id).run()
