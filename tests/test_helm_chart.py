"""The Helm chart, offline: render (Helm v4 as a library), strict lint, Kubernetes schemas, values schema.

No cluster runs here. Rendering and lint use the real Helm v4 SDK (PyPI ``helm-python-sdk``); every
rendered object is validated with ``kubernetes-validate --strict`` for Kubernetes 1.29 to 1.33. The
custom resources (ServiceMonitor, PodMonitor: Prometheus operator; ScaledObject: KEDA) have no schema in
kubernetes-validate, so they are checked against the subset of their CRD schemas that the chart uses,
written out below with ``additionalProperties: false`` (a misspelt field fails).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

helm = pytest.importorskip("helm_python")
kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "ctscreen"
PRODUCTION = CHART / "values-production.yaml"
KUBE_VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")
RELEASE, NAMESPACE = "ctscreen", "screening"


def _production() -> dict:
    return yaml.safe_load(PRODUCTION.read_text())


def _keda() -> dict:
    values = _production()
    values["autoscaling"]["mode"] = "keda"
    return values


VALUE_SETS = {"default": dict, "production": _production, "keda": _keda}


def render(values: dict | None = None) -> list[dict]:
    """Render the chart and return every object (NOTES.txt and empty documents dropped)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".yaml"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(make()) for name, make in VALUE_SETS.items()}


def find(objects: list[dict], kind: str, name_suffix: str = "") -> dict:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(hits) == 1, f"expected one {kind} *{name_suffix}, found {[o['metadata']['name'] for o in hits]}"
    return hits[0]


def container(deployment: dict, name: str, init: bool = False) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    for c in spec["initContainers" if init else "containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name!r} in {deployment['metadata']['name']}")


# --- render and lint ------------------------------------------------------------------------------


def test_default_values_render_the_core_objects(rendered):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered["default"])
    names = {k for k, _ in kinds}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy", "Role",
            "RoleBinding", "ServiceAccount", "HorizontalPodAutoscaler"} <= names
    for o in rendered["default"]:
        assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]["name"]


def test_production_values_render_autoscaling_monitoring_and_ingress(rendered):
    objs = rendered["production"]
    kinds = {o["kind"] for o in objs}
    assert {"ServiceMonitor", "PodMonitor", "Ingress"} <= kinds
    hpas = {o["metadata"]["name"] for o in objs if o["kind"] == "HorizontalPodAutoscaler"}
    assert hpas == {f"{RELEASE}-triton", f"{RELEASE}-gateway"}
    assert "ScaledObject" not in kinds
    keda_kinds = {o["kind"] for o in rendered["keda"]}
    assert "ScaledObject" in keda_kinds
    assert f"{RELEASE}-triton" not in {
        o["metadata"]["name"] for o in rendered["keda"] if o["kind"] == "HorizontalPodAutoscaler"
    }, "KEDA owns the Triton HPA; the chart must not render a second one"


@pytest.mark.parametrize("value_set", ["default", "production"])
@pytest.mark.parametrize("kube_version", ["v1.29.0", "v1.33.0"])
def test_lint_strict_passes(value_set, kube_version):
    report = helm.lint(CHART, VALUE_SETS[value_set](), strict=True, kube_version=kube_version)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_lint_strict_reports_a_broken_value():
    values = _production()
    values["triton"]["gpus"] = 0
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] or any(m["severity"] >= 2 for m in report["messages"])


# --- Kubernetes schemas -----------------------------------------------------------------------------

CRD_SUBSET_SCHEMAS: dict[tuple[str, str], dict] = {}


def _strict(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": required or []}


_META = _strict({"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                 "namespace": {"type": "string"}, "labels": {"type": "object",
                                                             "additionalProperties": {"type": "string"}}},
                ["name", "namespace"])
_SELECTOR = _strict({"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                    ["matchLabels"])
_INTERVAL = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
CRD_SUBSET_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")] = _strict({
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"}, "metadata": _META,
    "spec": _strict({"selector": _SELECTOR, "endpoints": {"type": "array", "minItems": 1, "items": _strict(
        {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"}, "interval": _INTERVAL},
        ["port"])}}, ["selector", "endpoints"])}, ["apiVersion", "kind", "metadata", "spec"])
CRD_SUBSET_SCHEMAS[("monitoring.coreos.com/v1", "PodMonitor")] = _strict({
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"}, "metadata": _META,
    "spec": _strict({"selector": _SELECTOR, "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                     "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _strict(
                         {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                          "interval": _INTERVAL}, ["port"])}}, ["selector", "podMetricsEndpoints"])},
    ["apiVersion", "kind", "metadata", "spec"])
_BEHAVIOR_RULES = _strict({"stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
                           "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
                           "policies": {"type": "array", "items": _strict(
                               {"type": {"enum": ["Pods", "Percent"]}, "value": {"type": "integer", "minimum": 1},
                                "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800}},
                               ["type", "value", "periodSeconds"])}})
CRD_SUBSET_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")] = _strict({
    "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"}, "metadata": _META,
    "spec": _strict({
        "scaleTargetRef": _strict({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "name": {"type": "string"}}, ["name"]),
        "minReplicaCount": {"type": "integer", "minimum": 0}, "maxReplicaCount": {"type": "integer", "minimum": 1},
        "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
        "advanced": _strict({"horizontalPodAutoscalerConfig": _strict({"behavior": _strict(
            {"scaleUp": _BEHAVIOR_RULES, "scaleDown": _BEHAVIOR_RULES})})}),
        "triggers": {"type": "array", "minItems": 1, "items": _strict({
            "type": {"const": "prometheus"}, "name": {"type": "string"},
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "metadata": _strict({"serverAddress": {"type": "string", "pattern": "^https?://"},
                                 "query": {"type": "string", "minLength": 1},
                                 "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}},
                                ["serverAddress", "query", "threshold"])}, ["type", "metadata"])}},
        ["scaleTargetRef", "triggers"])}, ["apiVersion", "kind", "metadata", "spec"])

_DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
CRD_SUBSET_SCHEMAS[("monitoring.coreos.com/v1", "PrometheusRule")] = _strict({
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"}, "metadata": _META,
    "spec": _strict({"groups": {"type": "array", "minItems": 1, "items": _strict({
        "name": {"type": "string", "minLength": 1},
        "rules": {"type": "array", "minItems": 1, "items": {"oneOf": [
            _strict({"record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                     "expr": {"type": "string", "minLength": 1}, "labels": _STRINGS}, ["record", "expr"]),
            _strict({"alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
                     "expr": {"type": "string", "minLength": 1}, "for": _DURATION, "labels": _STRINGS,
                     "annotations": _STRINGS}, ["alert", "expr"]),
        ]}}}, ["name", "rules"])}}, ["groups"])}, ["apiVersion", "kind", "metadata", "spec"])


def test_kubernetes_validate_ships_the_versions_we_support():
    shipped = {kv.utils.major_minor(v) for v in kv.utils.all_versions()}
    assert {kv.utils.major_minor(v) for v in KUBE_VERSIONS} <= shipped


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_object_passes_kubernetes_validate_strict(rendered, value_set, kube_version):
    checked_crds = 0
    for obj in rendered[value_set]:
        key = (obj["apiVersion"], obj["kind"])
        if key in CRD_SUBSET_SCHEMAS:
            jsonschema.validate(obj, CRD_SUBSET_SCHEMAS[key])
            checked_crds += 1
            continue
        try:
            used = kv.validate(obj, kube_version, strict=True)
        except kv.utils.ValidationError as exc:  # pragma: no cover - the failure message is the point
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for {kube_version}: {exc.message} "
                        f"at {list(exc.absolute_path)}")
        assert used == kv.utils.major_minor(kube_version)
    if value_set != "default":
        assert checked_crds >= 2


def test_strict_validation_catches_a_misspelt_field(rendered):
    """Guards the check above: kubernetes-validate strict must reject an unknown field."""
    deployment = json.loads(json.dumps(find(rendered["default"], "Deployment", "-triton")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/"}}
    with pytest.raises(kv.utils.ValidationError):
        kv.validate(deployment, "1.33.0", strict=True)
    monitor = json.loads(json.dumps(find(rendered["production"], "PodMonitor")))
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, CRD_SUBSET_SCHEMAS[("monitoring.coreos.com/v1", "PodMonitor")])


# --- values.schema.json -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"triton": {"gpus": 0}}, "/triton/gpus"),
        ({"triton": {"image": {"tag": "latest"}}}, "/triton/image/tag"),
        ({"autoscaling": {"mode": "vpa"}}, "value must be one of 'none', 'hpa', 'keda'"),
        ({"gateway": {"ingress": {"enabled": True, "tlsSecretName": ""}}}, "/gateway/ingress/tlsSecretName"),
        ({"triton": {"modelRepository": {"source": "s3"}}}, "/triton/modelRepository/s3/url"),
        ({"triton": {"modelRepository": {"source": "nfs"}}}, "/triton/modelRepository/source"),
        ({"triton": {"resources": {"limits": {"cpu": "lots"}}}}, "/triton/resources/limits/cpu"),
        ({"triton": {"securityContext": {"runAsUser": 0}}}, "/triton/securityContext/runAsUser"),
        ({"triton": {"mallocEnv": {"LD_PRELOAD": "/x.so"}}}, "/triton/mallocEnv"),  # MALLOC_* only
        ({"triton": {"mallocEnv": {"MALLOC_TOP_PAD_": "16M"}}}, "/triton/mallocEnv/MALLOC_TOP_PAD_"),  # bytes
        ({"gateway": {"discovery": "consul"}}, "/gateway/discovery"),
        ({"gateway": {"dicom": {"aeTitle": "A_TITLE_LONGER_THAN_16"}}}, "/gateway/dicom/aeTitle"),
        ({"gateway": {"dicom": {"port": 0}}}, "/gateway/dicom/port"),
        ({"gateway": {"dicom": {"acceptNonCt": "drop"}}}, "/gateway/dicom/acceptNonCt"),
        ({"gateway": {"logFormat": "yaml"}}, "/gateway/logFormat"),
        # the gateway refuses a grace under 5 minutes (a write and the row that names it take seconds apart)
        ({"state": {"retention": {"orphanGraceMinutes": 4}}}, "/state/retention/orphanGraceMinutes"),
        ({"tritn": {}}, "additional properties 'tritn' not allowed"),
        ({"gateway": {"uidRoot": "3.1.2"}}, "/gateway/uidRoot"),  # the first arc is 0, 1 or 2
        ({"gateway": {"uidRoot": "1.02"}}, "/gateway/uidRoot"),
        ({"gateway": {"uidRoot": "2"}}, "/gateway/uidRoot"),  # one arc
        ({"gateway": {"uidRoot": "1.40.5"}}, "/gateway/uidRoot"),  # under 0 and 1 the second arc is 0-39
        ({"gateway": {"uidRoot": "2." + "5" * 39}}, "/gateway/uidRoot"),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(values, message):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as info:
            chart.validate_schema(values)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"triton": {"engines": {"minBatch": 8, "optBatch": 4}}}, "need minBatch <= optBatch <= maxBatch"),
        ({"triton": {"engines": {"image": {"tag": "25.01-py3"}}}}, "must equal triton.image.tag"),
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas 5 must not exceed maxReplicas 2"),
        ({"autoscaling": {"mode": "hpa"}}, "enable monitoring.serviceMonitor"),
        ({"autoscaling": {"mode": "hpa"}, "monitoring": {"serviceMonitor": {"enabled": True}}},
         "enable monitoring.prometheusRule"),
        ({"triton": {"priorityClass": {"create": True}}}, "needs triton.priorityClassName"),
        ({"triton": {"rollout": {"progressDeadlineSeconds": 3600}}}, "2 models x engines.buildTimeoutSeconds 1800"),
        # a new GPU node pulls a 10-15 GB image first: the deadline counts the pull too
        ({"triton": {"rollout": {"imagePullSeconds": 1200}}}, "the image pulls 2 x 1200 s"),
        ({"triton": {"engines": {"build": False}, "rollout": {"progressDeadlineSeconds": 600, "imagePullSeconds": 900}}},
         "the image pull 900 s (triton.rollout.imagePullSeconds) + 0 models"),
        # a security control the gateway would refuse without mutual TLS was dropped from the pod silently
        ({"gateway": {"dicom": {"enabled": True, "allowedPeers": ["CT@*"], "tls": {"bindAeTitle": True}}}},
         "bindAeTitle ties a calling AE title"),
        ({"gateway": {"dicom": {"enabled": True, "allowedPeers": ["CT@*"],
                                "tls": {"secretName": "s", "mutual": False, "bindAeTitle": True}}}},
         "needs mutual TLS"),
        ({"state": {"migrateOnStart": False}}, "nothing would migrate the new install"),
    ],
)
def test_cross_field_rules_fail_the_render_with_a_clear_message(patch, message):
    with pytest.raises(helm.HelmError) as info:
        render(patch)
    assert message in str(info.value)


