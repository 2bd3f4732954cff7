"""A killed run never blocks the queue: with dagster.yaml's run monitoring and run retries, the real daemon
(`dagster dev`, as in test_ui) frees the `duckdb_writer` slot of an import run that was SIGKILLed mid-step,
the next smear is imported on its own, the killed smear is imported by the automatic retry, and the
warehouse holds each cell once.

Two ways a run dies: its run worker and step process are killed while the code server lives on (the code
server marks the run FAILURE, the monitoring daemon frees its slot), and the whole of `dagster dev` is
killed mid-run and started again (nothing is left to notice: the run stays STARTED until the monitoring
daemon fails it at max_runtime_seconds). The daemon's clocks are wound down in the test's copy of
dagster.yaml so that each test takes a minute or two; the project's own values are checked as they are."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline_tests.support import TEST_KEY
from hema_pipeline_tests.test_ui import REPO, DagsterServer, _wait_until, dagster_dev_environment, running_dagster_dev

POOL = "duckdb_writer"
# Enough cells that the import step is still reading images when the kill lands (several seconds on
# 2 cores), few enough to generate in a few seconds.
KILLED_SMEAR_CELLS = 600
NEXT_SMEAR_CELLS = 12
# The test's clocks: the monitoring daemon ticks every 2 s and frees a dead run's slot 5 s after it ended.
TEST_MONITORING = {"poll_interval_seconds": 2, "free_slots_after_run_end_seconds": 5}
# A run that nothing watches any more is failed this long after it started (the restart test only).
TEST_MAX_RUNTIME_S = 60
STEP_START_TIMEOUT_S = 180
RECOVERY_TIMEOUT_S = 90
IMPORT_TIMEOUT_S = 150
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")


def _project_config() -> dict:
    return yaml.safe_load((REPO / "dagster.yaml").read_text())


def _write_test_config(dagster_home: Path, **monitoring: int) -> None:
    """The project's dagster.yaml with only the daemon's clocks changed."""
    config = _project_config()
    config["run_monitoring"].update(TEST_MONITORING, **monitoring)
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def test_project_instance_frees_slots_of_dead_runs_and_retries_them(tmp_path: Path) -> None:
    """The settings the recovery depends on, read by Dagster itself from the project's dagster.yaml."""
    import dagster as dg

    shutil.copyfile(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        settings = instance.run_monitoring_settings
        assert instance.run_monitoring_enabled
        # Without this nothing frees a slot whose step died with its run.
        assert 0 < settings["free_slots_after_run_end_seconds"] <= 300
        assert 0 < instance.run_monitoring_poll_interval_seconds <= 60
        # The only end for a run left STARTED with no process (DefaultRunLauncher has no health check).
        assert not instance.run_launcher.supports_check_run_worker_health
        assert instance.run_monitoring_max_runtime_seconds > 0
        assert instance.run_monitoring_max_resume_run_attempts == 0
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
        assert not instance.run_retries_retry_on_asset_or_op_failure


# What a test process does to its stop signals, then whether a process it starts obeys SIGTERM.
_STOP_A_CHILD = """
import signal, subprocess, sys
if sys.argv[1] == "restored":
    from hema_pipeline_tests.conftest import restore_stop_signals
    restore_stop_signals()
from dagster._utils.interrupts import setup_interrupt_handlers
setup_interrupt_handlers()  # as Dagster does whenever it runs something
child = subprocess.Popen(["sleep", "60"])
child.send_signal(signal.SIGTERM)
try:
    child.wait(timeout=5)
    print("stopped")
except subprocess.TimeoutExpired:
    child.kill()
    print("ignored SIGTERM")
"""


@pytest.mark.parametrize(("signals", "child"), [("as started", "ignored SIGTERM"), ("restored", "stopped")])
def test_a_test_run_started_in_the_background_can_stop_what_it_starts(signals: str, child: str) -> None:
    """`cmd &` in a non-interactive shell starts cmd with SIGINT ignored; Dagster then makes SIGTERM ignored
    too, and every pool worker or server started afterwards inherits it ("as started": the failure
    conftest.restore_stop_signals exists for, which hung a pool's terminate() in CI)."""
    result = subprocess.run(
        [sys.executable, "-c", _STOP_A_CHILD, signals],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `cmd &` starts cmd
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == child


@dataclass
class Scene:
    server: DagsterServer
    killed_smear: str
    next_smear: str


def _drop_smear(home: Path, inbox: Path, seed: int, cells: int) -> str:
    """Write a one-smear export next to the inbox and move its folder in (a rename: never seen half-written)."""
    staging = home / f"staging-{seed}"
    export = generate_export(staging, SyntheticExportSpec(smears=1, cells_per_smear=cells, seed=seed))
    [smear] = export.smears
    inbox.mkdir(parents=True, exist_ok=True)
    os.replace(smear.folder, inbox / smear.folder.name)
    return TEST_KEY.smear_id(smear.folder.name)


def _runs_of(instance, smear_id: str) -> list:
    import dagster as dg

    return list(instance.get_runs(filters=dg.RunsFilter(job_name="import_smears", tags={"dagster/partition": smear_id})))


def _event_pid(instance, run_id: str, event_type) -> int | None:
    for entry in instance.all_logs(run_id, of_type=event_type):
        if entry.dagster_event is not None and entry.dagster_event.pid:
            return entry.dagster_event.pid
    return None


def _wait_for_step_in_progress(instance, server: DagsterServer, smear_id: str):
    """The smear's import run once its step has started (it holds the pool slot): (run, worker pid, step pid)."""
    import dagster as dg

    def step_started():
        for run in _runs_of(instance, smear_id):
            if run.status.value in FINISHED:
                raise AssertionError(f"run {run.run_id} ended {run.status.value} before it could be killed")
            worker = _event_pid(instance, run.run_id, dg.DagsterEventType.RUN_START)
            step = _event_pid(instance, run.run_id, dg.DagsterEventType.STEP_START)
            if run.status == dg.DagsterRunStatus.STARTED and worker and step:
                return run, worker, step
        return None

    return _wait_until(step_started, STEP_START_TIMEOUT_S, f"the import of {smear_id} to start its step", server, interval_s=0.1)


def _command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _sigkill_run_processes(server: DagsterServer, worker: int, step: int) -> None:
    """SIGKILL the run worker, then its step process: what `kill -9` (or the OOM killer) does to a run.
    Only processes of this test's `dagster dev` that Dagster started with multiprocessing's spawn."""
    assert server.process is not None
    for pid in (worker, step):
        assert os.getpgid(pid) == server.process.pid, f"pid {pid} is not one of this test's dagster dev processes"
        assert "multiprocessing.spawn" in _command_line(pid), f"pid {pid} is not a run process: {_command_line(pid)}"
    # Worker first: killed second, it could still see its step die and end the run cleanly.
    os.kill(worker, signal.SIGKILL)
    os.kill(step, signal.SIGKILL)


def _slot_holders(instance) -> set[str]:
    return set(instance.event_log_storage.get_concurrency_info(POOL).active_run_ids)


def _assert_killed_run_did_not_finish_its_step(instance, run_id: str) -> None:
    import dagster as dg

    finished = instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE})
    assert not finished, (
        f"the step of run {run_id} ended ({finished[0].dagster_event_type}) before the kill landed: "
        "the test proved nothing; raise KILLED_SMEAR_CELLS"
    )


