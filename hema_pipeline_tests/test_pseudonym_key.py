"""The pseudonymisation key: hex-only configured keys, private key files, redacted errors, identifier
normalisation before the HMAC, and the warehouse's recorded key fingerprint."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
import textwrap
import time
import unicodedata
from pathlib import Path

import duckdb
import pytest

from hema_pipeline.anonymise.pseudonymise import (
    InvalidPseudonymKey,
    InvalidRecordNumberNormalisation,
    MissingPseudonymKey,
    PseudonymKey,
    PseudonymKeyMismatch,
    RecordNumberNormalisation,
    UnusableIdentifier,
    check_pseudonym_scheme,
    ensure_pseudonym_scheme,
    is_clean_text,
    load_pseudonym_key,
    normalise_accession,
    normalise_record_number,
)
from hema_pipeline.defs.resources import PseudonymKeyResource, WarehouseResource
from hema_pipeline.storage.warehouse import Warehouse

KEY_HEX = "0123456789abcdef" * 4  # 64 hex characters = 32 bytes
OTHER_HEX = "fedcba9876543210" * 4


@pytest.fixture(autouse=True)
def _no_key_settings(monkeypatch):
    for name in ("HEMA_PSEUDONYM_KEY", "HEMA_PSEUDONYM_KEY_FILE", "HEMA_RECORD_NUMBER_NORMALISATION", "HEMA_DEMO"):
        monkeypatch.delenv(name, raising=False)


def _assert_redacted(message: str, secret: str) -> None:
    """No run of 8 characters of the secret (or of its stripped form) appears in the message."""
    secret = secret.strip()
    for start in range(0, max(1, len(secret) - 7)):
        assert secret[start : start + 8] not in message, message


def _key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# --- configured keys are hex --------------------------------------------------------------------------


@pytest.mark.parametrize("text", [KEY_HEX, f"  {KEY_HEX}\n", KEY_HEX.upper(), KEY_HEX + "ab" * 16])
def test_hex_keys_load_with_surrounding_whitespace_ignored(text):
    key = load_pseudonym_key(text, None, demo_mode=False)
    assert key.secret == bytes.fromhex(text.strip())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (KEY_HEX[:-1], "63 hex characters, an odd number"),
        (KEY_HEX[:-2], "62 hex characters (31 bytes)"),
        ("5e" * 20, "at least 32 bytes"),
        ("k" * 64, "not a hex key: 64 of its 64 characters"),  # once a text key, now refused
        ("correct horse battery staple and more words to make it long", "not a hex key"),
        ("0x" + KEY_HEX, "drop the 0x prefix"),
        (KEY_HEX[:32] + " " + KEY_HEX[32:], "whitespace inside the key"),
        (KEY_HEX[:-1] + "g", "1 of its 64 characters are not hex digits"),
        ("５ｅ" * 32, "not a hex key"),  # fullwidth look-alikes
    ],
)
def test_malformed_keys_are_refused_with_a_precise_redacted_message(text, problem):
    with pytest.raises(InvalidPseudonymKey) as raised:
        load_pseudonym_key(text, None, demo_mode=False)
    message = str(raised.value)
    assert problem in message and "HEMA_PSEUDONYM_KEY" in message
    _assert_redacted(message, text)
    assert isinstance(raised.value, MissingPseudonymKey)  # callers catching the old error still do


def test_blank_key_variable_counts_as_unset(tmp_path):
    with pytest.raises(MissingPseudonymKey, match="no pseudonymisation key"):
        load_pseudonym_key("   ", None, demo_mode=False)
    path = _key_file(tmp_path / "k", KEY_HEX)
    assert load_pseudonym_key(" ", str(path), demo_mode=False).secret == bytes.fromhex(KEY_HEX)
    # The variable wins over the file when both are set.
    assert load_pseudonym_key(OTHER_HEX, str(path), demo_mode=False).secret == bytes.fromhex(OTHER_HEX)


def test_repr_never_shows_the_secret():
    key = load_pseudonym_key(KEY_HEX, None, demo_mode=False)
    assert KEY_HEX not in repr(key) and str(bytes.fromhex(KEY_HEX)) not in repr(key)


# --- key files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_key_files_load(tmp_path, mode):
    path = _key_file(tmp_path / "pseudonym.key", KEY_HEX + "\n", mode)
    assert load_pseudonym_key(None, str(path), demo_mode=False).secret == bytes.fromhex(KEY_HEX)


@pytest.mark.skipif(os.name != "posix", reason="file modes")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o601, 0o666])
def test_key_files_readable_or_writable_by_others_are_refused(tmp_path, mode, monkeypatch):
    path = _key_file(tmp_path / "pseudonym.key", KEY_HEX, mode)
    for demo in (False, True):
        with pytest.raises(InvalidPseudonymKey) as raised:
            load_pseudonym_key(None, str(path), demo_mode=demo)
        message = str(raised.value)
        assert f"mode {mode:04o}" in message and "chmod 600" in message and str(path) in message
        _assert_redacted(message, KEY_HEX)
    resource = PseudonymKeyResource(key_file=str(path))
    assert "chmod 600" in (resource.problem() or "")


def test_symlinked_key_file_is_judged_by_its_target(tmp_path):
    target = _key_file(tmp_path / "real.key", KEY_HEX)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    assert load_pseudonym_key(None, str(link), demo_mode=False).secret == bytes.fromhex(KEY_HEX)
    target.chmod(0o644)
    with pytest.raises(InvalidPseudonymKey, match="0644"):
        load_pseudonym_key(None, str(link), demo_mode=False)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        (KEY_HEX[:-1], "odd number"),
        ("not a key but a sentence of text", "not a hex key"),
        (f"HEMA_PSEUDONYM_KEY={KEY_HEX}", "not a hex key"),
    ],
)
def test_malformed_key_files_are_refused(tmp_path, content, problem):
    path = _key_file(tmp_path / "pseudonym.key", content)
    with pytest.raises(InvalidPseudonymKey) as raised:
        load_pseudonym_key(None, str(path), demo_mode=False)
    assert problem in str(raised.value) and str(path) in str(raised.value)
    if content.strip():
        _assert_redacted(str(raised.value), content)


def test_odd_key_files_are_refused_without_reading_them(tmp_path):
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe" + bytes(range(200)))
    binary.chmod(0o600)
    with pytest.raises(InvalidPseudonymKey, match="not ASCII"):
        load_pseudonym_key(None, str(binary), demo_mode=False)
    huge = _key_file(tmp_path / "huge.key", KEY_HEX * 200)
    with pytest.raises(InvalidPseudonymKey, match="only the hex key"):
        load_pseudonym_key(None, str(huge), demo_mode=False)
    folder = tmp_path / "folder.key"
    folder.mkdir(mode=0o700)
    with pytest.raises(InvalidPseudonymKey, match="not a regular file"):
        load_pseudonym_key(None, str(folder), demo_mode=False)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    started = time.monotonic()
    with pytest.raises(InvalidPseudonymKey, match="not a regular file"):
        load_pseudonym_key(None, str(fifo), demo_mode=True)
    assert time.monotonic() - started < 5  # a FIFO never blocks the loader


def test_absent_key_file_is_missing_outside_demo_mode(tmp_path):
    path = tmp_path / "absent.key"
    with pytest.raises(MissingPseudonymKey, match="does not exist"):
        load_pseudonym_key(None, str(path), demo_mode=False)
    assert not path.exists()


def test_demo_mode_creates_one_private_hex_key_file(tmp_path):
    path = tmp_path / "home" / "pseudonym.key"
    first = load_pseudonym_key(None, str(path), demo_mode=True)
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert len(text.strip()) == 64 and bytes.fromhex(text.strip()) == first.secret
    assert load_pseudonym_key(None, str(path), demo_mode=True) == first
    assert [entry.name for entry in path.parent.iterdir()] == ["pseudonym.key"]  # no temporary left behind


# --- the resource -------------------------------------------------------------------------------------


def test_resource_problem_is_a_redacted_reason_or_none(tmp_path, monkeypatch):
    assert "HEMA_PSEUDONYM_KEY" in (PseudonymKeyResource().problem() or "")
    monkeypatch.setenv("HEMA_PSEUDONYM_KEY", KEY_HEX[:-1])
    problem = PseudonymKeyResource().problem()
    assert problem and "odd number" in problem
    _assert_redacted(problem, KEY_HEX)
    monkeypatch.setenv("HEMA_PSEUDONYM_KEY", KEY_HEX)
    assert PseudonymKeyResource().problem() is None
    monkeypatch.setenv("HEMA_RECORD_NUMBER_NORMALISATION", "fuzzy")
    assert "must be one of strict, compact, digits" in (PseudonymKeyResource().problem() or "")
    assert PseudonymKeyResource(record_number_normalisation="digits").problem() is None


def test_resource_problem_reports_a_warehouse_built_under_another_key(tmp_path, monkeypatch):
    warehouse = WarehouseResource(path=str(tmp_path / "w.duckdb"))
    monkeypatch.setenv("HEMA_PSEUDONYM_KEY", KEY_HEX)
    assert PseudonymKeyResource().problem(warehouse) is None  # absent warehouse: the first import records
    assert not Path(warehouse.path).exists()
    ensure_pseudonym_scheme(warehouse.warehouse(), PseudonymKeyResource().key())
    assert PseudonymKeyResource().problem(warehouse) is None
    monkeypatch.setenv("HEMA_PSEUDONYM_KEY", OTHER_HEX)
    problem = PseudonymKeyResource().problem(warehouse)
    assert problem and "fingerprint" in problem and "new warehouse" in problem
    _assert_redacted(problem, OTHER_HEX)
    _assert_redacted(problem, KEY_HEX)


# --- fingerprint --------------------------------------------------------------------------------------


def test_fingerprint_is_the_documented_hmac_and_differs_between_keys():
    key = PseudonymKey(bytes.fromhex(KEY_HEX))
    expected = hmac.new(bytes.fromhex(KEY_HEX), b"hema-pipeline key fingerprint v1", hashlib.sha256).hexdigest()[:16]
    assert key.fingerprint == expected
    assert key.fingerprint != PseudonymKey(bytes.fromhex(OTHER_HEX)).fingerprint
    assert key.fingerprint == key.with_normalisation("digits").fingerprint  # the key's, not the scheme's


def test_ensure_records_the_scheme_once_and_refuses_another_key(tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    key = PseudonymKey(bytes.fromhex(KEY_HEX))
    ensure_pseudonym_scheme(warehouse, key)
    ensure_pseudonym_scheme(warehouse, key)  # same key: nothing to do
    [row] = warehouse.query("select * from pseudonym_scheme").to_dict("records")
    assert row["key_fingerprint"] == key.fingerprint
    assert row["record_number_normalisation"] == "compact:v1"
    assert row["accession_normalisation"] == "nfc-strip:v1"
    assert row["smears_before"] == 0

    other = PseudonymKey(bytes.fromhex(OTHER_HEX))
    with pytest.raises(PseudonymKeyMismatch) as raised:
        ensure_pseudonym_scheme(warehouse, other)
    message = str(raised.value)
    assert key.fingerprint in message and other.fingerprint in message
    assert "restore the original key" in message and "new warehouse" in message and "re-import" in message
    _assert_redacted(message, KEY_HEX)
    _assert_redacted(message, OTHER_HEX)
    assert len(warehouse.query("select * from pseudonym_scheme")) == 1  # the record is unchanged


def test_ensure_refuses_another_record_number_normalisation(tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    key = PseudonymKey(bytes.fromhex(KEY_HEX))
    with warehouse.connect() as connection:  # inside the importer's own transaction
        connection.execute("begin")
        ensure_pseudonym_scheme(connection, key)
        connection.execute("commit")
    with pytest.raises(PseudonymKeyMismatch, match="HEMA_RECORD_NUMBER_NORMALISATION=compact"):
        ensure_pseudonym_scheme(warehouse, key.with_normalisation("digits"))
    with pytest.raises(PseudonymKeyMismatch, match="record-number normalisation 'compact:v1'"):
        ensure_pseudonym_scheme(warehouse, key, normalisation="strict")
    ensure_pseudonym_scheme(warehouse, key.with_normalisation("compact"))


def test_ensure_notes_smears_imported_before_the_scheme_was_kept(tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    with warehouse.connect() as connection:
        columns = connection.execute(
            "select column_name, data_type from duckdb_columns() where table_name = 'smears' and is_nullable = false"
        ).fetchall()
        values = {
            "VARCHAR": "'x'",
            "INTEGER": "1",
            "BIGINT": "1",
            "DATE": "date '2026-01-01'",
            "TIMESTAMP": "timestamp '2026-01-01'",
        }
        for index in range(3):
            names = ", ".join(name for name, _ in columns)
            row = ", ".join(f"'S{index}'" if name == "smear_id" else values.get(kind, "'x'") for name, kind in columns)
            connection.execute(f"insert into smears ({names}) values ({row})")
    ensure_pseudonym_scheme(warehouse, PseudonymKey(bytes.fromhex(KEY_HEX)))
    assert warehouse.query("select smears_before from pseudonym_scheme").smears_before[0] == 3


def test_check_writes_nothing_and_passes_where_nothing_is_recorded(tmp_path):
    key = PseudonymKey(bytes.fromhex(KEY_HEX))
    absent = tmp_path / "absent.duckdb"
    check_pseudonym_scheme(absent, key)
    assert not absent.exists()

    warehouse = Warehouse(tmp_path / "w.duckdb")
    with warehouse.connect():
        pass  # schema, no scheme row yet
    before = sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns) for entry in tmp_path.iterdir())
    check_pseudonym_scheme(warehouse, PseudonymKey(bytes.fromhex(OTHER_HEX)))
    assert sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns) for entry in tmp_path.iterdir()) == before
    assert warehouse.query("select count(*) as n from pseudonym_scheme").n[0] == 0
    ensure_pseudonym_scheme(warehouse, key)
    check_pseudonym_scheme(warehouse, key)
    with pytest.raises(PseudonymKeyMismatch, match="fingerprint"):
        check_pseudonym_scheme(str(warehouse.path), PseudonymKey(bytes.fromhex(OTHER_HEX)))

    legacy = tmp_path / "legacy.duckdb"  # a warehouse from before the table existed
    duckdb.connect(str(legacy)).close()
    check_pseudonym_scheme(legacy, key)


def test_check_never_waits_for_a_writer(tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    key = PseudonymKey(bytes.fromhex(KEY_HEX))
    ensure_pseudonym_scheme(warehouse, key)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import duckdb, sys, time
                connection = duckdb.connect({str(warehouse.path)!r})
                print("locked", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        check_pseudonym_scheme(warehouse, PseudonymKey(bytes.fromhex(OTHER_HEX)))  # cannot tell now: passes
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    with warehouse.connect():  # this process writing it (another mode of the same file): passes too
        check_pseudonym_scheme(warehouse, PseudonymKey(bytes.fromhex(OTHER_HEX)))
    with warehouse.connect(read_only=True), pytest.raises(PseudonymKeyMismatch):  # shared reader: checks
        check_pseudonym_scheme(warehouse, PseudonymKey(bytes.fromhex(OTHER_HEX)))


# --- identifier normalisation -------------------------------------------------------------------------

SIX_WAYS = ["MRN 0012345", "mrn0012345", "MRN-0012345", " MRN0012345", "MRN.0012345", "ＭＲＮ００１２３４５"]


def test_record_number_written_six_ways_is_one_patient_by_default():
    key = PseudonymKey(bytes.fromhex(KEY_HEX))
    assert key.record_number_normalisation is RecordNumberNormalisation.COMPACT
    assert len({key.patient_id(number) for number in SIX_WAYS}) == 1
    more = ["MRN_0012345", "MRN/0012345", "MRN,0012345", "MRN\u20130012345", "MRN\u200b0012345", "MRN\t0012345\n", "MRN٠٠١٢٣٤٥"]
    assert {key.patient_id(number) for number in more} == {key.patient_id("MRN0012345")}
    assert key.patient_id("MRN0012345") != key.patient_id("MRN0012346")
    assert key.patient_id("MRN0012345") != key.patient_id("0012345")  # compact keeps letters and zeros
    assert key.patient_id("0012345") != key.patient_id("12345")


def test_canonical_identifiers_keep_the_pseudonyms_they_had_before_normalisation():
    secret = bytes.fromhex(KEY_HEX)
    key = PseudonymKey(secret)

    def legacy(namespace: str, value: str) -> str:
        return hmac.new(secret, f"{namespace}\x00{value.strip()}".encode(), hashlib.sha256).hexdigest()[:20]

    assert key.patient_id("MRN00001234") == "P" + legacy("patient", "MRN00001234")
    assert key.smear_id("ACC-2026-42") == "S" + legacy("accession", "ACC-2026-42")


def test_strict_and_digits_normalisations():
    key = PseudonymKey(bytes.fromhex(KEY_HEX), "strict")
    assert key.patient_id(" MRN0012345\n") == key.patient_id("ＭＲＮ００１２３４５") == key.patient_id("MRN0012345")
    assert key.patient_id("mrn0012345") != key.patient_id("MRN0012345")
    assert key.patient_id("MRN-0012345") != key.patient_id("MRN0012345")
    digits = PseudonymKey(bytes.fromhex(KEY_HEX), RecordNumberNormalisation.DIGITS)
    assert len({digits.patient_id(number) for number in [*SIX_WAYS, "12345", "0012345", "١٢٣٤٥"]}) == 1
    assert digits.patient_id("000") == digits.patient_id("0")
    # The per-call override uses the same rules as the key's own.
    compact = PseudonymKey(bytes.fromhex(KEY_HEX))
    assert compact.patient_id("MRN 12345", normalisation="digits") == digits.patient_id("12345")
    assert normalise_record_number("mrn-0012345", "compact") == "MRN0012345"
    assert normalise_record_number("MRN 0012345", RecordNumberNormalisation.DIGITS) == "12345"


@pytest.mark.parametrize(
    ("normalisation", "number"), [("compact", "-./_,"), ("compact", "\u200b"), ("digits", "MRN"), ("strict", "  ")]
)
def test_record_numbers_that_normalise_to_nothing_are_unusable_not_merged(normalisation, number):
    key = PseudonymKey(bytes.fromhex(KEY_HEX), normalisation)
    with pytest.raises(UnusableIdentifier) as raised:
        key.patient_id(number)
    assert isinstance(raised.value, ValueError)
    assert number.strip() == "" or number not in str(raised.value)


def test_normalisation_setting_is_read_and_validated(monkeypatch):
    monkeypatch.setenv("HEMA_RECORD_NUMBER_NORMALISATION", " Digits ")
    assert load_pseudonym_key(KEY_HEX, None, demo_mode=False).record_number_normalisation is RecordNumberNormalisation.DIGITS
    monkeypatch.setenv("HEMA_PSEUDONYM_KEY", KEY_HEX)
    assert PseudonymKeyResource().key().record_number_normalisation is RecordNumberNormalisation.DIGITS
    assert PseudonymKeyResource(record_number_normalisation="strict").key().record_number_normalisation == "strict"
    monkeypatch.setenv("HEMA_RECORD_NUMBER_NORMALISATION", "lowercase")
    with pytest.raises(InvalidRecordNumberNormalisation, match="strict, compact, digits"):
        load_pseudonym_key(KEY_HEX, None, demo_mode=False)
    monkeypatch.setenv("HEMA_RECORD_NUMBER_NORMALISATION", "")
    assert load_pseudonym_key(KEY_HEX, None, demo_mode=False).record_number_normalisation == "compact"


def test_accession_twins_map_to_one_pseudonym():
    key = PseudonymKey(bytes.fromhex(KEY_HEX))
    nfc = unicodedata.normalize("NFC", "ACC-Müller-2026")
    nfd = unicodedata.normalize("NFD", "ACC-Müller-2026")
    assert nfc != nfd
    assert key.smear_id(nfc) == key.smear_id(nfd) == key.smear_id(nfc + " ") == key.smear_id("\t" + nfd + "\n")
    assert normalise_accession(nfd + "  ") == nfc
    assert key.smear_id("ACC-1") != key.smear_id("acc-1")  # accessions are not case-folded


def test_names_that_are_not_utf8_are_pseudonymised_not_rejected():
    key = PseudonymKey(bytes.fromhex(KEY_HEX))
    latin1 = b"ACC-M\xfcller".decode("utf-8", "surrogateescape")  # what os.listdir gives for Latin-1 bytes
    other = b"ACC-M\xfdller".decode("utf-8", "surrogateescape")
    assert "\udcfc" in latin1
    assert key.smear_id(latin1) != key.smear_id(other) != key.smear_id("ACC-Müller")
    assert key.smear_id(latin1) == key.smear_id(latin1 + " ")
    assert key.smear_id("ACC-\ud800") != key.smear_id("ACC-\ud801")  # lone surrogates from JSON escapes
    assert key.patient_id("MRN\udcff1") and key.patient_id("MRN\ud8001")
    assert not is_clean_text(latin1) and not is_clean_text("ACC-\ud800")


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("ACC-2026-42", True),
        ("ACC-Müller_2026 (repeat)", True),
        ("", True),
        ("ACC\x00", False),
        ("ACC\n1", False),
        ("ACC\x1b[31m", False),
        ("ACC\x7f", False),
        ("ACC\x85", False),
        ("ACC\u2028", False),
        ("ACC\u202egpj.exe", False),
        ("ACC\udcff", False),
    ],
)
def test_is_clean_text(text, clean):
    assert is_clean_text(text) is clean