@pytest.mark.parametrize(("build", "minimum"), [
    # the TensorRT image (build-engines), two builds, then the Triton image, then the startup probe
    (True, 2 * 900 + 2 * 1800 + 900),
    # one pull (build-engines copies the repository in the Triton image), no build
    (False, 900 + 900),
])
def test_the_triton_progress_deadline_counts_every_image_a_cold_node_pulls(build, minimum):
    """On a cold GPU node with engines.build the kubelet pulls build-engines' TensorRT image, runs the builds, and
    only then pulls the Triton image: the check counted one pull, so a default deadline that passed the render
    failed the rollout (and helm --wait) while the second image came down. Without a build there is one pull."""
    def deadline(seconds: int) -> dict:
        return {"triton": {"engines": {"build": build}, "rollout": {"progressDeadlineSeconds": seconds}}}

    triton = find(render(deadline(minimum)), "Deployment", "-triton")
    assert triton["spec"]["progressDeadlineSeconds"] == minimum
    with pytest.raises(helm.HelmError) as info:
        render(deadline(minimum - 1))
    pulls = ("the image pulls 2 x 900 s (build-engines' TensorRT image, then the Triton image" if build
             else "the image pull 900 s (triton.rollout.imagePullSeconds) + 0 models")
    assert pulls in str(info.value) and f"= {minimum} s" in str(info.value)
    if build:  # the default covers a cold node (the chart's values and the README's wait, in minutes)
        assert find(render(), "Deployment", "-triton")["spec"]["progressDeadlineSeconds"] >= minimum
        readme = (CHART / "README.md").read_text()
        assert f"--timeout={-(-minimum // 60)}m" in readme and f"`progressDeadlineSeconds` {minimum}" in readme


@pytest.mark.parametrize(("override", "external", "message"), [
    ("c" * 48, True, None),  # the schema's maxLength (47) refuses it first
    ("c" * 47, True, ""),
    ("c" * 42, False, "StatefulSet"),
    ("c" * 42, True, ""),
    ("c" * 41, False, ""),
])
def test_a_long_release_name_fails_the_render_instead_of_the_cluster(override, external, message):
    """A 50-character full name (a 53-character release name, or fullnameOverride, both accepted) rendered Services
    of 66 characters, which the API server refuses (the Triton headless Service, the gateway's metrics), and a
    PostgreSQL StatefulSet of 61, whose pod never comes (its controller-revision-hash label passes 63): the
    validator of these tests checks no name length. Now the render fails with one line naming the limit; names
    that fit render, every Service at most 63 characters and every StatefulSet at most 52."""
    values: dict = {"fullnameOverride": override}
    if external:
        values["state"] = {"database": {"existingSecret": "ctscreen-db"}, "blobs": {"existingClaim": "nfs"}}
    if message is None:
        with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match="fullnameOverride"):
            chart.validate_schema(values)
        return
    if message:
        with pytest.raises(helm.HelmError) as info:
            render(values)
        assert message in str(info.value) and "fullnameOverride" in str(info.value)
        return
    objects = render(values)
    limits = {"Service": 63, "StatefulSet": 52, "Job": 63, "Pod": 63}
    for o in objects:
        if o["kind"] in limits:
            assert len(o["metadata"]["name"]) <= limits[o["kind"]], (o["kind"], o["metadata"]["name"])
    assert any(o["kind"] == "StatefulSet" for o in objects) is (not external)


