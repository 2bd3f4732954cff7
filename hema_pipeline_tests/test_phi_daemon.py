"""The PHI canary where Dagster itself writes: a real `dagster dev` (webserver + daemon) imports a hostile
inbox through its sensor, and nothing identifying reaches the event log, run and tick storage, compute
logs, the daemon's own log output, the warehouse or the lake — while every smear is imported or
quarantined and no run fails."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline_tests.phi import byte_hits, decoded_hits
from hema_pipeline_tests.test_ui import REPO, RUN_TIMEOUT_S, _wait_until, dagster_dev_environment, running_dagster_dev

pytestmark = pytest.mark.end_to_end

SECRET = "KEYFILE-CANARY-7d1f0c"
STRAY = "STRAYDOE_MRN55501234"
LATIN1_TAIL = "ller-H26-999001"


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 120, 160)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    position = data.find(b"\xff\xc0")
    data[position + 5 : position + 9] = (40000).to_bytes(2, "big") * 2
    return bytes(data)


def _plant_faults(home: Path, inbox: Path, export) -> None:
    secret = home / "secret.key"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    first, second, third = export.smears
    ids = sorted(first.image_names)
    image = first.folder / first.image_names[ids[0]]
    image.write_bytes(image.read_bytes()[:900])  # truncated
    (first.folder / first.image_names[ids[1]]).unlink()
    (first.folder / first.image_names[ids[1]]).symlink_to(secret)  # a listed cell that is a link
    (first.folder / f"{first.patient.name}.jpg").symlink_to(secret)  # an unlisted link named after the patient
    os.mkfifo(first.folder / first.image_names[ids[2]].replace(".jpg", "_fifo.jpg"))
    (second.folder / "smear.json").write_text('{"format_version": 1, "x": ' + "[" * 20_000 + "]" * 20_000 + "}")
    ids = sorted(third.image_names)
    (third.folder / third.image_names[ids[0]]).write_bytes(_bomb())
    document = json.loads((third.folder / "smear.json").read_text())
    document["cells"][1]["analyser_class"] = f"seen by {third.patient.name}"
    (third.folder / "smear.json").write_text(json.dumps(document))
    latin1 = os.fsencode(inbox) + b"/M\xfc" + LATIN1_TAIL.encode()
    os.mkdir(latin1)
    with open(latin1 + b"/smear.json", "wb") as handle:
        handle.write(b"{}")
    (inbox / f"{STRAY}.txt").write_text(f"left by {first.patient.name}")
    (inbox / "empty").mkdir()


def test_daemon_imports_a_hostile_inbox_and_nothing_identifying_reaches_dagster(tmp_path: Path) -> None:
    home = tmp_path / "hema"
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True)
    shutil.copyfile(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    inbox = home / "inbox"
    export = generate_export(inbox, SyntheticExportSpec(smears=3, cells_per_smear=6, seed=97))
    _plant_faults(home, inbox, export)
    needles = [*export.phi_strings(), SECRET, STRAY, LATIN1_TAIL]

    with running_dagster_dev(
        home, dagster_home, dagster_dev_environment(home, dagster_home), log_name="dagster-dev-phi.log"
    ) as server:

        def imports_done() -> list[dict] | None:
            runs = server.runs("import_smears")
            failed = [run for run in runs if run["status"] in ("FAILURE", "CANCELED")]
            if failed:
                raise AssertionError(f"import runs failed: {failed}\n{server.log_tail()}")
            succeeded = [run for run in runs if run["status"] == "SUCCESS"]
            return succeeded if len(succeeded) >= 4 else None

        runs = _wait_until(imports_done, RUN_TIMEOUT_S, "the daemon to import the four smear folders", server)
        log = server.log

    assert len(runs) == 4
    statuses = Warehouse(home / "warehouse.duckdb").query("select status, count(*) as n from import_runs group by 1 order by 1")
    assert dict(zip(statuses["status"], statuses["n"], strict=True)) == {"partially_quarantined": 2, "quarantined": 2}
    codes = set(Warehouse(home / "warehouse.duckdb").query("select distinct reason_code from quarantine")["reason_code"])
    assert codes >= {
        "corrupt_image",
        "symlink_not_followed",
        "not_a_regular_file",
        "malformed_metadata",
        "image_too_large",
        "unknown_class",
        "invalid_folder_name",
    }
    # Positive control: the needles are in the inbox, so a clean result means something.
    assert {needle for _, needle in byte_hits([inbox], needles)} >= {smear.patient.record_number for smear in export.smears}
    written = [dagster_home, log, home / "warehouse.duckdb", home / "lake"]
    assert byte_hits(written, needles) == []
    assert decoded_hits([home / "warehouse.duckdb"], [home / "lake"], needles) == []
    assert byte_hits([home / "quarantine"], [SECRET]) == [], "a link's target was copied into the quarantine store"
