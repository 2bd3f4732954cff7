"""The README's main command: generate (or adapt) an export, run the pipeline through Dagster on the
embedded default, and print what it made and where."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import cast

from hema_pipeline import settings


def prepare_demo_environment() -> Path:
    """Demo mode with a local DAGSTER_HOME whose runs `dagster dev` shows afterwards."""
    os.environ.setdefault("HEMA_DEMO", "1")
    dagster_home = Path(os.environ.setdefault("DAGSTER_HOME", str(settings.hema_home() / "dagster_home"))).resolve()
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    dagster_home.mkdir(parents=True, exist_ok=True)
    instance_config = Path("dagster.yaml")
    if instance_config.is_file() and not (dagster_home / "dagster.yaml").exists():
        shutil.copyfile(instance_config, dagster_home / "dagster.yaml")
    return dagster_home


def fill_inbox(use_pbc: bool, smears: int, cells_per_smear: int, seed: int) -> str:
    inbox = Path(settings.inbox_url())
    if settings.inbox_url().startswith("s3://"):
        raise SystemExit("the demo writes its export into a local inbox; unset HEMA_INBOX or point it at a folder")
    if use_pbc:
        from hema_pipeline.export.pbc import PbcExportSpec, export_pbc_as_smears

        root = settings.shared_data_dir() / "pbc"
        if not root.is_dir():
            raise SystemExit(f"--pbc: no PBC images at {root}; set HEMA_SHARED_DATA to the folder holding pbc/")
        export = export_pbc_as_smears(root, inbox, PbcExportSpec(cells_per_smear=cells_per_smear, seed=seed, max_smears=smears))
        return f"{len(export.smears)} pseudo-smears of real PBC images"
    from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export

    export = generate_export(
        inbox,
        SyntheticExportSpec(
            smears=smears,
            cells_per_smear=cells_per_smear,
            seed=seed,
            dysplastic_smear_share=0.4,
            malignant_smear_share=0.4,
            verified_share=0.9,
        ),
    )
    return f"{len(export.smears)} synthetic smears (fake patients)"


DEMO_TASKS = ("pbc8", "neutrophil_dysplasia", "lymphocyte_malignancy")
DEMO_REFERRAL_TARGET = 0.95
DEMO_REFERRAL_CONFIDENCE = 0.9


def _demo_training_config(image_size: int, epochs: int) -> dict:
    """Short training for the demo: the three tasks the smear predictions use, small images."""
    ops: dict = {}
    for task in DEMO_TASKS:
        ops[f"{task}_dataset"] = {"config": {"image_size": image_size}}
        ops[f"{task}_trained_model"] = {"config": {"epochs": epochs}}
        # A demo calibration split holds ~100 cells; certifying the production target (99.5% at 95%
        # confidence) needs at least 598, so the demo certifies a lower one instead of referring every cell.
        ops[f"{task}_calibration"] = {
            "config": {"target_accuracy": DEMO_REFERRAL_TARGET, "referral_confidence": DEMO_REFERRAL_CONFIDENCE}
        }
    return {"ops": ops, "loggers": {"console": {"config": {"log_level": "INFO"}}}}


def run_demo(use_pbc: bool, smears: int, cells_per_smear: int, seed: int, epochs: int = 8, image_size: int = 64) -> int:
    dagster_home = prepare_demo_environment()
    source_description = fill_inbox(use_pbc, smears, cells_per_smear, seed)
    print(f"export: {source_description} in {settings.inbox_url()}")

    import dagster as dg

    from hema_pipeline.defs.definitions import defs
    from hema_pipeline.defs.ingest import SMEAR_PARTITIONS, plan_imports

    instance = dg.DagsterInstance.get()
    resources = dict(defs.resources or {})
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    key = resources["pseudonyms"].key()
    known = set(instance.get_dynamic_partitions(SMEAR_PARTITIONS))
    plan = plan_imports(resources["inbox"].inbox(), key, known)
    instance.add_dynamic_partitions(SMEAR_PARTITIONS, plan.new_partitions)
    requests = plan.run_requests

    print("\n== 1/3 import and anonymise (one run per smear)")
    import_job = defs.resolve_job_def("import_smears")
    failed = 0
    for request in requests:
        result = import_job.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            tags={"hema/trigger": "demo"},
            run_config=quiet,
            raise_on_error=False,
        )
        failed += 0 if result.success else 1

    print("\n== 2/3 validate, build datasets, train, calibrate, register (short CPU training)")
    training_selection = dg.AssetSelection.assets("cell_table", "smear_flag_thresholds") | dg.AssetSelection.assets(
        *[f"{task}_{stage}" for task in DEMO_TASKS for stage in ("dataset", "trained_model", "calibration", "model", "champion")]
    )
    training = dg.materialize(
        cast("list[dg.AssetsDefinition]", [*(defs.assets or ()), *(defs.asset_checks or ())]),
        selection=training_selection,
        instance=instance,
        resources=resources,
        run_config=_demo_training_config(image_size, epochs),
        tags={"hema/trigger": "demo"},
        raise_on_error=False,
    )
    failed += 0 if training.success else 1

    print("\n== 3/3 predict every smear and write its report (one run, the champions loaded once)")
    partitions = instance.get_dynamic_partitions(SMEAR_PARTITIONS)
    # The range a backfill gives a prediction run (dagster's documented partition-range run tags).
    batch = {"dagster/asset_partition_range_start": partitions[0], "dagster/asset_partition_range_end": partitions[-1]}
    result = defs.resolve_job_def("predict_smears").execute_in_process(
        instance=instance, tags={"hema/trigger": "demo", **batch}, run_config=quiet, raise_on_error=False
    )
    failed += 0 if result.success else 1

    return _print_summary(dagster_home, failed)


def _print_summary(dagster_home: Path, failed: int) -> int:
    from hema_pipeline.storage.warehouse import Warehouse

    warehouse = Warehouse(settings.warehouse_path())
    totals = warehouse.query(
        "select (select count(*) from smears) as smears, (select count(*) from cells) as cells, "
        "(select count(*) from open_quarantine) as quarantined, (select count(*) from import_runs) as import_runs, "
        "(select count(*) from model_champions) as champions, "
        "(select count(*) from predictions) as predictions, (select count(*) from smear_reports) as reports"
    ).iloc[0]
    print()
    print("hema-pipeline demo")
    print(f"  smears imported : {int(totals.smears)}")
    print(f"  cells           : {int(totals.cells)}")
    print(f"  quarantined     : {int(totals.quarantined)}")
    print(f"  import runs     : {int(totals.import_runs)}")
    print(f"  champion models : {int(totals.champions)}")
    print(f"  cell predictions: {int(totals.predictions)} in {int(totals.reports)} smear reports")
    print(f"  failed runs     : {failed}")
    print(f"  warehouse       : {settings.warehouse_path()}")
    print(f"  images + parquet: {settings.lake_url()}")
    report = warehouse.query("select smear_id, markdown from smear_reports order by created_at desc limit 1")
    if not report.empty:
        print()
        print(report.markdown[0])
    print()
    print("Open the UI (runs and materialisations of this demo):")
    print(f"  DAGSTER_HOME={dagster_home} .venv/bin/dagster dev -w workspace.yaml   (or: make ui)")
    print("Query with SQL (or the duckdb CLI on the warehouse file, -readonly):")
    print('  .venv/bin/hema query "select * from differential_per_smear limit 20"')
    print('  .venv/bin/hema query "select * from referral_queue limit 20"')
    return 1 if failed else 0
