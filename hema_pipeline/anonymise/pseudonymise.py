"""Turn a smear's identifying metadata into what the warehouse may hold.

- patient record number and accession -> keyed pseudonyms, HMAC-SHA256 under a secret key: stable across
  imports (a patient's smears group together, which leak-proof splits need) but not reversible, and no
  re-identification table is stored anywhere;
- birth date -> 10-year age band at collection;
- collection time -> collection date;
- patient name, free-text comment, original file names -> dropped.

Identifiers are normalised before the HMAC, so one identifier written several ways is one pseudonym:

- accessions (folder names): Unicode NFC, surrounding whitespace stripped (``normalise_accession``);
- record numbers: ``RecordNumberNormalisation`` (setting ``HEMA_RECORD_NUMBER_NORMALISATION``):
  ``strict`` = NFKC + strip; ``compact`` (default) = NFKC, upper-cased, digits of any script as 0-9,
  whitespace, dashes, invisible format characters and ``. / _ ,`` dropped; ``digits`` = only the digits,
  leading zeros dropped (for labs whose record numbers are purely numeric).
  A record number or accession already in canonical form (e.g. ``MRN0012345``, ``ACC-2026-42``) hashes
  exactly as before normalisation existed, so such pseudonyms did not change.

Text that is not valid UTF-8 (file names from ``os.listdir`` carry it as surrogate escapes) is hashed
from its original bytes, never rejected here; ``is_clean_text`` tells the importer to quarantine it.

The key is at least 32 bytes written as hex, from ``HEMA_PSEUDONYM_KEY`` or a private key file
(``HEMA_PSEUDONYM_KEY_FILE``, mode 0600/0400). Each warehouse records the key's fingerprint and the
normalisation at first import (``ensure_pseudonym_scheme``), and refuses a different one afterwards:
pseudonyms made under another key or normalisation would silently duplicate every patient and smear.
Error messages never contain the key, a record number or an accession.
"""

from __future__ import annotations

import codecs
import datetime as dt
import enum
import hashlib
import hmac
import os
import secrets
import stat
import string
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hema_pipeline.export.format import SmearMetadata

if TYPE_CHECKING:
    import duckdb

    from hema_pipeline.storage.warehouse import Warehouse

MIN_KEY_BYTES = 32
MIN_KEY_HEX_CHARS = 2 * MIN_KEY_BYTES
MAX_KEY_FILE_BYTES = 4096
PSEUDONYM_HEX_CHARS = 20  # 80 bits: collisions are negligible for any lab's lifetime of smears
FINGERPRINT_MESSAGE = b"hema-pipeline key fingerprint v1"
FINGERPRINT_HEX_CHARS = 16
ACCESSION_NORMALISATION = "nfc-strip:v1"
RECORD_NUMBER_NORMALISATION_VARIABLE = "HEMA_RECORD_NUMBER_NORMALISATION"
KEY_HELP = (
    "the key is at least 32 bytes written as hex: 64 or more characters 0-9/a-f and nothing else, e.g. "
    "from `python3 -c 'import secrets; print(secrets.token_hex(32))'`"
)


class PseudonymConfigError(RuntimeError):
    """The pseudonymisation set-up is unusable. Messages never contain the key or an identifier."""


class MissingPseudonymKey(PseudonymConfigError):
    """No usable key was configured."""


class InvalidPseudonymKey(MissingPseudonymKey):
    """A key was configured but cannot be used (not hex, too short, key file readable by others, ...)."""


class InvalidRecordNumberNormalisation(PseudonymConfigError, ValueError):
    pass


class PseudonymKeyMismatch(PseudonymConfigError):
    """The warehouse was built under another key (fingerprint) or another normalisation."""

    def __init__(self, message: str, stored: dict[str, str], configured: dict[str, str]) -> None:
        super().__init__(message)
        self.stored = stored
        self.configured = configured


