"""deploy/ checked offline: every Kubernetes manifest and every Job that dagster-k8s would submit for the
project's own tags validated strictly against the Kubernetes OpenAPI schemas (kubernetes-validate); the
instance configuration constructed with a K8sRunLauncher (dummy kubeconfig) on a real PostgreSQL; the
two code locations loadable apart, the ingest one without TensorFlow. No cluster is needed (or reachable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.33.0"  # the oldest minor still supported upstream when this was written


def manifests() -> list[dict]:
    documents = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        documents += [document for document in yaml.safe_load_all(path.read_text()) if document]
    return documents


def _by_kind(kind: str) -> dict[str, dict]:
    return {document["metadata"]["name"]: document for document in manifests() if document["kind"] == kind}


@pytest.mark.parametrize("document", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_kubernetes(document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    assert document["metadata"].get("namespace", "hema") == "hema"


def test_secrets_are_placeholders():
    for secret in _by_kind("Secret").values():
        assert all(value.startswith("REPLACE") for value in secret["stringData"].values()), secret["metadata"]["name"]


def _submitted_job(tags: dict, name: str) -> dict:
    """The Job dagster-k8s builds for a run or step carrying ``tags`` (dagster_k8s.job, as the run launcher
    and k8s_job_executor call it), as the API server would receive it."""
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config
    from kubernetes.client import ApiClient

    config = DagsterK8sJobConfig(
        job_image="registry.example.org/hema-pipeline:ml-0.1.0",
        dagster_home="/opt/dagster/dagster_home",
        image_pull_policy="IfNotPresent",
        instance_config_map="dagster-instance",
        postgres_password_secret="dagster-postgresql-secret",
        env_config_maps=["hema-settings"],
        env_secrets=["hema-runtime"],
        service_account_name="hema-dagster",
    )
    serialised = {key: json.dumps(value) if not isinstance(value, str) else value for key, value in tags.items()}
    job = construct_dagster_k8s_job(
        config,
        ["dagster", "api", "execute_run", "{}"],
        name,
        get_user_defined_k8s_config(serialised),
        pod_name=name,
        component="run_worker",
    )
    return ApiClient().sanitize_for_serialization(job)


def _project_tag_sets() -> dict[str, dict]:
    from hema_pipeline.defs.definitions import defs
    from hema_pipeline.defs.predictions import prediction_automation_sensor

    sets = {f"job-{name}": dict(defs.resolve_job_def(name).tags) for name in ("import_smears", "predict_smears", "train_models")}
    sets["automation-run"] = dict(prediction_automation_sensor.run_tags)
    sets["training-step"] = dict(defs.resolve_assets_def("pbc8_trained_model").op.tags)
    return {name: {key: value for key, value in tags.items() if key == "dagster-k8s/config"} for name, tags in sets.items()}


@pytest.mark.parametrize(
    "name", ["job-import_smears", "job-predict_smears", "job-train_models", "automation-run", "training-step"]
)
def test_the_jobs_dagster_k8s_would_submit_are_valid_and_name_what_deploy_creates(name):
    tags = _project_tag_sets()[name]
    assert tags, f"{name} carries no dagster-k8s/config tag: its pod would get the launcher's defaults"
    job = _submitted_job(tags, f"dagster-{name.replace('_', '-')}")
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    pod = job["spec"]["template"]
    # The zone label is what the network policies select on; service account and priority class must
    # exist in deploy/kubernetes.
    zone = pod["metadata"]["labels"]["hema/zone"]
    account = pod["spec"]["serviceAccountName"]
    assert _by_kind("ServiceAccount")[account]["metadata"]["labels"]["hema/zone"] == zone
    assert pod["spec"]["priorityClassName"] in _by_kind("PriorityClass")
    assert (zone == "identifiable") == (name == "job-import_smears")
    resources = pod["spec"]["containers"][0]["resources"]
    if name == "training-step":
        assert resources["limits"]["nvidia.com/gpu"] == "1" and resources["requests"]["nvidia.com/gpu"] == "1"
        assert pod["spec"]["nodeSelector"] == {"hema/accelerator": "gpu"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    else:
        assert "nvidia.com/gpu" not in resources.get("limits", {})


def test_training_steps_run_the_gpu_image_named_in_the_settings(monkeypatch):
    from hema_pipeline.defs.kubernetes import k8s_tags, training_step_pod

    settings = _by_kind("ConfigMap")["hema-settings"]["data"]
    monkeypatch.setenv("HEMA_GPU_IMAGE", settings["HEMA_GPU_IMAGE"])
    job = _submitted_job(k8s_tags(training_step_pod()), "dagster-step-gpu")
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":ml-gpu-0.1.0")
    monkeypatch.delenv("HEMA_GPU_IMAGE")
    assert "image" not in training_step_pod()["container_config"]


def test_the_instance_configuration_constructs_with_a_k8s_run_launcher(postgres_database, tmp_path, monkeypatch, s3_endpoint):
    from urllib.parse import urlsplit

    import boto3
    import dagster as dg

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="hema-compute-logs")
    parsed = urlsplit(postgres_database)
    for name, value in {
        "DAGSTER_PG_HOST": parsed.hostname,
        "DAGSTER_PG_DB": parsed.path.lstrip("/"),
        "DAGSTER_PG_USER": parsed.username,
        "DAGSTER_PG_PASSWORD": "",
        "HEMA_COMPUTE_LOG_BUCKET": "hema-compute-logs",
    }.items():
        monkeypatch.setenv(name, value)
    config = yaml.safe_load((DEPLOY / "dagster-instance.yaml").read_text())
    config["storage"]["postgres"]["postgres_db"]["port"] = parsed.port
    # Outside a cluster: a kubeconfig that points nowhere (the launcher only reads it when constructed).
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "none", "user": {"token": "x"}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
                "current-context": "none",
            }
        )
    )
    config["run_launcher"]["config"].update(load_incluster_config=False, kubeconfig_file=str(kubeconfig))
    config["compute_logs"]["config"]["endpoint_url"] = s3_endpoint
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_launcher).__name__ == "K8sRunLauncher"
        assert instance.run_launcher.job_namespace == "hema"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.compute_log_manager).__name__ == "S3ComputeLogManager"
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
        limits = instance.get_concurrency_config()
        assert limits.run_queue_config.max_concurrent_runs == 8


# Every run worker, sensor evaluation and code server loads a location: these libraries (seconds each on
# 2 cores) must load only in the steps that use them.
HEAVY_IMPORTS = ("tensorflow", "keras", "sklearn", "scipy.stats", "great_expectations")


def _load_location(location: str) -> dict:
    script = (
        "import json, sys\n"
        "from hema_pipeline.defs.definitions import defs\n"
        "graph = defs.resolve_asset_graph()\n"
        "executable = sorted(k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_executable)\n"
        "jobs = sorted(job.name for job in defs.resolve_all_job_defs() if not job.name.startswith('__'))\n"
        "resources = sorted(defs.resources or {})\n"
        "print(json.dumps({'assets': executable, 'jobs': jobs, 'resources': resources,\n"
        f"                  'heavy_imports': sorted(m for m in {HEAVY_IMPORTS!r} if m in sys.modules)}}))\n"
    )
    env = {**os.environ, "HEMA_CODE_LOCATION": location}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # starts Python processes that load the code locations
def test_the_two_code_locations_split_the_definitions_and_the_identifiable_zone():
    ingest, ml, everything = (_load_location(name) for name in ("ingest", "ml", "all"))
    assert ingest["assets"] == ["imported_smear"] and ingest["jobs"] == ["import_smears"]
    for name, loaded in (("ingest", ingest), ("ml", ml), ("all", everything)):
        assert not loaded["heavy_imports"], f"loading the {name} location imported {loaded['heavy_imports']}"
    assert sorted(ingest["assets"] + ml["assets"]) == everything["assets"]
    assert sorted(ingest["jobs"] + ml["jobs"]) == everything["jobs"]
    # Only the ingest location holds the inbox and the key.
    assert {"inbox", "pseudonyms"} <= set(ingest["resources"])
    assert not {"inbox", "pseudonyms"} & set(ml["resources"])


def test_helm_values_name_the_project_locations_and_secrets():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    deployments = {d["name"]: d for d in values["dagster-user-deployments"]["deployments"]}
    assert set(deployments) == {"hema-ingest", "hema-ml"}

    def env_of(deployment: dict) -> dict:
        env = deployment.get("env", {})
        return env if isinstance(env, dict) else {item["name"]: item.get("value") for item in env}

    assert env_of(deployments["hema-ingest"])["HEMA_CODE_LOCATION"] == "ingest"
    assert env_of(deployments["hema-ml"])["HEMA_CODE_LOCATION"] == "ml"
    secrets = {
        name: {s["name"] if isinstance(s, dict) else s for s in d.get("envSecrets", [])} for name, d in deployments.items()
    }
    assert "hema-pseudonym-key" in secrets["hema-ingest"] and "hema-pseudonym-key" not in secrets["hema-ml"]
    assert "hema-inbox-credentials" not in secrets["hema-ml"]
    assert values["postgresql"]["enabled"] is False
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    declared = set(_by_kind("Secret")) | set(_by_kind("ConfigMap"))
    for deployment in deployments.values():
        for name in secrets[deployment["name"]] | {
            c["name"] if isinstance(c, dict) else c for c in deployment.get("envConfigMaps", [])
        }:
            assert name in declared, f"{deployment['name']} uses {name}, which deploy/kubernetes does not declare"
