"""The inbox: where the analyser (or a lab's export job) drops one folder per smear.

The inbox is read-only to the pipeline and lives in the identifiable zone with the quarantine store:
folder names are accessions and files carry patient details. Nothing read here leaves without going
through ``anonymise``.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass

from hema_pipeline.anonymise.pseudonymise import PseudonymKey
from hema_pipeline.export.format import METADATA_FILE_NAME
from hema_pipeline.storage.object_store import ObjectInfo, ObjectStore


@dataclass(frozen=True)
class InboxSmear:
    folder: str
    files: tuple[ObjectInfo, ...]

    @property
    def has_metadata(self) -> bool:
        return any(info.key == f"{self.folder}/{METADATA_FILE_NAME}" for info in self.files)

    @property
    def newest_change(self) -> float:
        return max((info.modified for info in self.files), default=0.0)

    @property
    def fingerprint(self) -> str:
        """Changes whenever a file is added, removed or rewritten: lets a sensor re-import an updated export."""
        digest = hashlib.sha256()
        for info in sorted(self.files, key=lambda item: item.key):
            digest.update(f"{info.key}\x00{info.size}\x00{info.modified:.3f}\n".encode())
        return digest.hexdigest()[:16]


class Inbox:
    def __init__(self, store: ObjectStore, settle_seconds: float = 300.0) -> None:
        self.store = store
        self.settle_seconds = settle_seconds

    def smears(self) -> list[InboxSmear]:
        grouped: dict[str, list[ObjectInfo]] = defaultdict(list)
        for info in self.store.list():
            folder, separator, _ = info.key.partition("/")
            if separator and not folder.startswith((".", "_")):
                grouped[folder].append(info)
        return [InboxSmear(folder, tuple(files)) for folder, files in sorted(grouped.items())]

    def ready_smears(self, now: float | None = None) -> list[InboxSmear]:
        """Smears whose metadata file is present, or which have not changed for ``settle_seconds`` (so a
        folder without metadata is eventually imported, and quarantined, instead of waiting forever)."""
        now = time.time() if now is None else now
        return [
            smear
            for smear in self.smears()
            if smear.has_metadata or now - smear.newest_change >= self.settle_seconds
        ]

    def smear(self, folder: str) -> InboxSmear:
        files = tuple(self.store.list(folder))
        return InboxSmear(folder, files)

    def find_by_smear_id(self, smear_id: str, key: PseudonymKey) -> InboxSmear | None:
        """Pseudonyms are one-way, so the folder of a partition is found by pseudonymising every folder
        name; that is cheap (one HMAC each) and keeps any re-identification table out of storage."""
        for smear in self.smears():
            if key.smear_id(smear.folder) == smear_id:
                return smear
        return None