class UnusableIdentifier(ValueError):
    """An identifier that normalises to nothing (e.g. a record number of only separators)."""


# --- identifier normalisation -------------------------------------------------------------------------

_COMPACT_DROP = frozenset(".,/_")
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _ascii_digits(text: str) -> str:
    """Decimal digits of any script (Arabic-Indic, Devanagari, ...) as 0-9; other characters unchanged."""
    return "".join(str(unicodedata.decimal(ch)) if ch.isdecimal() and not ch.isascii() else ch for ch in text)


def _compact(text: str) -> str:
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).upper())
    kept = []
    for ch in _ascii_digits(folded):
        if ch.isspace() or ch in _COMPACT_DROP or unicodedata.category(ch) in ("Pd", "Cf"):
            continue
        kept.append(ch)
    return "".join(kept)


class RecordNumberNormalisation(enum.StrEnum):
    """How a patient record number is normalised before the HMAC. Changing it changes every patient
    pseudonym, so a warehouse records the one it was built with and refuses another."""

    STRICT = "strict"  # NFKC + strip
    COMPACT = "compact"  # NFKC + upper case + any-script digits as 0-9; drop whitespace, dashes, format chars, . / _ ,
    DIGITS = "digits"  # only the digits (any script, as 0-9), leading zeros dropped

    @property
    def label(self) -> str:
        """What the warehouse records: the name plus the version of its rules."""
        return f"{self.value}:v1"

    @classmethod
    def parse(cls, value: RecordNumberNormalisation | str | None) -> RecordNumberNormalisation:
        """``None`` or blank means the default (``compact``)."""
        if isinstance(value, cls):
            return value
        text = (value or "").strip().lower()
        if not text:
            return cls.COMPACT
        try:
            return cls(text)
        except ValueError:
            raise InvalidRecordNumberNormalisation(
                f"{RECORD_NUMBER_NORMALISATION_VARIABLE} must be one of "
                f"{', '.join(member.value for member in cls)} (got {value!r})"
            ) from None

    @classmethod
    def from_environment(cls) -> RecordNumberNormalisation:
        return cls.parse(os.environ.get(RECORD_NUMBER_NORMALISATION_VARIABLE))

    def apply(self, record_number: str) -> str:
        """The normalised record number; raises ``UnusableIdentifier`` when nothing is left."""
        if self is RecordNumberNormalisation.STRICT:
            normalised = unicodedata.normalize("NFKC", record_number).strip()
        elif self is RecordNumberNormalisation.COMPACT:
            normalised = _compact(record_number)
        else:
            digits = "".join(ch for ch in _ascii_digits(unicodedata.normalize("NFKC", record_number)) if ch in string.digits)
            normalised = digits.lstrip("0") or ("0" if digits else "")
        if not normalised:
            raise UnusableIdentifier(
                f"the record number is empty after {self.value!r} normalisation "
                f"(it holds no {'digits' if self is RecordNumberNormalisation.DIGITS else 'letters or digits'})"
            )
        return normalised


def normalise_record_number(record_number: str, normalisation: RecordNumberNormalisation | str | None = None) -> str:
    """``record_number`` as it is hashed; ``normalisation`` ``None`` = ``HEMA_RECORD_NUMBER_NORMALISATION``."""
    chosen = (
        RecordNumberNormalisation.from_environment() if normalisation is None else RecordNumberNormalisation.parse(normalisation)
    )
    return chosen.apply(record_number)


def normalise_accession(text: str) -> str:
    """An accession or smear folder name as it is hashed: Unicode NFC, surrounding whitespace stripped.
    NFC/NFD twins and trailing-space twins of one name give one pseudonym (the importer must treat two
    folders with one pseudonym as a collision). Surrogate escapes pass through unchanged."""
    return unicodedata.normalize("NFC", text).strip()


