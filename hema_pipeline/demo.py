"""The README's main command: generate (or adapt) an export, run the pipeline through Dagster on the
embedded default, and print what it made and where."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
        SyntheticExportSpec(smears=smears, cells_per_smear=cells_per_smear, seed=seed, dysplastic_smear_share=0.25, malignant_smear_share=0.25, verified_share=0.9),
    )
    return f"{len(export.smears)} synthetic smears (fake patients)"


def run_demo(use_pbc: bool, smears: int, cells_per_smear: int, seed: int) -> int:
    dagster_home = prepare_demo_environment()
    source_description = fill_inbox(use_pbc, smears, cells_per_smear, seed)
    print(f"export: {source_description} in {settings.inbox_url()}")

    import dagster as dg

    from hema_pipeline.defs.definitions import defs
    from hema_pipeline.defs.ingest import plan_imports, smear_partitions

    instance = dg.DagsterInstance.get()
    resources = defs.resources
    key = resources["pseudonyms"].key()
    known = set(instance.get_dynamic_partitions(smear_partitions.name))
    new_partitions, requests, _ = plan_imports(resources["inbox"].inbox(), key, known)
    instance.add_dynamic_partitions(smear_partitions.name, new_partitions)
    import_job = defs.resolve_job_def("import_smears")
    failed = 0
    for request in requests:
        result = import_job.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            tags={"hema/trigger": "demo"},
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
            raise_on_error=False,
        )
        failed += 0 if result.success else 1

    from hema_pipeline.storage.warehouse import Warehouse

    warehouse = Warehouse(settings.warehouse_path())
    totals = warehouse.query(
        "select (select count(*) from smears) as smears, (select count(*) from cells) as cells, "
        "(select count(*) from open_quarantine) as quarantined, (select count(*) from import_runs) as import_runs"
    ).iloc[0]
    print()
    print("hema-pipeline demo")
    print(f"  smears imported : {int(totals.smears)}")
    print(f"  cells           : {int(totals.cells)}")
    print(f"  quarantined     : {int(totals.quarantined)}")
    print(f"  import runs     : {int(totals.import_runs)} ({failed} failed)")
    print(f"  warehouse       : {settings.warehouse_path()}")
    print(f"  images + parquet: {settings.lake_url()}")
    print()
    print("Open the UI (runs and materialisations of this demo):")
    print(f"  DAGSTER_HOME={dagster_home} .venv/bin/dagster dev -w workspace.yaml   (or: make ui)")
    print("Query with SQL:")
    print('  .venv/bin/hema query "select verified_class, count(*) from cells group by 1 order by 2 desc"')
    return 1 if failed else 0
