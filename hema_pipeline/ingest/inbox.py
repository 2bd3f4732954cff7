"""The inbox: where the analyser (or a lab's export job) drops one folder per smear.

The inbox is read-only to the pipeline and lives in the identifiable zone with the quarantine store:
folder names are accessions and files carry patient details. Nothing read here leaves without going
through ``anonymise``.

With an archive configured, every export leaves the inbox once its import has finished (whatever its
outcome) for ``<archive>/<smear pseudonym>/<UTC time>-<fingerprint>/<original folder>/``, so that a sensor
tick and an import cost what is waiting, not the history of the lab. The archive is in the identifiable
zone too; it is keyed by pseudonym so that a re-run of one smear finds its export without listing or
pseudonymising the whole archive.

Listing is fault-isolated per entry: a symbolic link (never followed), an unreadable or empty folder, a
stray file in the inbox root, a FIFO, or a name that is not valid UTF-8 never makes a scan fail. Entries
that cannot be a smear are counted by reason in ``InboxListing.skipped`` (never named: names identify
patients); entries inside a smear folder stay in its ``files`` with their ``problem`` so that the import
can quarantine them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from hema_pipeline.anonymise.pseudonymise import PseudonymKey
from hema_pipeline.export.format import METADATA_FILE_NAME
from hema_pipeline.storage.object_store import (
    EMPTY_FOLDER,
    SYMLINK,
    UNREADABLE_FOLDER,
    ObjectInfo,
    ObjectStore,
    PrefixedStore,
    move_folder,
)

# Why a root entry of the inbox is not a smear folder (the counts reach the sensor tick and run logs).
SKIP_FILE_IN_ROOT = "file_in_inbox_root"
SKIP_SYMLINK_IN_ROOT = "symlink_in_inbox_root"
SKIP_EMPTY_FOLDER = "empty_folder"
SKIP_HIDDEN_FOLDER = "hidden_or_staging_folder"
SKIP_UNREADABLE_ENTRY = "unreadable_entry_in_inbox_root"


@dataclass(frozen=True)
class InboxSmear:
    """One smear folder of the inbox. ``folders`` is more than one name when several folders
    pseudonymise to one smear (names that differ only by Unicode normalisation or surrounding spaces):
    the import then quarantines them all rather than pick one."""

    folder: str
    files: tuple[ObjectInfo, ...]
    folders: tuple[str, ...] = field(default=())

    @property
    def all_folders(self) -> tuple[str, ...]:
        return self.folders or (self.folder,)

    @property
    def metadata_key(self) -> str:
        return f"{self.folder}/{METADATA_FILE_NAME}"

    @property
    def has_metadata(self) -> bool:
        return any(info.key == self.metadata_key and info.problem is None for info in self.files)

    @property
    def unreadable(self) -> bool:
        return any(info.key == self.folder and info.problem == UNREADABLE_FOLDER for info in self.files)

    @property
    def newest_change(self) -> float:
        return max((info.modified for info in self.files), default=0.0)

    @property
    def fingerprint(self) -> str:
        """Changes whenever a file is added, removed or rewritten: lets a sensor re-import an updated export."""
        digest = hashlib.sha256()
        for info in sorted(self.files, key=lambda item: item.key):
            line = f"{info.key}\x00{info.size}\x00{info.modified:.3f}\x00{info.problem or ''}\n"
            digest.update(line.encode("utf-8", "surrogateescape"))
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class InboxListing:
    smears: tuple[InboxSmear, ...]
    skipped: dict[str, int]  # reason -> number of root entries that are not smear folders


@dataclass(frozen=True)
class LocatedSmear:
    """A smear's export and the store its keys are relative to: the inbox, or its newest archived version."""

    store: ObjectStore
    smear: InboxSmear
    archived: bool


# What became of an export after its import (``Inbox.archive_imported``).
ARCHIVED = "archived"
ARCHIVE_OFF = "archive_off"  # no archive configured: the inbox keeps it (and is listed whole every tick)
ALREADY_ARCHIVED = "already_archived"  # the import read the archived copy
CHANGED_SINCE_IMPORT = "changed_since_import"  # left in the inbox: the next tick imports the new version
NOT_MOVABLE = "not_movable"  # the folder itself cannot be listed: it stays, quarantined, under its old run key


@dataclass(frozen=True)
class ArchiveOutcome:
    status: str
    version: str = ""
    left_in_inbox: int = 0  # entries that cannot be moved (links, FIFOs, unreadable folders)


