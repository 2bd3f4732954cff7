"""CPU inference throughput (cells/s) of ``hema classify`` and of the ``smear_predictions`` asset beside a
seed-style loop (PIL load + ``model.predict`` one image at a time) over the same images, in one run; and
the time from a new smear in the inbox to its predictions in DuckDB.

    .venv/bin/python benchmarks/inference_throughput.py [--smears 12] [--cells-per-smear 100] \
        [--epochs 8] [--image-size 64] [--test-time-views 8] [--ensemble-members 1] [--latency-cells 200] \
        [--out /tmp/inference.json] [--keep]

Setup (not timed into any figure): a temporary HEMA_HOME with a synthetic export (fake patients), imported
and trained through Dagster as ``hema_pipeline/demo.py`` does (the three prediction tasks, short CPU
training; ``--ensemble-members`` n makes the pbc8 champion an ensemble of n networks). Then, with the
registered ``pbc8`` champion and every imported cell image (copied from the
content-addressed store into one folder):

1. ``hema classify`` three ways: a fresh process (Python start, TensorFlow import, model load, all
   included); ``hema_pipeline.cli.main(["classify", ...])`` in this process (model load and tracing
   included, TensorFlow already imported); ``classify_files`` with an already built ``CellClassifier``
   (no start-up at all).
2. The ``predict_smears`` job, ``execute_in_process`` once per smear partition: every cell through the
   pbc8 champion, neutrophils/lymphocytes through the specialists, Grad-CAMs for referred cells, DuckDB
   writes and the report. Cells/s = all cells / all runs' wall time; per run, the step's own time
   (Dagster event log) and the rest (run start/finish, event log, resources) are shown apart.
3. The seed-style loop over the same files: ``PIL.Image.open(f).convert("RGB").resize((s, s))`` -> float32
   in the model's pixel range -> ``model.predict(x[None], verbose=0)``, one image at a time.
4. One new smear (``--latency-cells``, new seed, so a new accession) arriving in the inbox: sensor
   evaluation -> add partition -> ``import_smears`` run -> ``predict_smears`` run -> rows in ``predictions``.
   The daemon's own latency (sensor interval 30 s, run launch in a subprocess) is not included.

Everything is written under a temporary folder, deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_pbc import cpu_model  # noqa: E402  (benchmarks/ is not a package)

REPO = Path(__file__).resolve().parents[1]
# Paths that would send the benchmark to a real home instead of its temporary one.
_LOCATION_VARIABLES = (
    "HEMA_INBOX",
    "HEMA_LAKE",
    "HEMA_QUARANTINE",
    "HEMA_WAREHOUSE",
    "HEMA_PSEUDONYM_KEY_FILE",
    "HEMA_S3_ENDPOINT_URL",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> str:
    try:
        return "/".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def prepare_environment(home: Path) -> Path:
    """HEMA_HOME/DAGSTER_HOME/HEMA_DEMO set before anything reads the settings (hema_pipeline.defs does
    at import)."""
    for name in _LOCATION_VARIABLES:
        os.environ.pop(name, None)
    os.environ["HEMA_HOME"] = str(home)
    os.environ["HEMA_DEMO"] = "1"
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    shutil.copyfile(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    return dagster_home


QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


# ---------------------------------------------------------------------------------------------------
# Setup: import and train as the demo does


def import_and_train(args: argparse.Namespace) -> dict:
    import dagster as dg

    from hema_pipeline.defs.definitions import defs
    from hema_pipeline.defs.ingest import plan_imports, smear_partitions
    from hema_pipeline.demo import DEMO_TASKS, _demo_training_config, fill_inbox

    timings = {}
    started = time.perf_counter()
    description = fill_inbox(False, args.smears, args.cells_per_smear, args.seed)
    timings["generate_s"] = time.perf_counter() - started
    log(f"export: {description}")

    instance = dg.DagsterInstance.get()
    resources = defs.resources
    key = resources["pseudonyms"].key()
    known = set(instance.get_dynamic_partitions(smear_partitions.name))
    plan = plan_imports(resources["inbox"].inbox(), key, known)
    instance.add_dynamic_partitions(smear_partitions.name, plan.new_partitions)
    requests = plan.run_requests

    started = time.perf_counter()
    import_job = defs.resolve_job_def("import_smears")
    for request in requests:
        result = import_job.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            tags={"hema/trigger": "benchmark"},
            run_config=QUIET,
            raise_on_error=False,
        )
        if not result.success:
            raise SystemExit(f"import of {request.partition_key} failed")
    timings["import_s"] = time.perf_counter() - started
    log(
        f"imported {len(requests)} smears in {timings['import_s']:.1f} s; training {', '.join(DEMO_TASKS)} "
        f"({args.epochs} epochs, {args.image_size} px)"
    )

    started = time.perf_counter()
    selection = dg.AssetSelection.assets("cell_table", "smear_flag_thresholds") | dg.AssetSelection.assets(
        *[f"{task}_{stage}" for task in DEMO_TASKS for stage in ("dataset", "trained_model", "calibration", "model", "champion")]
    )
    config = _demo_training_config(args.image_size, args.epochs)
    config["loggers"] = QUIET["loggers"]
    if args.ensemble_members is not None:
        config["ops"]["pbc8_trained_model"]["config"]["ensemble_members"] = args.ensemble_members
    if args.test_time_views is not None:  # the views each champion is calibrated, and so used, with
        for task in DEMO_TASKS:
            config["ops"][f"{task}_calibration"]["config"]["test_time_views"] = args.test_time_views
    training = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=selection,
        instance=instance,
        resources=resources,
        run_config=config,
        tags={"hema/trigger": "benchmark"},
        raise_on_error=False,
    )
    timings["train_s"] = time.perf_counter() - started
    log(f"training run {'succeeded' if training.success else 'FAILED'} in {timings['train_s']:.0f} s")
    return timings


# ---------------------------------------------------------------------------------------------------
# Measurements


def copy_cell_images(warehouse, lake, folder: Path, limit: int) -> list[Path]:
    cells = warehouse.query("select cell_uid, image_key from cells order by smear_id, cell_id")
    if limit:
        cells = cells.head(limit)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for cell_uid, image_key in zip(cells["cell_uid"], cells["image_key"], strict=True):
        path = folder / f"{cell_uid}.jpg"
        path.write_bytes(lake.get_bytes(str(image_key)))
        paths.append(path)
    return paths


def seed_style_loop(paths: list[Path], model, size: int, pixel_range: float) -> tuple[float, list[int]]:
    """The seeds' way: one image at a time, PIL load and resize, ``model.predict`` per image."""
    import numpy as np
    from PIL import Image

    scale = np.float32(pixel_range / 255.0)

    def one(path: Path) -> int:
        with Image.open(path) as image:
            x = np.asarray(image.convert("RGB").resize((size, size)), np.float32) * scale
        return int(np.argmax(model.predict(x[None], verbose=0)[0]))

    one(paths[0])  # Keras builds its predict function on the first call: not counted
    started = time.perf_counter()
    predicted = [one(path) for path in paths]
    return time.perf_counter() - started, predicted


