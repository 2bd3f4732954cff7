"""Cross-domain safety: a model trained on one analyser's cells, applied to another's.

    .venv/bin/python benchmarks/cross_domain.py --task pbc8 [--model VERSION] [--warehouse W] [--lake L]
        [--crops ../shared/data/bccd/wbc_crops] --out /tmp/cross_domain_pbc8.json

Runs ``hema classify`` (a new process: the interface a lab uses) with the task's champion, or the given
model version, over the BCCD white-cell crops (another microscope, stain and scale than the CellaVision
DM96 images the models learn from), then scores the CSV against the crops' folder labels:

- accuracy over every crop (not the bar: no model trained on one analyser should be trusted on another);
- coverage (accepted share), and what happened to the rest: referred as unfamiliar or as low confidence;
- **accepted and wrong**, as a share of all crops: the silent errors a lab would not see. Goal <= 1%.

A crop whose folder class is not one of the task's classes (basophils for ``wbc4``) counts as wrong
wherever it is accepted. Prints a Markdown table and writes every figure to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from hema_pipeline.settings import shared_data_dir


def score(classified: pd.DataFrame, crops: Path) -> dict:
    """Figures from ``hema classify``'s CSV; the true class is the crop's folder name, lower-cased."""
    truth = classified["file"].map(lambda file: Path(file).parent.name.lower())
    predicted = classified["predicted_class"].astype(str)
    referred = classified["referred"].astype(str).str.lower().isin(["true", "1"])
    accepted = ~referred
    correct = predicted == truth
    reasons = classified["referral_reason"].fillna("").astype(str)
    cells = len(classified)
    per_class = []
    for name, _ in classified.groupby(truth):
        mask = truth == name
        per_class.append(
            {
                "true_class": name,
                "cells": int(mask.sum()),
                "correct": int((correct & mask).sum()),
                "accepted": int((accepted & mask).sum()),
                "accepted_wrong": int((accepted & ~correct & mask).sum()),
                "predicted": {str(k): int(v) for k, v in predicted[mask].value_counts().items()},
            }
        )
    return {
        "cells": cells,
        "accuracy": float(correct.mean()) if cells else float("nan"),
        "coverage": float(accepted.mean()) if cells else float("nan"),
        "accepted": int(accepted.sum()),
        "accepted_correct": int((accepted & correct).sum()),
        "accepted_wrong": int((accepted & ~correct).sum()),
        "accepted_wrong_share": float((accepted & ~correct).mean()) if cells else float("nan"),
        "referred_unfamiliar": int((referred & reasons.str.contains("unfamiliar")).sum()),
        "referred_low_confidence": int((referred & reasons.str.contains("low_confidence")).sum()),
        "unfamiliar_share": float((referred & reasons.str.contains("unfamiliar")).mean()) if cells else float("nan"),
        "per_class": per_class,
        "crops": str(crops),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="pbc8")
    parser.add_argument("--model", default=None, help="model version (default: the task's champion)")
    parser.add_argument("--warehouse", default=None, help="DuckDB file (default: HEMA_WAREHOUSE)")
    parser.add_argument("--lake", default=None, help="lake folder or URL (default: HEMA_LAKE)")
    parser.add_argument("--crops", type=Path, default=None, help="folder of <Class>/<crop>.jpg")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    crops = args.crops or shared_data_dir() / "bccd" / "wbc_crops"
    if not crops.is_dir():
        sys.exit(f"BCCD crops not found at {crops} (set HEMA_SHARED_DATA or --crops)")
    env = dict(os.environ)
    if args.lake:
        env["HEMA_LAKE"] = args.lake
    with tempfile.TemporaryDirectory(prefix="cross-domain-") as temporary:
        output = Path(temporary) / "classified.csv"
        command = [
            str(Path(sys.executable).with_name("hema")),
            "classify",
            "-d",
            str(crops),
            "--recursive",
            "-o",
            str(output),
            "--task",
            args.task,
            "--quiet",
        ]
        if args.model:
            command += ["--model", args.model]
        if args.warehouse:
            command += ["--warehouse", args.warehouse]
        started = time.perf_counter()
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if not output.exists():
            sys.exit(f"hema classify failed ({completed.returncode}): {completed.stderr[-2000:]}")
        classified = pd.read_csv(output)
    summary = {
        "command": " ".join(sys.argv),
        "classify_exit_code": completed.returncode,
        "classify_seconds": seconds,
        "task": args.task,
        "model": args.model or "champion",
        **score(classified, crops),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(
        "| task | crops | accuracy | coverage | accepted and wrong (goal <= 1%) | referred unfamiliar | "
        "referred low confidence |\n|---|---:|---:|---:|---:|---:|---:|\n"
        f"| {args.task} | {summary['cells']} | {summary['accuracy']:.1%} | {summary['coverage']:.1%} | "
        f"{summary['accepted_wrong']} ({summary['accepted_wrong_share']:.1%}) | {summary['referred_unfamiliar']} | "
        f"{summary['referred_low_confidence']} |"
    )
    for row in summary["per_class"]:
        print(
            f"  {row['true_class']}: {row['cells']} crops, {row['correct']} right, {row['accepted']} accepted "
            f"({row['accepted_wrong']} wrongly); called {row['predicted']}"
        )


if __name__ == "__main__":
    main()