def test_a_uid_root_the_schema_accepts_the_gateway_accepts():
    """One rule in both places: a 40-character root passed ``helm install`` and the pod then crash-looped
    (the gateway counted the dot it appends)."""
    from pydantic import ValidationError

    from gateway.settings import Settings

    with helm.Chart.load(CHART) as chart:
        for root in ("2." + "5" * 38, "2." + "5" * 37 + ".", "2.25", "1.2.840.99999.7."):
            chart.validate_schema({"gateway": {"uidRoot": root}})
            assert Settings(uid_root=root).uid_root == root.rstrip(".") + "."
    for bad in ("3.1", "1.02", "2." + "5" * 39, "2", "1.40.5"):
        with pytest.raises(ValidationError, match="not a DICOM UID root"):
            Settings(uid_root=bad)


def test_the_install_only_rules_let_upgrades_and_unused_options_through():
    """An existing in-chart-PostgreSQL release may upgrade with migrateOnStart false (the pre-upgrade Job
    migrates); bindAeTitle is checked only where DICOM is on."""
    with helm.Chart.load(CHART) as chart:
        chart.render({"state": {"migrateOnStart": False}}, name=RELEASE, namespace=NAMESPACE, is_install=False,
                     is_upgrade=True, revision=2)
    render({"gateway": {"dicom": {"tls": {"bindAeTitle": True}}}})


def test_production_values_pass_the_schema():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(_production())
        chart.validate_schema({})


# --- what the chart must get right ---------------------------------------------------------------------


def _ngc_release_for(tritonclient_version: str) -> str:
    """NGC container YY.MM for a Triton 2.x release: 2.43.0 is 24.02 and each monthly release adds one.

    Anchors from NVIDIA's release notes: 24.02 <-> 2.43.0, 24.05 <-> 2.46.0, 24.12 <-> 2.53.0.
    """
    minor = int(tritonclient_version.split(".")[1])
    month_index = 2024 * 12 + 1 + (minor - 43)  # 0-based months: 24.02 is index 2024*12 + 1
    return f"{month_index // 12 % 100:02d}.{month_index % 12 + 1:02d}-py3"


