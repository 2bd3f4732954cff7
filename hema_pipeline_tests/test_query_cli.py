"""`hema query`: lab SQL on a locked-down read-only connection. SQL cannot read the key file or the
inbox, write or attach files, load extensions, or switch any of that back on; a mistyped warehouse path
is an error, never a new empty warehouse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hema_pipeline.anonymise.pseudonymise import PseudonymKey, ensure_pseudonym_scheme
from hema_pipeline.cli import main
from hema_pipeline.storage.warehouse import Warehouse

SECRET_HEX = "c0ffee" * 10 + "abcd"  # 64 hex characters
PATIENT_NAME = "DOE^JANE"


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``root`` with size and modification time."""
    found: dict[str, tuple[int, int]] = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            status = path.lstat()
            found[str(path.relative_to(root))] = (status.st_size if path.is_file() else 0, status.st_mtime_ns)
    return found


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A warehouse with rows, next to a key file, an inbox smear.json and a CSV; cwd is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HEMA_WAREHOUSE", raising=False)
    key_file = tmp_path / "pseudonym.key"
    key_file.write_text(SECRET_HEX + "\n")
    key_file.chmod(0o600)
    smear = tmp_path / "inbox" / "ACC-2026-42"
    smear.mkdir(parents=True)
    (smear / "smear.json").write_text(json.dumps({"accession": "ACC-2026-42", "patient": {"name": PATIENT_NAME}}))
    (tmp_path / "notes.csv").write_text(f"name\n{PATIENT_NAME}\n")
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    key = PseudonymKey(bytes.fromhex(SECRET_HEX))
    ensure_pseudonym_scheme(warehouse, key)
    with warehouse.connect() as connection:
        connection.execute(
            "insert into quarantine (quarantine_id, smear_id, cell_id, reason_code, reason, import_run_id, quarantined_at) "
            "values ('q1', ?, 3, 'corrupt_image', 'not a JPEG', 'r1', timestamp '2026-03-01 10:00:00')",
            [key.smear_id("ACC-2026-42")],
        )
    monkeypatch.setenv("HEMA_WAREHOUSE", str(warehouse.path))
    return tmp_path


def test_select_over_tables_and_views_works(lab, capsys):
    assert main(["query", "select reason_code, count(*) as n from open_quarantine group by 1"]) == 0
    out = capsys.readouterr().out
    assert "corrupt_image" in out and "1" in out
    assert main(["query", "--csv", "select count(*) as n from verified_cells"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "0"]
    assert main(["query", "--warehouse", str(lab / "warehouse.duckdb"), "select key_fingerprint from pseudonym_scheme"]) == 0
    assert len(capsys.readouterr().out.split()[-1]) == 16


ESCAPES = [
    "select * from read_text('pseudonym.key')",
    "select content from read_text('{root}/pseudonym.key')",
    "select * from read_blob('pseudonym.key')",
    "select * from read_text('inbox/*/smear.json')",
    "select * from read_json('inbox/ACC-2026-42/smear.json')",
    "select * from read_json_auto('inbox/ACC-2026-42/smear.json')",
    "select * from read_csv('notes.csv')",
    "select * from read_csv_auto('notes.csv', header = false)",
    "select * from 'notes.csv'",
    "select * from glob('*')",
    "select * from glob('inbox/*')",
    "select * from read_text('/proc/self/environ')",
    "copy (select 1) to 'out.csv'",
    "copy quarantine to '{root}/leak.csv' (header)",
    "copy (select * from quarantine) to 'leak.parquet' (format parquet)",
    "export database 'dump'",
    "attach 'other.duckdb' as other",
    "attach '{root}/pseudonym.key' as k",
    "attach ':memory:' as scratch; create table scratch.t as select 1",
    "set enable_external_access = true",
    "set enable_external_access = true; select * from read_text('pseudonym.key')",
    "set global enable_external_access = true",
    "reset enable_external_access",
    "pragma enable_external_access = true",
    "set lock_configuration = false",
    "set allowed_directories = ['{root}']",
    "set allowed_paths = ['{root}/pseudonym.key']",
    "set temp_directory = 'spill'",
    "set log_query_path = 'queries.log'",
    "pragma enable_profiling = 'json'; pragma profiling_output = 'profile.json'",
    "call enable_logging(storage = 'file', storage_path = 'logs')",
    "install httpfs",
    "load httpfs",
    "force install json",
    "select * from read_text('https://example.org/')",
    "create table leak as select 1",
    "insert into quarantine select * from quarantine",
    "drop table quarantine",
    "select getenv('HEMA_PSEUDONYM_KEY')",
]


@pytest.mark.parametrize("sql", ESCAPES)
def test_escape_attempts_fail_and_write_nothing(lab, capsys, monkeypatch, sql):
    monkeypatch.setenv("HEMA_PSEUDONYM_KEY", SECRET_HEX)
    before = _listing(lab)
    code = main(["query", "--csv", sql.format(root=lab)])
    captured = capsys.readouterr()
    assert code != 0
    assert captured.err.startswith("hema query: ")
    assert _listing(lab) == before
    for secret in (SECRET_HEX, PATIENT_NAME, "ACC-2026-42\n"):
        assert secret not in captured.out and secret not in captured.err


def test_missing_warehouse_exits_2_and_creates_nothing(lab, capsys):
    before = _listing(lab)
    for path in (lab / "warehuose.duckdb", lab / "typo" / "warehouse.duckdb"):
        assert main(["query", "--warehouse", str(path), "select 1"]) == 2
        error = capsys.readouterr().err
        assert "does not exist" in error and "nothing was created" in error
        assert not path.exists()
    assert main(["query", "--warehouse", str(lab / "inbox"), "select 1"]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert _listing(lab) == before


def test_missing_default_warehouse_through_the_installed_command(tmp_path):
    environment = {**os.environ, "HEMA_HOME": str(tmp_path / "home")}
    environment.pop("HEMA_WAREHOUSE", None)
    done = subprocess.run(
        [sys.executable, "-m", "hema_pipeline.cli", "query", "select 1"],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "does not exist" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_classify_with_a_mistyped_warehouse_exits_2_and_creates_nothing(tmp_path):
    from hema_pipeline.cli import main

    image = tmp_path / "cell.jpg"
    image.write_bytes(b"\xff\xd8\xff\xd9")
    typo = tmp_path / "warehuose.duckdb"
    code = main(["classify", "-f", str(image), "-o", str(tmp_path / "out.csv"), "--warehouse", str(typo), "-q"])
    assert code == 2
    assert not typo.exists() and not (tmp_path / "out.csv").exists()
