"""How runs and steps are shaped when Dagster runs on Kubernetes (deploy/): the ``dagster-k8s/config``
tags the project's jobs, sensors and training steps carry, and the executor of the training job.

Where the tags act (dagster-k8s 0.29): a job's or a run's ``dagster-k8s/config`` tag shapes the run pod
(K8sRunLauncher); an asset's ``op_tags`` shape its step pod, and only under ``k8s_job_executor``. Runs
started by declarative automation or backfills carry no job tags, so the automation sensor sets the run
tags itself. Elsewhere (the embedded default, ``make demo``) the tags are inert.

Settings (environment of the code location):

- ``HEMA_EXECUTOR``: ``k8s`` runs each training step in its own pod (``k8s_job_executor``), so the GPU
  request below reaches the step that trains; empty (default) keeps Dagster's in-process executor.
- ``HEMA_GPU_NODE_SELECTOR``: ``label=value`` of the GPU nodes (default ``hema/accelerator=gpu``).
- ``HEMA_GPU_TOLERATION``: taint key the GPU nodes carry (default ``nvidia.com/gpu``).
- ``HEMA_GPU_IMAGE``: the image of the training step pods (deploy/Dockerfile's ``ml-gpu`` target, with
  TensorFlow's CUDA libraries). Unset, a step runs the run's own image (the CPU ``ml`` one) and would
  hold a GPU it cannot use.
"""

from __future__ import annotations

import os
from typing import Any

K8S_CONFIG_TAG = "dagster-k8s/config"


def _resources(cpu: str, memory: str, limit_memory: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    requests = {"cpu": cpu, "memory": memory, **(extra or {})}
    limits = {"memory": limit_memory, **(extra or {})}
    return {"container_config": {"resources": {"requests": requests, "limits": limits}}}


def _gpu_node_selector() -> dict[str, str]:
    label, _, value = os.environ.get("HEMA_GPU_NODE_SELECTOR", "hema/accelerator=gpu").partition("=")
    return {label: value}


def _zone(zone: str, service_account: str, priority_class: str) -> dict[str, Any]:
    """Who the pod is: its zone label (what deploy/kubernetes/60-network-policies.yaml lets it reach), its
    service account (what its cloud identity lets it read), its priority class."""
    return {
        "pod_template_spec_metadata": {"labels": {"hema/zone": zone, "app.kubernetes.io/part-of": "hema-pipeline"}},
        "pod_spec_config": {"service_account_name": service_account, "priority_class_name": priority_class},
    }


IDENTIFIABLE, ANONYMISED = "identifiable", "anonymised"

# Run pods. An import decodes, strips and hashes one smear's JPEGs, and is the only pod that reads the
# inbox; a prediction run loads the champions (TensorFlow) and scores one or more smears; the training
# run pod only orchestrates its step pods.
IMPORT_RUN_POD: dict[str, Any] = _resources("500m", "1Gi", "2Gi") | _zone(IDENTIFIABLE, "hema-ingest", "hema-import")
PREDICTION_RUN_POD: dict[str, Any] = _resources("2", "4Gi", "8Gi") | _zone(ANONYMISED, "hema-ml", "hema-predict")
TRAINING_RUN_POD: dict[str, Any] = _resources("500m", "2Gi", "4Gi") | _zone(ANONYMISED, "hema-ml", "hema-training")


def training_step_pod() -> dict[str, Any]:
    """The step pod of ``<task>_trained_model`` under ``k8s_job_executor``: one GPU, on a GPU node."""
    zone = _zone(ANONYMISED, "hema-ml", "hema-training")
    resources = _resources("4", "24Gi", "48Gi", {"nvidia.com/gpu": "1"})
    image = os.environ.get("HEMA_GPU_IMAGE", "").strip()
    if image:
        resources["container_config"]["image"] = image
    return resources | {
        "pod_template_spec_metadata": zone["pod_template_spec_metadata"],
        "pod_spec_config": {
            **zone["pod_spec_config"],
            "node_selector": _gpu_node_selector(),
            "tolerations": [
                {"key": os.environ.get("HEMA_GPU_TOLERATION", "nvidia.com/gpu"), "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
    }


def k8s_tags(pod: dict[str, Any]) -> dict[str, Any]:
    return {K8S_CONFIG_TAG: pod}


def training_executor() -> Any:
    """``k8s_job_executor`` when ``HEMA_EXECUTOR=k8s``, else None (Dagster's default executor)."""
    choice = os.environ.get("HEMA_EXECUTOR", "").strip().lower()
    if not choice:
        return None
    if choice != "k8s":
        raise ValueError(f"HEMA_EXECUTOR must be empty or 'k8s', got {choice!r}")
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor
