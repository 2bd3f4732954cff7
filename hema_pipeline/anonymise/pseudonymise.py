"""Turn a smear's identifying metadata into what the warehouse may hold.

- patient record number and accession -> keyed pseudonyms, HMAC-SHA256 under a secret key: stable across
  imports (a patient's smears group together, which leak-proof splits need) but not reversible, and no
  re-identification table is stored anywhere;
- birth date -> 10-year age band at collection;
- collection time -> collection date;
- patient name, free-text comment, original file names -> dropped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from hema_pipeline.export.format import SmearMetadata

MIN_KEY_BYTES = 32
PSEUDONYM_HEX_CHARS = 20  # 80 bits: collisions are negligible for any lab's lifetime of smears


class MissingPseudonymKey(RuntimeError):
    pass


@dataclass(frozen=True)
class PseudonymKey:
    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_BYTES:
            raise MissingPseudonymKey(
                f"the pseudonymisation key must be at least {MIN_KEY_BYTES} bytes (got {len(self.secret)})"
            )

    def pseudonym(self, namespace: str, value: str) -> str:
        digest = hmac.new(self.secret, f"{namespace}\x00{value.strip()}".encode(), hashlib.sha256).hexdigest()
        return digest[:PSEUDONYM_HEX_CHARS]

    def smear_id(self, accession: str) -> str:
        return "S" + self.pseudonym("accession", accession)

    def patient_id(self, record_number: str) -> str:
        return "P" + self.pseudonym("patient", record_number)


def load_pseudonym_key(secret: str | None, key_file: str | None, demo_mode: bool) -> PseudonymKey:
    """The key comes from ``secret`` (hex or text), else ``key_file``. In demo mode a missing key file is
    created with a random key; outside demo mode a missing key is an error, never a silent default."""
    if secret:
        try:
            return PseudonymKey(bytes.fromhex(secret))
        except ValueError:
            return PseudonymKey(secret.encode())
    if key_file:
        path = Path(key_file)
        if not path.exists() and demo_mode:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as stream:
                stream.write(secrets.token_hex(MIN_KEY_BYTES))
        if path.exists():
            return PseudonymKey(bytes.fromhex(path.read_text().strip()))
    raise MissingPseudonymKey(
        "no pseudonymisation key: set HEMA_PSEUDONYM_KEY (64 hex characters, e.g. from "
        "`python -c 'import secrets; print(secrets.token_hex(32))'`) or HEMA_PSEUDONYM_KEY_FILE; "
        "HEMA_DEMO=1 creates a local demo key"
    )


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