def test_triton_image_is_pinned_to_the_release_our_client_speaks(rendered):
    assert _ngc_release_for("2.43.0") == "24.02-py3" and _ngc_release_for("2.53.0") == "24.12-py3"
    expected = _ngc_release_for(importlib.metadata.version("tritonclient"))
    assert expected == "24.10-py3"
    deployment = find(rendered["default"], "Deployment", "-triton")
    assert container(deployment, "triton")["image"].endswith(f":{expected}")
    # the Triton image is the NGC one plus numpy<2 and scipy, built on the same tag
    dockerfile = (ROOT / "model_repository" / "triton.Dockerfile").read_text()
    assert f"ARG TRITON_TAG={expected}" in dockerfile
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}" in dockerfile
    # its Python packages at exact versions (an image built next month is the same image): numpy as constraints.txt
    numpy = re.search(r"^numpy==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert numpy and f'"numpy=={numpy.group(1)}"' in dockerfile and re.search(r'"scipy==[\d.]+"', dockerfile)
    # trtexec from the same NGC month: same TensorRT (10.5) as the server that loads the plans
    assert container(deployment, "build-engines", init=True)["image"] == f"nvcr.io/nvidia/tensorrt:{expected}"


def test_engine_profile_matches_the_gpu_repository_profile():
    """trtexec's batch range must be the one the gpu-profile config.pbtxt declares (ctscreen.repo)."""
    repo = pytest.importorskip("ctscreen.repo")
    from ctscreen.contracts import HU_SLICES, SEGMENTATION_MODELS

    gpu = repo.default_settings("gpu")
    engines = yaml.safe_load((CHART / "values.yaml").read_text())["triton"]["engines"]
    assert engines["maxBatch"] == gpu.max_batch_size
    assert engines["optBatch"] == gpu.opt_batch
    assert engines["inputName"] == HU_SLICES
    assert tuple(engines["models"]) == tuple(SEGMENTATION_MODELS)


def test_gpu_products_match_their_time_sliced_labels_too():
    """GPU feature discovery appends -SHARED to the product label of a time-sliced GPU (renameByDefault):
    the same GPU and the same plans, but the pods could not be scheduled there."""
    objs = render({"triton": {"gpuProducts": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-L4-SHARED"]}})
    spec = find(objs, "Deployment", "-triton")["spec"]["template"]["spec"]
    [term] = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    [expr] = [e for e in term["matchExpressions"] if e["key"] == "nvidia.com/gpu.product"]
    assert expr["operator"] == "In"
    assert expr["values"] == ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB-SHARED", "NVIDIA-L4-SHARED"]


def test_triton_pod_gpu_probes_drain_and_shm(rendered):
    deployment = find(rendered["production"], "Deployment", "-triton")
    spec = deployment["spec"]["template"]["spec"]
    triton = container(deployment, "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container(deployment, "build-engines", init=True)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term[0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.product"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    sleep = int(re.search(r"sleep (\d+)", triton["lifecycle"]["preStop"]["exec"]["command"][-1]).group(1))
    exit_timeout = int(next(a for a in triton["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert sleep > 0 and spec["terminationGracePeriodSeconds"] > sleep + exit_timeout
    assert "--strict-readiness=true" in triton["args"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
    assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("value_set", ["default", "production"])
def test_the_gateways_readiness_probe_waits_for_what_readyz_may_take(rendered, value_set):
    """The gateway's readiness probe set no ``timeoutSeconds`` (the kubelet's 1 s) while ``/readyz`` may take up to
    ``READYZ_MAX_S`` (3 s) for a slow but working database or blob store: every replica left its Service at once.
    The probe waits that long and a second more (the request's own time)."""
    from gateway.api.ops import READYZ_MAX_S

    probe = container(find(rendered[value_set], "Deployment", "-gateway"), "gateway")["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"
    assert probe.get("timeoutSeconds", 1) >= READYZ_MAX_S + 1, probe


@pytest.mark.parametrize("value_set", ["default", "production"])
def test_triton_gets_the_malloc_settings_the_embedded_server_gets(rendered, value_set):
    """The Triton pods' glibc malloc settings are the embedded server's (one measurement, docs/triton.md); a name
    extraEnv sets is extraEnv's alone (one entry a name: server-side apply refuses duplicates), an extraEnv
    GLIBC_TUNABLES (the operator's malloc policy, which MALLOC_* names would override) drops them all, and null
    leaves glibc's defaults."""
    from ctscreen.embedded import MALLOC_ENV

    def malloc(values: dict | None, objects: list[dict] | None = None) -> list[tuple[str, str]]:
        env = container(find(objects or render(values), "Deployment", "-triton"), "triton")["env"]
        names = [e["name"] for e in env]
        assert len(names) == len(set(names)), names
        return [(e["name"], e["value"]) for e in env if e["name"].startswith(("MALLOC_", "GLIBC_"))]

    assert dict(malloc(None, rendered[value_set])) == MALLOC_ENV
    extra = malloc({"triton": {"extraEnv": [{"name": "MALLOC_TOP_PAD_", "value": "0"}]}})
    assert dict(extra) == {**MALLOC_ENV, "MALLOC_TOP_PAD_": "0"}
    tunables = [{"name": "GLIBC_TUNABLES", "value": "glibc.malloc.arena_max=2"}]
    assert malloc({"triton": {"extraEnv": tunables}}) == [("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")]
    assert malloc({"triton": {"mallocEnv": None}}) == []
    one = malloc({"triton": {"mallocEnv": {"MALLOC_TOP_PAD_": None, "MALLOC_ARENA_MAX": "2", "MALLOC_X": None}}})
    assert dict(one) == {"MALLOC_MMAP_THRESHOLD_": MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"], "MALLOC_ARENA_MAX": "2",
                         "MALLOC_TRIM_THRESHOLD_": MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]}


@pytest.mark.parametrize("value_set", ["default", "production"])
def test_every_container_runs_restricted(rendered, value_set):
    for deployment in (o for o in rendered[value_set] if o["kind"] == "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert c["resources"]["limits"] and c["resources"]["requests"], c["name"]



@pytest.mark.parametrize("value_set", ["default", "production"])
def test_fs_group_is_applied_to_a_volume_once_not_at_every_start(rendered, value_set):
    """With fsGroup alone the kubelet changes the owner and mode of every file of a volume at each pod start
    (fsGroupChangePolicy Always): a gateway starting on a CephFS blob volume (ceph-csi's fsGroupPolicy File) walked
    every instance file first, as did PostgreSQL over its data and Triton over a shared engine cache.
    OnRootMismatch does it once, while the volume's root lacks the group."""
    templates = [o["spec"]["template"]["spec"] for o in rendered[value_set] if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(templates) >= 2
    for spec in templates:
        context = spec["securityContext"]
        assert "fsGroup" in context
        assert context["fsGroupChangePolicy"] == "OnRootMismatch"

def test_gateway_role_may_only_read_endpointslices(rendered):
    role = find(rendered["default"], "Role")
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    binding = find(rendered["default"], "RoleBinding")
    sa = find(rendered["default"], "ServiceAccount", "-gateway")
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"]
    gateway = find(rendered["default"], "Deployment", "-gateway")
    env = {e["name"]: e.get("value") for e in container(gateway, "gateway")["env"]}
    headless = find(rendered["default"], "Service", "-triton-headless")
    assert env["CTSCREEN_TRITON_SERVICE"] == headless["metadata"]["name"]
    assert env["CTSCREEN_TRITON_DISCOVERY"] == "endpointslice"


@pytest.mark.parametrize("value_set", ["default", "production"])
def test_gateway_environment_is_accepted_by_the_gateway_settings(rendered, value_set, monkeypatch):
    """The chart's CTSCREEN_* variables parse in gateway.settings.Settings, discovery included."""
    from gateway.discovery import DnsDiscovery, start_discovery
    from gateway.settings import Settings

    gateway = find(rendered[value_set], "Deployment", "-gateway")
    env = {e["name"]: e["value"] for e in container(gateway, "gateway")["env"] if "value" in e}
    env["CTSCREEN_TRITON_NAMESPACE"] = NAMESPACE  # from the downward API in the pod
    for name in [n for n in os.environ if n.startswith("CTSCREEN_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.triton_urls == []  # discovery fills the pool
    assert settings.triton_batch_size == int(env["CTSCREEN_TRITON_BATCH_SIZE"])
    assert settings.triton_max_inflight == int(env["CTSCREEN_TRITON_MAX_INFLIGHT"])
    assert settings.max_upload_bytes == int(env["CTSCREEN_MAX_UPLOAD_BYTES"])
    assert settings.log_format == "json"  # JSON lines for the cluster's log collector (gateway.logFormat)
    assert str(settings.data_dir) == env["CTSCREEN_DATA_DIR"] == "/var/lib/ctscreen"
    assert str(settings.blobs()) == env["CTSCREEN_BLOB_DIR"] == "/var/lib/ctscreen-blobs"
    assert settings.job_deadline_s == 24 * 3600 and settings.instance_retention_s == 7 * 86400
    # the chart sets them (its defaults equal the gateway's, so read the rendered names too)
    assert env["CTSCREEN_ORPHAN_SWEEP_INTERVAL_S"] == str(6 * 3600) and env["CTSCREEN_ORPHAN_GRACE_S"] == "3600"
    assert settings.orphan_sweep_interval_s == 6 * 3600 and settings.orphan_grace_s == 3600
    assert env["CTSCREEN_ORPHAN_KEEP_S"] == str(7 * 86400) and settings.orphan_keep_s == 7 * 86400
    assert settings.dicom_port == (int(env["CTSCREEN_DICOM_PORT"]) if "CTSCREEN_DICOM_PORT" in env else None)
    # the intake's watermarks (C-STORE and STOW-RS) and the SCP's limits
    production = value_set == "production"
    assert settings.dicom_min_free_bytes == (20 if production else 2) * 1024**3
    assert settings.dicom_max_backlog_slices == (40000 if production else None)
    if production:  # the default values leave DICOM off, and the SCP's settings unset
        assert settings.dicom_max_associations == 24 == int(env["CTSCREEN_DICOM_MAX_ASSOCIATIONS"])
        assert settings.dicom_accept_non_ct == "discard" == env["CTSCREEN_DICOM_ACCEPT_NON_CT"]
    else:
        assert "CTSCREEN_DICOM_MAX_ASSOCIATIONS" not in env and "CTSCREEN_DICOM_PORT" not in env
    assert env["CTSCREEN_STOW_MAX_PENDING_STUDIES"] == "16" and settings.stow_max_pending_studies == 16
    assert settings.stow_max_pending_bytes == 4 * 1024**3 == int(env["CTSCREEN_STOW_MAX_PENDING_BYTES"])
    if production:
        assert (settings.dicom_acse_timeout_s, settings.dicom_dimse_timeout_s, settings.dicom_network_timeout_s) \
            == (30, 30, 60) and "CTSCREEN_DICOM_NETWORK_TIMEOUT_S" in env
    assert settings.dicom_tls_bind_ae_title is production
    assert settings.uid_root == ("1.2.840.99999.7." if production else None)
    # /metrics on a port of its own, the one the Service, the ServiceMonitor and the NetworkPolicy name
    ports = {p["name"]: p["containerPort"] for p in container(gateway, "gateway")["ports"]}
    assert settings.metrics_port == ports["metrics"] != ports["http"]
    service = find(rendered[value_set], "Service", "-gateway")
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    metrics = find(rendered[value_set], "Service", "-gateway-metrics")
    assert metrics["spec"]["ports"] == [{"name": "metrics", "port": ports["metrics"], "targetPort": "metrics",
                                         "protocol": "TCP"}]
    assert metrics["spec"]["type"] == "ClusterIP" and metrics["spec"]["selector"] == service["spec"]["selector"]
    for monitor in [o for o in rendered[value_set] if o["kind"] == "ServiceMonitor"]:
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        picked = [o["metadata"]["name"] for o in rendered[value_set]
                  if o["kind"] == "Service" and wanted <= o["metadata"]["labels"].items()]
        assert picked == [metrics["metadata"]["name"]]  # the metrics Service alone

    async def discover():
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: the DNS fallback
        seen = []

        async def resolver(host, port):
            seen.append((host, port))
            return []

        discovery = start_discovery(settings, _Null(), resolver=resolver)
        await asyncio.sleep(0.05)
        await discovery.close()
        return discovery, seen

    discovery, seen = asyncio.run(discover())
    assert isinstance(discovery, DnsDiscovery)
    assert seen[0] == (f"{RELEASE}-triton-headless.{NAMESPACE}.svc", 8001)


class _Null:
    def set_endpoints(self, ready) -> None:
        pass


def test_dicom_intake_is_off_by_default_and_needs_no_affinity_when_on(rendered):
    """C-STORE: the gateway's Storage SCP port, a Service without session affinity (any replica stores any
    instance of a study), allowed by the policy."""
    assert not [o for o in rendered["default"] if o["metadata"]["name"].endswith("-gateway-dicom")]
    objs = rendered["production"]
    svc = find(objs, "Service", "-gateway-dicom")
    assert "sessionAffinity" not in svc["spec"] and svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "dicom", "port": 104, "targetPort": "dicom", "protocol": "TCP"}]
    gw = container(find(objs, "Deployment", "-gateway"), "gateway")
    assert {"name": "dicom", "containerPort": 11112, "protocol": "TCP"} in gw["ports"]
    env = {e["name"]: e.get("value") for e in gw["env"]}
    assert env["CTSCREEN_DICOM_PORT"] == "11112" and env["CTSCREEN_DICOM_AE_TITLE"] == "CTSCREEN"
    policy = find(objs, "NetworkPolicy", "-gateway")
    assert any({"port": "dicom", "protocol": "TCP"} in rule["ports"] for rule in policy["spec"]["ingress"])


def test_state_is_shared_by_every_replica():
    """One database URL from a Secret (the in-chart PostgreSQL's, or an external one), one ReadWriteMany blob
    claim, and a hook Job that migrates the schema with the gateway's image before an upgrade."""
    objs = render({})
    gateway = container(find(objs, "Deployment", "-gateway"), "gateway")
    url = next(e for e in gateway["env"] if e["name"] == "CTSCREEN_DATABASE_URL")["valueFrom"]["secretKeyRef"]
    secret = find(objs, "Secret", "-postgresql")
    assert url == {"name": secret["metadata"]["name"], "key": "url"}
    assert secret["stringData"]["url"].startswith("postgresql://ctscreen:")
    assert find(objs, "StatefulSet", "-postgresql")["spec"]["replicas"] == 1
    policy = find(objs, "NetworkPolicy", "-postgresql")
    assert {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in policy["spec"]["ingress"][0]["from"]} \
        == {"gateway", "migrations"}
    claim = find(objs, "PersistentVolumeClaim", "-blobs")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    assert mounts["blobs"] == "/var/lib/ctscreen-blobs"
    job = find(objs, "Job", "-db-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-upgrade"
    assert container(job, "migrate")["command"] == ["ctscreen", "db", "upgrade"]
    assert container(job, "migrate")["image"] == gateway["image"]

    external = render({"state": {"database": {"existingSecret": "ctscreen-db"}, "blobs": {"existingClaim": "nfs"}}})
    assert not [o for o in external if "postgresql" in o["metadata"]["name"]]
    assert not [o for o in external if o["kind"] == "PersistentVolumeClaim"]
    gateway = find(external, "Deployment", "-gateway")
    env = {e["name"]: e for e in container(gateway, "gateway")["env"]}
    assert env["CTSCREEN_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "ctscreen-db", "key": "url"}
    blobs = next(v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == "blobs")
    assert blobs["persistentVolumeClaim"]["claimName"] == "nfs"
    assert find(external, "Job", "-db-migrate")["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"


def test_the_migration_job_reaches_the_database_as_the_gateway_does():
    """A database behind a private CA, or reached with options the gateway gets in extraEnv (a client
    certificate's path, PGSSLMODE): the pre-upgrade migration got neither and failed every upgrade."""
    extra_env = [{"name": "PGSSLROOTCERT", "value": "/etc/pg/root.crt"}]
    mounts = [{"name": "pg-client", "mountPath": "/etc/pg", "readOnly": True}]
    volumes = [{"name": "pg-client", "secret": {"secretName": "pg-client"}}]
    objs = render({"caBundle": {"configMapName": "site-ca"},
                   "gateway": {"extraEnv": extra_env, "extraVolumeMounts": mounts, "extraVolumes": volumes}})
    gateway = find(objs, "Deployment", "-gateway")
    job = find(objs, "Job", "-db-migrate")
    for kind, pod in (("gateway", gateway), ("migrate", job)):
        c = container(pod, kind)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["SSL_CERT_FILE"] == "/etc/ctscreen/ca/ca.crt" and env["PGSSLROOTCERT"] == "/etc/pg/root.crt", kind
        assert {m["name"] for m in c["volumeMounts"]} >= {"ca-bundle", "pg-client"}, kind
        assert {v["name"] for v in pod["spec"]["template"]["spec"]["volumes"]} >= {"ca-bundle", "pg-client"}, kind
    plain = container(find(render({}), "Job", "-db-migrate"), "migrate")
    assert "volumeMounts" not in plain and not [e for e in plain["env"] if e["name"] == "SSL_CERT_FILE"]


def test_gateway_keeps_its_data_folder_on_a_volume():
    """CTSCREEN_DATA_DIR (scratch) is mounted: an emptyDir by default, a PersistentVolumeClaim when named.

    A ReadWriteOnce claim serves one fixed replica; a ReadWriteMany claim every replica, each in a
    folder named after its pod (two gateways never share scratch).
    """
    one = {"autoscaling": {"enabled": False}, "replicas": 1}
    rwx = {"claimName": "ctscreen-results", "claimAccessMode": "ReadWriteMany"}
    for gw, kind, sub in (({}, "emptyDir", None),
                          ({**one, "resultsDir": {"claimName": "ctscreen-results"}}, "persistentVolumeClaim", None),
                          ({"resultsDir": rwx}, "persistentVolumeClaim", "$(POD_NAME)")):
        gateway = find(render({"gateway": gw}), "Deployment", "-gateway")
        mount = next(m for m in container(gateway, "gateway")["volumeMounts"] if m["name"] == "results")
        assert mount["mountPath"] == "/var/lib/ctscreen" and mount.get("subPathExpr") == sub
        volume = next(v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == "results")
        assert kind in volume
    with pytest.raises(helm.HelmError) as info:  # autoscaled replicas on one ReadWriteOnce claim: Multi-Attach
        render({"gateway": {"resultsDir": {"claimName": "ctscreen-results"}}})
    assert "only one pod can mount it" in str(info.value)


def test_a_gateway_on_a_read_write_once_claim_rolls_without_a_surge_pod():
    """The one replica a ReadWriteOnce results claim allows rolled with maxSurge 1: the new pod, which the spread
    over nodes places away from the old one, waited on the claim the old pod holds (Multi-Attach), and the old pod
    left only once the new one was ready: every upgrade stalled until its progress deadline. The old pod now
    leaves first; a ReadWriteMany claim and the default emptyDir keep the surge."""
    one = {"autoscaling": {"enabled": False}, "replicas": 1}
    for gw, surge in (({**one, "resultsDir": {"claimName": "ctscreen-results"}}, (0, 1)),
                      ({**one, "resultsDir": {"claimName": "ctscreen-results", "claimAccessMode": "ReadWriteMany"}},
                       (1, 0)),
                      (one, (1, 0))):
        strategy = find(render({"gateway": gw}), "Deployment", "-gateway")["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert (strategy["rollingUpdate"]["maxSurge"], strategy["rollingUpdate"]["maxUnavailable"]) == surge, gw


def test_triton_service_is_headless_with_a_named_grpc_port(rendered):
    headless = find(rendered["default"], "Service", "-triton-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    grpc = next(p for p in headless["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["port"] == 8001 and grpc["appProtocol"] == "grpc"


def test_only_the_gateway_reaches_triton(rendered):
    policy = find(rendered["production"], "NetworkPolicy", "-triton")
    rules = policy["spec"]["ingress"]
    inference = [r for r in rules if {p["port"] for p in r["ports"]} & {"grpc", "http"}]
    assert len(inference) == 1
    peers = inference[0]["from"]
    assert peers == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "ctscreen", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "gateway"}}}]
    metrics = [r for r in rules if r is not inference[0]]
    assert [p["port"] for r in metrics for p in r["ports"]] == ["metrics"]


def test_triton_hpa_scales_on_backlog_seconds_served_by_the_adapter_rules(rendered):
    hpa = find(rendered["production"], "HorizontalPodAutoscaler", "-triton")
    rules = yaml.safe_load((CHART / "files" / "prometheus-adapter-rules.yaml").read_text())["rules"]
    external = {r["name"]["as"] for r in rules["external"]}
    custom = {r["name"]["as"] for r in rules["custom"]}
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["External"]["external"]["metric"]["name"] in external
    # ctscreen_backlog_seconds is time to drain at current capacity, so the target is a Value
    assert by_type["External"]["external"]["target"] == {"type": "Value", "value": "30"}
    assert by_type["Pods"]["pods"]["metric"]["name"] in custom
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert down["selectPolicy"] == "Min"
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    for rule in rules["custom"] + rules["external"]:
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_metrics_the_chart_reads_are_the_ones_the_gateway_exports():
    """Every ctscreen_* series named by the dashboard, the adapter rules, KEDA and the PrometheusRule exists
    (the gateway's metrics, and the delivery worker's, which registers its own)."""
    exported = (ROOT / "gateway" / "metrics.py").read_text() + (ROOT / "gateway" / "delivery" / "deliverer.py").read_text()
    texts = [(CHART / "dashboards" / "ctscreen-overview.json").read_text(),
             (CHART / "files" / "prometheus-adapter-rules.yaml").read_text(),
             (CHART / "templates" / "triton-scaledobject.yaml").read_text(),
             (CHART / "templates" / "prometheusrule.yaml").read_text()]
    rules = yaml.safe_load(texts[1])["rules"]
    # names the adapter serves (External/Pods API), not series in Prometheus
    derived = {r["name"]["as"] for r in rules["custom"] + rules["external"]}
    names = set(re.findall(r"ctscreen_[a-z_]+", " ".join(texts))) - derived
    assert "ctscreen_backlog_slices" in names
    for name in sorted(names):
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert f'"{base}"' in exported or f"``{base}" in exported, f"{name} is not exported by the gateway"
    assert {"ctscreen_delivery_failures_total", "ctscreen_deliveries_total"} <= names  # the two delivery alerts


def test_dashboard_has_the_panels_ops_need(rendered):
    board = json.loads((CHART / "dashboards" / "ctscreen-overview.json").read_text())
    titles = " | ".join(p["title"].lower() for p in board["panels"])
    for needle in ("cases per hour", "p95", "backlog", "queue / compute", "gpu utilisation"):
        assert needle in titles
    configmap = find(rendered["production"], "ConfigMap", "-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["ctscreen-overview.json"]) == board


def test_blobs_in_an_s3_bucket_need_no_claim():
    """A cluster without ReadWriteMany storage keeps the instances in an S3 bucket: no claim is made or mounted,
    the gateway gets the bucket's URL and the credentials' Secret (or none: IRSA), the volume alert goes, and
    every object stays valid; a bucket name S3 refuses is refused by the values schema."""
    values = _production()
    values["state"]["blobs"] = {"s3": {"bucket": "site-ct", "prefix": "/ctscreen/prod/", "endpoint": "https://minio.site:9000",
                                       "region": "eu-central-1", "credentialsSecret": "ctscreen-s3"}}
    objs = render(values)
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"].endswith("-blobs")]
    gateway = find(objs, "Deployment", "-gateway")
    env = {e["name"]: e for e in container(gateway, "gateway")["env"]}
    assert env["CTSCREEN_BLOB_URL"]["value"] == "s3://site-ct/ctscreen/prod"
    assert env["CTSCREEN_S3_ENDPOINT_URL"]["value"] == "https://minio.site:9000"
    assert env["CTSCREEN_S3_REGION"]["value"] == "eu-central-1"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "ctscreen-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    assert "CTSCREEN_BLOB_DIR" not in env
    spec = gateway["spec"]["template"]["spec"]
    assert "blobs" not in {v["name"] for v in spec["volumes"]}
    assert "blobs" not in {m["name"] for m in container(gateway, "gateway")["volumeMounts"]}
    rules = [r for o in objs if o["kind"] == "PrometheusRule" for g in o["spec"]["groups"] for r in g["rules"]]
    assert rules and "CtscreenBlobVolumeFilling" not in {r.get("alert") for r in rules}
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) not in CRD_SUBSET_SCHEMAS:
            kv.validate(obj, "1.33.0", strict=True)
    assert helm.lint(CHART, values, strict=True)["errors"] == []
    values["state"]["blobs"]["s3"] = {"bucket": "Site_CT", "credentialsSecret": ""}  # IRSA, and a bad name
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] or any(m["severity"] >= 2 for m in report["messages"])
    values["state"]["blobs"]["s3"] = {"bucket": "site-ct"}  # IRSA: no keys in the pod
    env = {e["name"] for e in container(find(render(values), "Deployment", "-gateway"), "gateway")["env"]}
    assert "CTSCREEN_BLOB_URL" in env and "AWS_ACCESS_KEY_ID" not in env