def classify_cold_process(image_dir: Path, csv: Path) -> float:
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "hema_pipeline.cli", "classify", "-d", str(image_dir), "-o", str(csv), "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"hema classify (subprocess) failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return elapsed


def step_seconds(instance, run_id: str, step_key: str) -> float | None:
    """The step's own wall time from the run's event log (STEP_START -> STEP_SUCCESS)."""
    start = end = None
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or event.step_key != step_key:
            continue
        if event.event_type_value == "STEP_START":
            start = entry.timestamp
        elif event.event_type_value == "STEP_SUCCESS":
            end = entry.timestamp
    return None if start is None or end is None else end - start


def run_predict_job(defs, instance, partition: str) -> tuple[float, float | None, str]:
    job = defs.resolve_job_def("predict_smears")
    started = time.perf_counter()
    result = job.execute_in_process(
        instance=instance, partition_key=partition, tags={"hema/trigger": "benchmark"}, run_config=QUIET, raise_on_error=False
    )
    wall = time.perf_counter() - started
    if not result.success:
        raise SystemExit(f"predict_smears failed for {partition}")
    return wall, step_seconds(instance, result.run_id, "smear_predictions"), result.run_id


def inbox_to_duckdb(args, home: Path, defs, instance, warehouse) -> dict:
    import dagster as dg

    from hema_pipeline import settings
    from hema_pipeline.defs.ingest import inbox_sensor, smear_partitions
    from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export

    sensor_resources = {name: defs.resources[name] for name in ("inbox", "pseudonyms", "warehouse")}
    # The sensor as it stands after having seen the existing inbox (its stored cursor).
    baseline = inbox_sensor(dg.build_sensor_context(instance=instance, resources=sensor_resources))
    known = set(instance.get_dynamic_partitions(smear_partitions.name))

    arrivals = generate_export(
        home / "arrivals",
        SyntheticExportSpec(
            smears=1,
            cells_per_smear=args.latency_cells,
            seed=args.seed + 1009,
            dysplastic_smear_share=1.0,
            malignant_smear_share=0.0,
            verified_share=0.9,
        ),
    )
    future = time.time() + 2  # strictly newer than anything the cursor has seen
    folder = arrivals.smears[0].folder
    for path in [folder, *folder.iterdir()]:
        os.utime(path, (future, future))
    arrived = folder.rename(Path(settings.inbox_url()) / folder.name)  # the smear "arrives"

    steps: dict[str, float] = {}
    started = time.perf_counter()
    context = dg.build_sensor_context(instance=instance, cursor=baseline.cursor, resources=sensor_resources)
    result = inbox_sensor(context)
    steps["sensor evaluation"] = time.perf_counter() - started
    if len(result.run_requests) != 1:
        raise SystemExit(f"sensor requested {len(result.run_requests)} runs for one new smear ({arrived.name})")
    request = result.run_requests[0]
    if request.partition_key in known:
        raise SystemExit("the new smear pseudonymises to an existing partition; pick another --seed")

    mark = time.perf_counter()
    for partition_request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(partition_request.partitions_def_name, list(partition_request.partition_keys))
    steps["add partition"] = time.perf_counter() - mark

    mark = time.perf_counter()
    imported = defs.resolve_job_def("import_smears").execute_in_process(
        instance=instance, partition_key=request.partition_key, tags=dict(request.tags), run_config=QUIET, raise_on_error=False
    )
    steps["import_smears run"] = time.perf_counter() - mark
    if not imported.success:
        raise SystemExit("import of the new smear failed")

    mark = time.perf_counter()
    wall, step, _ = run_predict_job(defs, instance, request.partition_key)
    steps["predict_smears run"] = time.perf_counter() - mark

    mark = time.perf_counter()
    rows = warehouse.query(
        "select count(distinct cell_uid) as cells, count(*) as rows from predictions where smear_id = ?", [request.partition_key]
    ).iloc[0]
    steps["query predictions"] = time.perf_counter() - mark
    total = time.perf_counter() - started
    imported_cells = int(warehouse.query("select count(*) as n from cells where smear_id = ?", [request.partition_key]).n[0])
    if int(rows.cells) != imported_cells or imported_cells == 0:
        raise SystemExit(f"predictions for {int(rows.cells)} of {imported_cells} cells of the new smear")
    return {
        "steps": steps,
        "total_s": total,
        "cells": imported_cells,
        "prediction_rows": int(rows.rows),
        "predict_step_s": step,
        "predict_wall_s": wall,
    }


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smears", type=int, default=12)
    parser.add_argument("--cells-per-smear", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--test-time-views", type=int, default=None, help="views per cell of every champion (CalibrationConfig default)"
    )
    parser.add_argument(
        "--ensemble-members", type=int, default=None, help="networks in the pbc8 champion (TrainingRunConfig default)"
    )
    parser.add_argument("--images", type=int, default=0, help="cap on images for classify / seed loop (0: every imported cell)")
    parser.add_argument("--latency-cells", type=int, default=200)
    parser.add_argument("--out", help="also write every figure to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary HEMA_HOME")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="hema-inference-bench-"))
    figures: dict = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}}
    figures["arguments"] = {name: value for name, value in vars(args).items() if name != "out"}
    figures["load_average_start"] = load_average()
    try:
        prepare_environment(home)
        log(f"HEMA_HOME={home}; load average {figures['load_average_start']}")
        figures["setup"] = import_and_train(args)

        import dagster as dg
        import pandas as pd
        import tensorflow as tf

        from hema_pipeline import settings
        from hema_pipeline.cli import main as hema_main
        from hema_pipeline.defs.definitions import defs
        from hema_pipeline.inference.champions import champion_classifiers
        from hema_pipeline.inference.classify import classify_files
        from hema_pipeline.inference.predict import CellClassifier
        from hema_pipeline.modeling.promotion import current_champion, load_champion
        from hema_pipeline.storage.object_store import open_object_store
        from hema_pipeline.storage.warehouse import Warehouse

        figures["machine"]["tensorflow"] = tf.__version__
        instance = dg.DagsterInstance.get()
        lake = open_object_store(settings.lake_url())
        warehouse = Warehouse(settings.warehouse_path())
        champions = {
            task: current_champion(warehouse, task) for task in ("pbc8", "neutrophil_dysplasia", "lymphocyte_malignancy")
        }
        figures["champions"] = champions
        if champions["pbc8"] is None:
            raise SystemExit("no pbc8 champion after training")
        log(f"champions: {champions}")

        image_dir = home / "cells"
        paths = copy_cell_images(warehouse, lake, image_dir, args.images)
        n = len(paths)
        figures["images"] = n
        log(f"{n} cell images copied to {image_dir}")

        # Model load alone (what every classify start and every prediction run pays).
        mark = time.perf_counter()
        loaded = load_champion(lake, warehouse, "pbc8")
        classifier = CellClassifier(loaded.model, loaded.card.contract())
        figures["pbc8_load_s"] = time.perf_counter() - mark
        size, pixel_range = loaded.card.input_size, classifier.pixel_range
        figures["input_size"], figures["pixel_range"] = size, pixel_range

        # 3. Seed-style loop.
        log("seed-style loop (PIL + model.predict per image)")
        figures["load_average_seed"] = load_average()
        seed_s, seed_predicted = seed_style_loop(paths, loaded.model, size, pixel_range)
        figures["seed_loop_s"] = seed_s

        # 1. hema classify.
        log("hema classify: fresh process")
        figures["load_average_classify"] = load_average()
        figures["classify_process_s"] = classify_cold_process(image_dir, home / "classify_process.csv")
        log("hema classify: cli.main in this process")
        csv = home / "classify.csv"
        mark = time.perf_counter()
        code = hema_main(["classify", "-d", str(image_dir), "-o", str(csv), "-q"])
        figures["classify_main_s"] = time.perf_counter() - mark
        if code != 0:
            raise SystemExit(f"hema classify exited {code}")
        table = pd.read_csv(csv)
        if len(table) != n:
            raise SystemExit(f"hema classify wrote {len(table)} rows for {n} images")
        classify_files(paths[:8], classifier, home / "warm.csv", progress=False)  # trace the forward pass once
        mark = time.perf_counter()
        classify_files(paths, classifier, home / "classify_warm.csv", progress=False)
        figures["classify_warm_s"] = time.perf_counter() - mark
        # Same images, same model: how often the two preprocessings (PIL resize vs area resize) agree.
        by_file = dict(zip(table["file"].map(lambda f: Path(f).name), table["predicted_class"], strict=True))
        names = list(loaded.card.class_names)
        agree = sum(by_file[path.name] == names[index] for path, index in zip(paths, seed_predicted, strict=True))
        figures["top1_agreement_seed_vs_classify"] = agree / n

        # 2. The prediction asset, one run per smear.
        log("predict_smears, one run per smear")
        figures["load_average_asset"] = load_average()
        partitions = sorted(instance.get_dynamic_partitions("smears"))
        cells_per_smear = warehouse.query("select smear_id, count(*) as n from cells group by smear_id")
        cells_by_smear = dict(zip(cells_per_smear.smear_id, cells_per_smear.n, strict=True))
        runs = []
        for partition in partitions:
            wall, step, _ = run_predict_job(defs, instance, partition)
            runs.append({"smear": partition, "cells": int(cells_by_smear.get(partition, 0)), "wall_s": wall, "step_s": step})
        figures["asset_runs"] = runs
        mark = time.perf_counter()
        champion_classifiers(lake, warehouse, ("pbc8", "neutrophil_dysplasia", "lymphocyte_malignancy"))
        figures["asset_model_load_s"] = time.perf_counter() - mark
        predicted_rows = warehouse.query("select count(distinct cell_uid) as cells, count(*) as rows from predictions").iloc[0]
        figures["asset_prediction_rows"] = int(predicted_rows.rows)
        figures["asset_cells_predicted"] = int(predicted_rows.cells)

        # 4. Inbox -> DuckDB for one new smear.
        log(f"inbox -> DuckDB latency for one new {args.latency_cells}-cell smear")
        figures["load_average_latency"] = load_average()
        figures["latency"] = inbox_to_duckdb(args, home, defs, instance, warehouse)
        figures["load_average_end"] = load_average()
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            log(f"kept {home}")

    print_report(figures)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2, default=str))
    return 0


