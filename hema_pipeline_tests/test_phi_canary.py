"""PHI canary: the generator plants fake names, record numbers, birth dates, accessions, comments and file
names in metadata, EXIF, JPEG comments and file names; none may reach anything the pipeline writes."""

from __future__ import annotations

import duckdb

from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline_tests.phi import byte_hits, decoded_hits
from hema_pipeline_tests.support import materialise_inbox, materialise_smear


def test_no_identifier_reaches_warehouse_parquet_images_or_dagster(pipeline_env, dagster_instance):
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=3, cells_per_smear=15, seed=21))
    # A bad cell too: quarantine rows and their log lines must be clean as well.
    first = export.smears[0].folder
    victim = sorted(first.glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:800])
    needles = export.phi_strings()
    assert len(needles) >= 3 * 5

    results = materialise_inbox(pipeline_env, dagster_instance)
    assert all(result.success for result in results)

    # Positive control: the search finds the planted identifiers where they are meant to be.
    planted = byte_hits([pipeline_env.inbox], needles)
    assert {needle for _, needle in planted} >= {smear.patient.record_number for smear in export.smears}

    written = [pipeline_env.warehouse, pipeline_env.lake, pipeline_env.dagster_home]
    assert byte_hits(written, needles) == []
    assert decoded_hits([pipeline_env.warehouse], [pipeline_env.lake], needles) == []
    # The Dagster event log and run storage are real files under DAGSTER_HOME, not an in-memory stub.
    assert any(path.suffix == ".db" for path in pipeline_env.dagster_home.rglob("*"))


def test_canary_search_detects_a_leak(pipeline_env, dagster_instance):
    """Guard against a canary that cannot fail: a planted leak in each kind of target is found."""
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=1, cells_per_smear=5, seed=22))
    materialise_smear(pipeline_env, dagster_instance, export.smears[0].folder.name)
    record_number = export.smears[0].patient.record_number
    with duckdb.connect(str(pipeline_env.warehouse)) as connection:
        connection.execute("create table leak as select ? as note from range(1000)", [record_number])
    assert decoded_hits([pipeline_env.warehouse], [], [record_number])
    (pipeline_env.lake / "leak.txt").write_text(f"patient {record_number}")
    assert byte_hits([pipeline_env.lake], [record_number])