def _wait_for_recovery(instance, scene: Scene, killed_run_id: str) -> dict[str, float]:
    """After the kill: the next smear's import succeeds on its own, the killed smear's retry too; and each
    cell is in the warehouse once. Returns the seconds each milestone took from the call."""
    import dagster as dg

    server = scene.server
    started = time.monotonic()
    timings: dict[str, float] = {}

    def killed_run_failed():
        run = instance.get_run_by_id(killed_run_id)
        return run if run.status.value in FINISHED else None

    killed = _wait_until(killed_run_failed, RECOVERY_TIMEOUT_S, f"the killed run {killed_run_id} to be ended", server, 0.5)
    timings["killed run ended"] = time.monotonic() - started
    assert killed.status == dg.DagsterRunStatus.FAILURE, f"the killed run ended {killed.status.value}, not FAILURE"
    _wait_until(
        lambda: killed_run_id not in _slot_holders(instance),
        RECOVERY_TIMEOUT_S,
        f"the monitoring daemon to free the {POOL} slot of the killed run",
        server,
        0.5,
    )
    timings["slot freed"] = time.monotonic() - started

    def succeeded(smear_id: str, retry_of: str | None = None):
        def check():
            runs = [run for run in _runs_of(instance, smear_id) if retry_of is None or run.parent_run_id == retry_of]
            bad = [run for run in runs if run.status.value in ("FAILURE", "CANCELED") and run.run_id != killed_run_id]
            if bad:
                raise AssertionError(
                    f"import of {smear_id} ended {bad[0].status.value} (run {bad[0].run_id})\n{server.log_tail()}"
                )
            return next((run for run in runs if run.status == dg.DagsterRunStatus.SUCCESS), None)

        return check

    _wait_until(succeeded(scene.next_smear), IMPORT_TIMEOUT_S, f"the next smear {scene.next_smear} to be imported", server)
    timings["next smear imported"] = time.monotonic() - started
    retry = _wait_until(
        succeeded(scene.killed_smear, retry_of=killed_run_id),
        IMPORT_TIMEOUT_S,
        f"the automatic retry of {killed_run_id} to import {scene.killed_smear}",
        server,
    )
    timings["killed smear imported by its retry"] = time.monotonic() - started
    assert retry.tags.get("dagster/retry_number") == "1"
    assert not _slot_holders(instance) - {run.run_id for run in instance.get_runs() if not run.is_finished}

    warehouse = Warehouse(server.warehouse)
    duplicates = warehouse.query("select cell_uid, count(*) as n from cells group by 1 having count(*) > 1")
    assert duplicates.empty, f"duplicate cells after the kill and the retry:\n{duplicates}"
    counts = warehouse.query("select smear_id, count(*) as n from cells group by smear_id")
    assert dict(zip(counts["smear_id"], counts["n"], strict=True)) == {
        scene.killed_smear: KILLED_SMEAR_CELLS,
        scene.next_smear: NEXT_SMEAR_CELLS,
    }
    [smears] = warehouse.query(
        "select count(*) as n from smears where smear_id in (?, ?)", [scene.killed_smear, scene.next_smear]
    )["n"]
    assert smears == 2
    return timings