class Inbox:
    def __init__(self, store: ObjectStore, settle_seconds: float = 300.0, archive: ObjectStore | None = None) -> None:
        self.store = store
        self.settle_seconds = settle_seconds
        self.archive = archive

    def listing(self) -> InboxListing:
        grouped: dict[str, list[ObjectInfo]] = defaultdict(list)
        skipped: Counter[str] = Counter()
        for info in self.store.list():
            folder, separator, _ = info.key.partition("/")
            if folder.startswith((".", "_")):
                # Staging folders (the generator's ``.ACC.partial``, an SMB client's ``.~lock``) and
                # hidden files become visible once renamed into place.
                if not separator:
                    skipped[SKIP_HIDDEN_FOLDER] += 1
                continue
            if separator:
                grouped[folder].append(info)
            elif info.problem == UNREADABLE_FOLDER:
                grouped[folder].append(info)  # a smear whose folder cannot be read: quarantined, not lost
            elif info.problem == EMPTY_FOLDER:
                skipped[SKIP_EMPTY_FOLDER] += 1
            elif info.problem == SYMLINK:
                skipped[SKIP_SYMLINK_IN_ROOT] += 1
            elif info.problem is not None:
                skipped[SKIP_UNREADABLE_ENTRY] += 1
            else:
                skipped[SKIP_FILE_IN_ROOT] += 1
        smears = []
        for folder, files in sorted(grouped.items()):
            # An empty subfolder inside a smear holds nothing to import or keep.
            kept = tuple(info for info in files if info.problem != EMPTY_FOLDER)
            if kept:
                smears.append(InboxSmear(folder, kept))
            else:
                skipped[SKIP_EMPTY_FOLDER] += 1
        return InboxListing(tuple(smears), dict(skipped))

    def smears(self) -> list[InboxSmear]:
        return list(self.listing().smears)

    def ready_smears(self, now: float | None = None) -> list[InboxSmear]:
        """Smears whose metadata file is present, or which have not changed for ``settle_seconds`` (so a
        folder without metadata is eventually imported, and quarantined, instead of waiting forever)."""
        now = time.time() if now is None else now
        return [smear for smear in self.smears() if self.is_ready(smear, now)]

    def is_ready(self, smear: InboxSmear, now: float) -> bool:
        return smear.has_metadata or now - smear.newest_change >= self.settle_seconds

    def by_smear_id(self, smears: list[InboxSmear], key: PseudonymKey) -> dict[str, InboxSmear]:
        """Each smear pseudonym with its folder; folders that collide on one pseudonym are merged into
        one ``InboxSmear`` naming them all (``folders``), every file of each included."""
        grouped: dict[str, list[InboxSmear]] = defaultdict(list)
        for smear in smears:
            grouped[key.smear_id(smear.folder)].append(smear)
        merged = {}
        for smear_id, members in grouped.items():
            if len(members) == 1:
                merged[smear_id] = members[0]
            else:
                files = tuple(info for member in members for info in member.files)
                merged[smear_id] = InboxSmear(members[0].folder, files, tuple(member.folder for member in members))
        return merged

    def locate(self, smear_id: str, key: PseudonymKey) -> LocatedSmear | None:
        """The export of ``smear_id``: in the inbox if a folder there pseudonymises to it (pseudonyms are
        one-way, so every waiting folder name is pseudonymised: one HMAC each, and no re-identification
        table in storage), else the newest archived version, else None."""
        smear = self.by_smear_id(self.smears(), key).get(smear_id)
        if smear is not None:
            return LocatedSmear(self.store, smear, archived=False)
        if self.archive is None:
            return None
        versions = {info.key.split("/")[1] for info in self.archive.list(smear_id) if info.key.count("/") >= 2}
        for version in sorted(versions, reverse=True):
            archived = Inbox(PrefixedStore(self.archive, f"{smear_id}/{version}"), self.settle_seconds)
            smear = archived.by_smear_id(archived.smears(), key).get(smear_id)
            if smear is not None:
                return LocatedSmear(archived.store, smear, archived=True)
        return None

    def archive_imported(self, located: LocatedSmear, smear_id: str, now: dt.datetime | None = None) -> ArchiveOutcome:
        """Moves an imported export out of the inbox into the archive, unless it changed since the import
        read it (files added, removed or rewritten): then it stays, and its new fingerprint makes the
        sensor import it again. A move cut short (S3, or two filesystems) leaves a folder without its
        metadata file, which a later import quarantines without touching the smear's stored cells."""
        if located.archived:
            return ArchiveOutcome(ALREADY_ARCHIVED)
        if self.archive is None:
            return ArchiveOutcome(ARCHIVE_OFF)
        smear = located.smear
        try:
            current = tuple(
                info for folder in smear.all_folders for info in self.store.list(folder) if info.problem != EMPTY_FOLDER
            )
        except OSError:
            return ArchiveOutcome(NOT_MOVABLE, left_in_inbox=len(smear.all_folders))
        if InboxSmear(smear.folder, current).fingerprint != smear.fingerprint:
            return ArchiveOutcome(CHANGED_SINCE_IMPORT)
        now = now or dt.datetime.now(dt.UTC)
        version = f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{smear.fingerprint}"
        left = 0
        for folder in smear.all_folders:
            left += move_folder(
                self.store, folder, self.archive, f"{smear_id}/{version}/{folder}", delete_first=f"{folder}/{METADATA_FILE_NAME}"
            )
        return ArchiveOutcome(ARCHIVED, version, left)