def print_report(f: dict) -> None:
    n = f["images"]
    seed_rate = n / f["seed_loop_s"]
    runs = f["asset_runs"]
    asset_cells = sum(run["cells"] for run in runs)
    asset_wall = sum(run["wall_s"] for run in runs)
    asset_rate = asset_cells / asset_wall
    steps = [run["step_s"] for run in runs if run["step_s"] is not None]
    machine = f["machine"]
    print()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, TensorFlow {machine.get('tensorflow')}"
    )
    print(
        f"load average (1/5/15 min) at start {f['load_average_start']}, seed loop {f['load_average_seed']}, "
        f"classify {f['load_average_classify']}, asset {f['load_average_asset']}, latency {f['load_average_latency']}, "
        f"end {f['load_average_end']}"
    )
    print(
        f"setup: generate {f['setup']['generate_s']:.0f} s, import {f['setup']['import_s']:.0f} s, "
        f"train {f['setup']['train_s']:.0f} s; champions {f['champions']}"
    )
    print(
        f"model input {f['input_size']} px, pixel range [0, {f['pixel_range']:g}]; "
        f"pbc8 champion load + wrap {f['pbc8_load_s']:.2f} s; three champions (one prediction run's load) {f['asset_model_load_s']:.2f} s"
    )
    print()
    print("| what | images | seconds | cells/s | vs seed loop (goal ≥ 5×) |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| seed-style loop: PIL load + resize, `model.predict` per image (warm model) | {n} | {f['seed_loop_s']:.1f} | {seed_rate:.0f} | 1.0× |"
    )
    for label, key in (
        ("`hema classify`, new process (Python + TF import + model load included)", "classify_process_s"),
        ("`hema classify`, `cli.main` in process (model load + trace included)", "classify_main_s"),
        ("`hema classify` core, `classify_files` with loaded model (no start-up)", "classify_warm_s"),
    ):
        rate = n / f[key]
        print(f"| {label} | {n} | {f[key]:.1f} | {rate:.0f} | **{rate / seed_rate:.1f}×** |")
    print(
        f"| `predict_smears` asset, {len(runs)} runs (one per smear; routing, Grad-CAM, DuckDB, report) | {asset_cells} | "
        f"{asset_wall:.1f} | {asset_rate:.0f} | **{asset_rate / seed_rate:.1f}×** |"
    )
    if steps and len(steps) == len(runs):
        step_rate = asset_cells / sum(steps)
        print(
            f"| `predict_smears`, the step's own time only (event log) | {asset_cells} | {sum(steps):.1f} | {step_rate:.0f} | "
            f"{step_rate / seed_rate:.1f}× |"
        )
    print()
    print(
        f"Top-1 agreement seed loop vs `hema classify` on the same images: {f['top1_agreement_seed_vs_classify']:.1%} "
        f"(PIL bicubic resize vs area resize). Asset wrote {f['asset_prediction_rows']} prediction rows for "
        f"{f['asset_cells_predicted']} cells."
    )
    print()
    print("| predict_smears run | cells | wall s | step s | run overhead s |")
    print("|---|---:|---:|---:|---:|")
    for index, run in enumerate(runs, 1):
        step = run["step_s"]
        step_text = f"{step:.2f}" if step is not None else "n/a"
        overhead = f"{run['wall_s'] - step:.2f}" if step is not None else "n/a"
        print(f"| {index} | {run['cells']} | {run['wall_s']:.2f} | {step_text} | {overhead} |")
    if steps and len(steps) == len(runs):
        later = runs[1:] or runs
        mean_wall = sum(run["wall_s"] for run in later) / len(later)
        mean_step = sum(run["step_s"] for run in later) / len(later)
        print(
            f"| mean of runs 2–{len(runs)} | {sum(run['cells'] for run in later) / len(later):.0f} | {mean_wall:.2f} | "
            f"{mean_step:.2f} | {mean_wall - mean_step:.2f} |"
        )
    latency = f["latency"]
    print()
    print(f"Inbox -> DuckDB, one new smear ({latency['cells']} cells, {latency['prediction_rows']} prediction rows):")
    print()
    print("| step | seconds |")
    print("|---|---:|")
    for name, seconds in latency["steps"].items():
        print(f"| {name} | {seconds:.2f} |")
    if latency.get("predict_step_s") is not None:
        print(f"| (of which the prediction step itself) | ({latency['predict_step_s']:.2f}) |")
    print(f"| **total** | **{latency['total_s']:.2f}** |")


if __name__ == "__main__":
    raise SystemExit(main())