def _report(name: str, timings: dict[str, float]) -> None:
    print(f"\n{name}: " + "; ".join(f"{what} after {seconds:.1f} s" for what, seconds in timings.items()))


@pytest.mark.end_to_end
def test_killed_import_run_frees_the_writer_slot_and_is_retried(tmp_path: Path) -> None:
    import dagster as dg

    home, dagster_home = tmp_path / "hema", tmp_path / "hema" / "dagster_home"
    _write_test_config(dagster_home)
    inbox = home / "inbox"
    killed_smear = _drop_smear(home, inbox, seed=301, cells=KILLED_SMEAR_CELLS)
    environment = dagster_dev_environment(home, dagster_home, HEMA_INBOX_SENSOR_INTERVAL_SECONDS="2")
    with (
        running_dagster_dev(home, dagster_home, environment, log_name="dagster-dev-run-recovery.log") as server,
        dg.DagsterInstance.from_config(str(dagster_home)) as instance,
    ):
        run, worker, step = _wait_for_step_in_progress(instance, server, killed_smear)
        assert run.run_id in _slot_holders(instance)
        _sigkill_run_processes(server, worker, step)
        next_smear = _drop_smear(home, inbox, seed=302, cells=NEXT_SMEAR_CELLS)
        timings = _wait_for_recovery(instance, Scene(server, killed_smear, next_smear), run.run_id)
        _assert_killed_run_did_not_finish_its_step(instance, run.run_id)
        marked_by = [entry.message for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)]
        assert any("SIGKILL" in (message or "") for message in marked_by), marked_by
        _report("killed run worker", timings)
        _record_inbox_mentions(home, inbox, instance, run.run_id, server)


@pytest.mark.end_to_end
def test_run_left_started_by_a_crash_is_failed_by_monitoring(tmp_path: Path) -> None:
    """The whole of `dagster dev` dies mid-import (a host crash, `kill -9` of the service): nothing marks the
    run, it is STARTED holding the slot after the restart, and only the monitoring daemon's max runtime
    (the import job's HEMA_IMPORT_MAX_RUNTIME_SECONDS) ends it."""
    import dagster as dg

    home, dagster_home = tmp_path / "hema", tmp_path / "hema" / "dagster_home"
    _write_test_config(dagster_home, max_runtime_seconds=TEST_MAX_RUNTIME_S)
    inbox = home / "inbox"
    killed_smear = _drop_smear(home, inbox, seed=311, cells=KILLED_SMEAR_CELLS)
    # The import job's own limit (its dagster/max_runtime tag) takes precedence over the instance's.
    environment = dagster_dev_environment(
        home,
        dagster_home,
        HEMA_INBOX_SENSOR_INTERVAL_SECONDS="2",
        HEMA_IMPORT_MAX_RUNTIME_SECONDS=str(TEST_MAX_RUNTIME_S),
    )
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        with running_dagster_dev(home, dagster_home, environment, log_name="dagster-dev-crash.log") as server:
            run, _, _ = _wait_for_step_in_progress(instance, server, killed_smear)
            assert server.process is not None
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=30)
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        assert run.run_id in _slot_holders(instance)
        next_smear = _drop_smear(home, inbox, seed=312, cells=NEXT_SMEAR_CELLS)
        with running_dagster_dev(home, dagster_home, environment, log_name="dagster-dev-after-crash.log") as server:
            timings = _wait_for_recovery(instance, Scene(server, killed_smear, next_smear), run.run_id)
            _assert_killed_run_did_not_finish_its_step(instance, run.run_id)
            messages = [entry.message or "" for entry in instance.all_logs(run.run_id)]
            assert any("maximum runtime" in message for message in messages), messages
            _report("dagster dev killed and restarted", timings)
            _record_inbox_mentions(home, inbox, instance, run.run_id, server)


def _record_inbox_mentions(home: Path, inbox: Path, instance, run_id: str, server: DagsterServer) -> None:
    """Print (not assert) whether the killed run's event log or the daemon's log names an inbox path or a
    smear folder (accession number): for the review, not a property this test owns."""
    folders = [path.name for path in inbox.iterdir()]
    needles = [str(inbox), *folders]
    events = "\n".join(f"{entry.message or ''} {entry.dagster_event!r}" for entry in instance.all_logs(run_id))
    logs = "\n".join(path.read_text(errors="replace") for path in home.glob("dagster-dev*.log"))
    found = {
        where: sorted({needle for needle in needles if re.search(re.escape(needle), text)})
        for where, text in (("killed run's event log", events), ("dagster dev log", logs))
    }
    print(f"\ninbox paths or folder names mentioned: {found}")