def is_clean_text(text: str) -> bool:
    """False for text the importer should not trust as a name: surrogates (bytes that were not valid
    UTF-8, or lone surrogates from JSON escapes), control characters (C0, DEL, C1), line/paragraph
    separators and bidirectional-override controls. The empty string is clean."""
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("Cs", "Cc", "Zl", "Zp") or ch in _BIDI_CONTROLS:
            return False
    return True


def _identifier_encode_errors(error: UnicodeError) -> tuple[bytes, int]:
    # Surrogate escapes (U+DC80-U+DCFF, how os.listdir carries undecodable bytes) become their original
    # byte; any other lone surrogate (JSON "\ud800") its 3-byte form. Total and deterministic.
    if not isinstance(error, UnicodeEncodeError):
        raise error
    out = bytearray()
    for ch in error.object[error.start : error.end]:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(code - 0xDC00)
        else:
            out += ch.encode("utf-8", "surrogatepass")
    return bytes(out), error.end


codecs.register_error("hema-identifier", _identifier_encode_errors)


def identifier_bytes(text: str) -> bytes:
    """UTF-8 of ``text``; surrogate escapes as the bytes they stand for. Never raises."""
    return text.encode("utf-8", "hema-identifier")


# --- the key -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PseudonymKey:
    """The HMAC key plus the record-number normalisation it pseudonymises with. ``repr`` never shows
    the secret. Built directly from bytes any secret of 32+ bytes works; ``load_pseudonym_key`` applies
    the stricter rules for configured keys (hex, private key file)."""

    secret: bytes = field(repr=False)
    record_number_normalisation: RecordNumberNormalisation = RecordNumberNormalisation.COMPACT

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes):
            raise InvalidPseudonymKey("the pseudonymisation key must be bytes")
        if len(self.secret) < MIN_KEY_BYTES:
            raise InvalidPseudonymKey(f"the pseudonymisation key must be at least {MIN_KEY_BYTES} bytes (got {len(self.secret)})")
        object.__setattr__(self, "record_number_normalisation", RecordNumberNormalisation.parse(self.record_number_normalisation))

    def pseudonym(self, namespace: str, value: str) -> str:
        """HMAC of ``value`` (stripped, otherwise as given) in ``namespace``; accepts surrogate escapes."""
        message = identifier_bytes(namespace) + b"\x00" + identifier_bytes(value.strip())
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX_CHARS]

    def smear_id(self, accession: str) -> str:
        return "S" + self.pseudonym("accession", normalise_accession(accession))

    def patient_id(self, record_number: str, normalisation: RecordNumberNormalisation | str | None = None) -> str:
        """``normalisation`` ``None`` = the key's own (``record_number_normalisation``). Raises
        ``UnusableIdentifier`` (a ValueError) when the record number normalises to nothing."""
        chosen = self.record_number_normalisation if normalisation is None else RecordNumberNormalisation.parse(normalisation)
        return "P" + self.pseudonym("patient", chosen.apply(record_number))

    @property
    def fingerprint(self) -> str:
        """HMAC-SHA256(key, "hema-pipeline key fingerprint v1"), first 16 hex characters: identifies the
        key without revealing it."""
        return hmac.new(self.secret, FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()[:FINGERPRINT_HEX_CHARS]

    def with_normalisation(self, normalisation: RecordNumberNormalisation | str) -> PseudonymKey:
        return PseudonymKey(self.secret, RecordNumberNormalisation.parse(normalisation))


def parse_hex_key(text: str, source: str = "HEMA_PSEUDONYM_KEY") -> bytes:
    """The key bytes from hex text (surrounding whitespace stripped). Raises ``InvalidPseudonymKey``
    saying what is wrong, naming ``source`` and never quoting the text."""
    stripped = text.strip()
    if not stripped:
        raise InvalidPseudonymKey(f"{source} is empty; {KEY_HELP}")
    not_hex = sum(1 for ch in stripped if ch not in string.hexdigits)
    if not_hex:
        inner_space = any(ch.isspace() for ch in stripped)
        hint = " (whitespace inside the key)" if inner_space else ""
        if stripped[:2] in ("0x", "0X"):
            hint = " (drop the 0x prefix)"
        raise InvalidPseudonymKey(
            f"{source} is not a hex key: {not_hex} of its {len(stripped)} characters are not hex digits{hint}; {KEY_HELP}"
        )
    if len(stripped) % 2:
        raise InvalidPseudonymKey(
            f"{source} has {len(stripped)} hex characters, an odd number (two per byte: was a character lost "
            f"or added?); {KEY_HELP}"
        )
    if len(stripped) < MIN_KEY_HEX_CHARS:
        raise InvalidPseudonymKey(
            f"{source} has {len(stripped)} hex characters ({len(stripped) // 2} bytes); the key must be at least "
            f"{MIN_KEY_BYTES} bytes, i.e. {MIN_KEY_HEX_CHARS} hex characters; {KEY_HELP}"
        )
    return bytes.fromhex(stripped)


def _read_key_file(path: Path) -> str:
    """The key file's text, after checking it is a regular file that grants nothing to group or other."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise MissingPseudonymKey(
            f"the key file {path} (HEMA_PSEUDONYM_KEY_FILE) does not exist; {KEY_HELP}, in a file of mode 0600"
        ) from None
    except PermissionError:
        raise InvalidPseudonymKey(f"the key file {path} (HEMA_PSEUDONYM_KEY_FILE) cannot be read by this user") from None
    except OSError as error:
        raise InvalidPseudonymKey(f"the key file {path} (HEMA_PSEUDONYM_KEY_FILE) cannot be opened: {error.strerror}") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise InvalidPseudonymKey(f"the key file {path} (HEMA_PSEUDONYM_KEY_FILE) is not a regular file")
        if os.name == "posix" and status.st_mode & 0o077:
            raise InvalidPseudonymKey(
                f"the key file {path} (HEMA_PSEUDONYM_KEY_FILE) has mode {stat.S_IMODE(status.st_mode):04o}, which "
                f"grants access to group or other users; it must be private to its owner (0600 or 0400): "
                f"chmod 600 {path}"
            )
        if status.st_size > MAX_KEY_FILE_BYTES:
            raise InvalidPseudonymKey(
                f"the key file {path} (HEMA_PSEUDONYM_KEY_FILE) is {status.st_size} bytes; it must hold only the hex key"
            )
        chunks = []
        while data := os.read(descriptor, MAX_KEY_FILE_BYTES + 1):
            chunks.append(data)
            if sum(map(len, chunks)) > MAX_KEY_FILE_BYTES:
                raise InvalidPseudonymKey(f"the key file {path} (HEMA_PSEUDONYM_KEY_FILE) must hold only the hex key")
    finally:
        os.close(descriptor)
    try:
        return b"".join(chunks).decode("ascii")
    except UnicodeDecodeError:
        raise InvalidPseudonymKey(
            f"the key file {path} (HEMA_PSEUDONYM_KEY_FILE) holds bytes that are not ASCII; {KEY_HELP}"
        ) from None


def _create_demo_key_file(path: Path) -> None:
    """A random key in a new 0600 file; never overwrites an existing one (two processes may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(descriptor, (secrets.token_hex(MIN_KEY_BYTES) + "\n").encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path)  # atomic: readers never see a half-written key
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system
            try:
                fallback = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return
            with os.fdopen(fallback, "w") as stream:
                stream.write(secrets.token_hex(MIN_KEY_BYTES) + "\n")
    finally:
        temporary.unlink(missing_ok=True)


def load_pseudonym_key(
    secret: str | None,
    key_file: str | None,
    demo_mode: bool,
    normalisation: RecordNumberNormalisation | str | None = None,
) -> PseudonymKey:
    """The configured key: ``secret`` (the value of HEMA_PSEUDONYM_KEY; blank = unset), else ``key_file``.

    Both hold the key as hex (at least 64 hex characters, surrounding whitespace ignored); the key file
    must be a regular file granting nothing to group/other (0600 or 0400). In demo mode a missing key file
    is created (0600) with a random key; outside demo mode a missing key is an error, never a silent
    default. ``normalisation`` ``None`` = HEMA_RECORD_NUMBER_NORMALISATION (default ``compact``).
    Raises ``MissingPseudonymKey``, ``InvalidPseudonymKey`` or ``InvalidRecordNumberNormalisation``."""
    chosen = (
        RecordNumberNormalisation.from_environment() if normalisation is None else RecordNumberNormalisation.parse(normalisation)
    )
    if secret is not None and secret.strip():
        return PseudonymKey(parse_hex_key(secret, "HEMA_PSEUDONYM_KEY"), chosen)
    if key_file and key_file.strip():
        path = Path(key_file.strip())
        if demo_mode and not path.exists() and not path.is_symlink():
            _create_demo_key_file(path)
        return PseudonymKey(parse_hex_key(_read_key_file(path), f"the key file {path}"), chosen)
    raise MissingPseudonymKey(
        "no pseudonymisation key: set HEMA_PSEUDONYM_KEY (64 hex characters, e.g. from "
        "`python -c 'import secrets; print(secrets.token_hex(32))'`) or HEMA_PSEUDONYM_KEY_FILE; "
        "HEMA_DEMO=1 creates a local demo key"
    )


# --- the warehouse's pseudonymisation scheme -----------------------------------------------------------


def _configured_scheme(key: PseudonymKey, normalisation: RecordNumberNormalisation | str | None) -> dict[str, str]:
    chosen = key.record_number_normalisation if normalisation is None else RecordNumberNormalisation.parse(normalisation)
    return {
        "key_fingerprint": key.fingerprint,
        "record_number_normalisation": chosen.label,
        "accession_normalisation": ACCESSION_NORMALISATION,
    }


def _compare_scheme(stored: dict[str, str], configured: dict[str, str], where: str) -> None:
    if stored["key_fingerprint"] != configured["key_fingerprint"]:
        raise PseudonymKeyMismatch(
            f"{where} was built with pseudonymisation key fingerprint {stored['key_fingerprint']}, but the "
            f"configured key has fingerprint {configured['key_fingerprint']}. Pseudonyms cannot be translated "
            "between keys: importing under this key would give every smear and patient a second identity. "
            "To go on with this warehouse, restore the original key (HEMA_PSEUDONYM_KEY / "
            "HEMA_PSEUDONYM_KEY_FILE). To rotate the key deliberately, start a new warehouse (a new HEMA_HOME "
            "or HEMA_WAREHOUSE) and re-import the exports.",
            stored,
            configured,
        )
    if stored["record_number_normalisation"] != configured["record_number_normalisation"]:
        was = stored["record_number_normalisation"].split(":")[0]
        raise PseudonymKeyMismatch(
            f"{where} was built with record-number normalisation {stored['record_number_normalisation']!r}, but "
            f"the configuration gives {configured['record_number_normalisation']!r}. Patient pseudonyms made "
            "with another normalisation do not match the stored ones, so every patient would appear twice. To "
            f"go on with this warehouse, set {RECORD_NUMBER_NORMALISATION_VARIABLE}={was}; to change it "
            "deliberately, start a new warehouse (a new HEMA_HOME or HEMA_WAREHOUSE) and re-import the exports.",
            stored,
            configured,
        )
    if stored["accession_normalisation"] != configured["accession_normalisation"]:
        raise PseudonymKeyMismatch(
            f"{where} was built with accession normalisation {stored['accession_normalisation']!r}, but this "
            f"version of the pipeline uses {configured['accession_normalisation']!r}, so smear pseudonyms would "
            "not match the stored ones. Run the pipeline version the warehouse was built with, or start a new "
            "warehouse (a new HEMA_HOME or HEMA_WAREHOUSE) and re-import the exports.",
            stored,
            configured,
        )


def ensure_pseudonym_scheme(
    target: Warehouse | duckdb.DuckDBPyConnection,
    key: PseudonymKey,
    normalisation: RecordNumberNormalisation | str | None = None,
) -> None:
    """Record the key fingerprint and normalisations at the warehouse's first use; afterwards raise
    ``PseudonymKeyMismatch`` if they differ. ``target`` is a write connection from
    ``Warehouse.connect()`` (cheapest: call it inside the import's own transaction, before writing; one
    small query) or a ``Warehouse`` (opens a write connection). ``normalisation`` ``None`` = the key's own."""
    from hema_pipeline.storage.warehouse import Warehouse

    configured = _configured_scheme(key, normalisation)
    if isinstance(target, Warehouse):
        with target.connect() as connection:
            _ensure(connection, configured, f"the warehouse {target.description}")
    else:
        _ensure(target, configured, "this warehouse")


def _ensure(connection: duckdb.DuckDBPyConnection, configured: dict[str, str], where: str) -> None:
    from hema_pipeline.storage.warehouse import read_pseudonym_scheme, record_pseudonym_scheme

    stored = read_pseudonym_scheme(connection)
    if stored is None:
        record_pseudonym_scheme(connection, **configured)
        stored = read_pseudonym_scheme(connection)
        if stored is None:
            raise RuntimeError("the pseudonym_scheme row was not recorded")
    _compare_scheme(stored, configured, where)


def check_pseudonym_scheme(
    warehouse: Warehouse | str | os.PathLike[str],
    key: PseudonymKey,
    normalisation: RecordNumberNormalisation | str | None = None,
) -> None:
    """The non-writing check for sensors and schedules: raise ``PseudonymKeyMismatch`` if the warehouse
    records another key or normalisation. Passes when the warehouse file, its scheme table or row is
    absent (the first import records it), or when a writer holds the file right now (never waits: the
    run's own ``ensure_pseudonym_scheme`` decides). About 30 ms: cheap enough for every sensor tick."""
    import duckdb

    from hema_pipeline.storage.warehouse import Warehouse, WarehouseBusy, WarehouseMissing, read_pseudonym_scheme

    store = warehouse if isinstance(warehouse, Warehouse) else Warehouse(warehouse)
    try:
        with store.connect_existing(lock_wait_seconds=0.0) as connection:
            stored = read_pseudonym_scheme(connection)
    except (WarehouseMissing, WarehouseBusy, duckdb.ConnectionException):
        # ConnectionException: this process holds the file open in another mode; the run will check.
        return
    if stored is not None:
        _compare_scheme(stored, _configured_scheme(key, normalisation), f"the warehouse {store.description}")


# --- the rest of the metadata ---------------------------------------------------------------------------


def age_band(birth_date: dt.date, on: dt.date) -> str:
    years = on.year - birth_date.year - ((on.month, on.day) < (birth_date.month, birth_date.day))
    if years >= 90:
        return "90+"
    if years < 0:
        raise ValueError("birth date after collection date")
    low = (years // 10) * 10
    return f"{low:02d}-{low + 9:02d}"


@dataclass(frozen=True)
class AnonymousSmear:
    smear_id: str
    patient_id: str
    age_band: str
    sex: str
    collection_date: dt.date
    analyser_id: str


def anonymise_smear(metadata: SmearMetadata, key: PseudonymKey) -> AnonymousSmear:
    return AnonymousSmear(
        smear_id=key.smear_id(metadata.accession),
        patient_id=key.patient_id(metadata.patient.record_number),
        age_band=age_band(metadata.patient.birth_date, metadata.collected_at.date()),
        sex=metadata.patient.sex,
        collection_date=metadata.collected_at.date(),
        analyser_id=metadata.analyser_id,
    )
