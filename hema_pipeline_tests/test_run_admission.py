"""Import runs are refused at submission, before any worker starts, when the key is unusable."""

from __future__ import annotations

import dagster as dg
import pytest
from dagster._core.run_coordinator import SubmitRunContext

from hema_pipeline.defs.run_admission import ImportRefused, KeyCheckingRunCoordinator

COORDINATOR = {"module": "hema_pipeline.defs.run_admission", "class": "KeyCheckingRunCoordinator"}


def _submit(instance: dg.DagsterInstance, job_name: str) -> dg.DagsterRun:
    from hema_pipeline.defs.definitions import defs

    job = defs.resolve_job_def(job_name)
    run = instance.create_run_for_job(job, run_config={}, tags={"dagster/partition": "S" + "0" * 20})
    return instance.run_coordinator.submit_run(SubmitRunContext(run, workspace=None))


@pytest.fixture
def instance(pipeline_env):
    with dg.instance_for_test(
        overrides={"run_coordinator": {**COORDINATOR, "config": {"max_concurrent_runs": 2}}},
        temp_dir=str(pipeline_env.dagster_home),
    ) as instance:
        yield instance


def test_the_configured_coordinator_is_the_queued_one_with_its_limits(instance):
    assert isinstance(instance.run_coordinator, KeyCheckingRunCoordinator)
    assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 2


def test_an_import_run_without_a_key_is_refused_before_it_is_queued(instance, monkeypatch):
    monkeypatch.delenv("HEMA_PSEUDONYM_KEY")
    with pytest.raises(ImportRefused, match="HEMA_PSEUDONYM_KEY"):
        _submit(instance, "import_smears")
    [run] = instance.get_runs()
    assert run.tags["dagster/max_retries"] == "0", "a refused run must not be retried into the same refusal"


def test_a_mistyped_key_is_refused_and_not_echoed(instance, monkeypatch):
    typo = "5e" * 31 + "5"
    monkeypatch.setenv("HEMA_PSEUDONYM_KEY", typo)
    with pytest.raises(ImportRefused) as refused:
        _submit(instance, "import_smears")
    assert typo not in str(refused.value)


@pytest.fixture
def queued(monkeypatch):
    """What reached Dagster's own queueing (the real queue, with a code location, runs in test_ui)."""
    from dagster._core.run_coordinator import QueuedRunCoordinator

    forwarded: list[str] = []
    monkeypatch.setattr(QueuedRunCoordinator, "submit_run", lambda self, context: forwarded.append(context.dagster_run.job_name))
    return forwarded


def test_with_a_key_the_import_run_goes_to_the_queue(instance, queued):
    _submit(instance, "import_smears")
    assert queued == ["import_smears"]


def test_runs_that_need_no_key_are_never_checked(instance, monkeypatch, queued):
    monkeypatch.delenv("HEMA_PSEUDONYM_KEY")
    _submit(instance, "train_models")
    assert queued == ["train_models"]
