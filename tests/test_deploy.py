"""deploy/: Kubernetes manifests validated against the Kubernetes schemas (kubernetes-validate ships them),
KubeRay resources checked against the fields of KubeRay's ray.io/v1 API, and the commands and job spec
they carry checked by vitpipe's own parser. The KubeRay CRD's OpenAPI schema is not on any package
registry, so its top level is checked against the subset written below (from the KubeRay v1 API docs)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import load_job_spec

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = "1.30.0"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _validate_k8s(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S, strict=True)


def _pod_templates(spec: dict) -> list[dict]:
    cluster = spec.get("rayClusterSpec", spec)
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


GROUP = {"type": "object", "required": ["rayStartParams", "template"],
         "properties": {"rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                        "template": {"type": "object"}, "serviceType": {"enum": ["ClusterIP", "NodePort"]},
                        "groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 1}}, "additionalProperties": False}
CLUSTER = {"type": "object", "required": ["headGroupSpec"],
           "properties": {"rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                          "headGroupSpec": GROUP, "workerGroupSpecs": {"type": "array", "items": GROUP}},
           "additionalProperties": False}
KUBERAY = {
    "RayCluster": CLUSTER,
    "RayJob": {"type": "object", "required": ["entrypoint", "rayClusterSpec"],
               "properties": {"entrypoint": {"type": "string"}, "shutdownAfterJobFinishes": {"type": "boolean"},
                              "ttlSecondsAfterFinished": {"type": "integer"},
                              "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                              "rayClusterSpec": CLUSTER}, "additionalProperties": False},
}


@pytest.mark.parametrize("name", ["secret.example.yaml", "cronjob.yaml"])
def test_kubernetes_resources_match_the_kubernetes_schemas(name):
    for doc in _docs(name):
        _validate_k8s(doc)


def test_a_broken_manifest_is_caught():
    bad = _docs("cronjob.yaml")[0]
    bad["spec"]["concurrencyPolicy"] = 3  # wrong type
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_k8s(bad)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_resources(name):
    (doc,) = _docs(name)
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc["spec"], KUBERAY[doc["kind"]])
    for template in _pod_templates(doc["spec"]):
        # Each group's pod template is a core/v1 PodTemplateSpec: validate it as Kubernetes does.
        _validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "token"  # token authentication on every node
            assert {"secretRef": {"name": "vitpipe-ray-token"}} in c["envFrom"]
    head = doc["spec"].get("rayClusterSpec", doc["spec"])["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # the dashboard is never exposed publicly


def test_gpu_workers_and_autoscaling_bounds():
    (doc,) = _docs("raycluster.yaml")
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu-models"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_commands_and_job_spec_in_the_manifests_are_valid():
    parser = build_parser()
    (rayjob,) = _docs("rayjob.yaml")
    args = parser.parse_args(rayjob["spec"]["entrypoint"].split()[1:])
    assert args.command == "run" and args.address == "auto"
    cron = _docs("cronjob.yaml")[0]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert parser.parse_args(command[1:]).command == "submit"
    configmap = next(d for d in _docs("secret.example.yaml") if d["kind"] == "ConfigMap")
    spec = load_job_spec(data=yaml.safe_load(configmap["data"]["nightly.yaml"]))
    assert spec.output.mode == "incremental"
    for d in _docs("secret.example.yaml"):
        if d["kind"] == "Secret":
            assert set(d["stringData"].values()) <= {"REPLACE_ME", "https://s3.us-east-1.amazonaws.com"}


def test_no_secret_values_in_any_manifest():
    text = "\n".join(p.read_text() for p in DEPLOY.glob("*.yaml"))
    assert "AWS_SECRET_ACCESS_KEY:" not in text.replace('AWS_SECRET_ACCESS_KEY: "REPLACE_ME"', "")
