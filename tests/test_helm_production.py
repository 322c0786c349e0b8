"""The chart on a real GPU cluster, offline: the fleet scaling signal, network openings, alerts, helm test,
and the production values (rendered with the helpers of tests/test_helm_chart.py, which also validates
every object strictly for Kubernetes 1.29-1.33).
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.test_helm_chart import CHART, NAMESPACE, RELEASE, ROOT, container, find, helm, render

FLEET = "ctscreen:backlog_seconds:fleet"


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return render(yaml.safe_load((CHART / "values-production.yaml").read_text()))


def _production(**patch) -> dict:
    values = yaml.safe_load((CHART / "values-production.yaml").read_text())
    for dotted, value in patch.items():
        node = values
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return values


def _rules(objs: list[dict]) -> dict[str, dict]:
    rule = find(objs, "PrometheusRule")
    return {r.get("record") or r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


# --- one fleet-wide scaling signal --------------------------------------------------------------------


def test_the_fleet_signal_sums_raw_backlog_slices_over_triton_fleet_rate_with_a_floor(production):
    from ctscreen.contracts import ENSEMBLE_MODEL

    record = _rules(production)[FLEET]
    expr = " ".join(record["expr"].split())
    numerator, denominator = expr.split(" / ", 1)
    # numerator: the raw per-gateway gauges of this release's gateways, summed
    assert numerator == f'sum(ctscreen_backlog_slices{{namespace="{NAMESPACE}",service="{RELEASE}-gateway"}})'
    # denominator: Triton's own count of ensemble inferences (one per slice), over the whole fleet, with a
    # floor of the nominal rate of the replicas that have the model loaded (at least one): never 0
    triton = (f'nv_inference_count{{namespace="{NAMESPACE}",app_kubernetes_io_instance="{RELEASE}",'
              f'app_kubernetes_io_component="triton",model="{ENSEMBLE_MODEL}"}}')
    assert denominator.startswith(f"clamp_min( sum(rate({triton}[1m])) or vector(0),")
    assert f"scalar(clamp_min(count({triton}) or vector(0), 1)) * 150 )" in denominator
    assert record["labels"] == {"namespace": NAMESPACE, "app_kubernetes_io_instance": RELEASE}
    assert "1e9" not in expr and "Inf" not in expr


def test_adapter_rule_and_keda_query_read_the_fleet_series_and_never_sum_per_gateway_estimates(production):
    external = yaml.safe_load((CHART / "files" / "prometheus-adapter-rules.yaml").read_text())["rules"]["external"]
    (backlog,) = [r for r in external if r["name"]["as"] == "ctscreen_backlog_seconds"]
    assert backlog["seriesQuery"].startswith(FLEET + "{") and backlog["name"]["matches"] == f"^{FLEET}$"
    assert "sum(" not in backlog["metricsQuery"] and "<<.LabelMatchers>>" in backlog["metricsQuery"]
    hpa = find(production, "HorizontalPodAutoscaler", "-triton")
    metric = next(m for m in hpa["spec"]["metrics"] if m["type"] == "External")["external"]["metric"]
    # the HPA's selector picks exactly the series the rule records for this release
    assert metric["selector"]["matchLabels"].items() <= _rules(production)[FLEET]["labels"].items()

    keda = find(render(_production(autoscaling__mode="keda")), "ScaledObject")
    backlog_trigger = next(t for t in keda["spec"]["triggers"] if t["name"] == "backlog-seconds")
    query = backlog_trigger["metadata"]["query"]
    assert query == f'max({FLEET}{{namespace="{NAMESPACE}",app_kubernetes_io_instance="{RELEASE}"}})'
    # no per-gateway seconds anywhere: the gateway does not export them
    exported = (ROOT / "gateway" / "metrics.py").read_text()
    assert '"ctscreen_backlog_seconds"' not in exported and "1e9" not in exported


def test_alerts_cover_backlog_triton_engine_build_and_deliveries(production):
    rules = _rules(production)
    assert {"CtscreenBacklogHigh", "CtscreenNoReadyTriton", "CtscreenEngineBuildFailed",
            "CtscreenDeliveriesFailing"} <= rules.keys()
    assert rules["CtscreenBacklogHigh"]["expr"].startswith(FLEET) and "> 300" in rules["CtscreenBacklogHigh"]["expr"]
    assert f'deployment="{RELEASE}-triton"' in rules["CtscreenNoReadyTriton"]["expr"]
    assert 'container="build-engines"' in rules["CtscreenEngineBuildFailed"]["expr"]
    assert "ctscreen_delivery_failures_total" in rules["CtscreenDeliveriesFailing"]["expr"]
    assert all(r["labels"]["severity"] in {"warning", "critical"} for n, r in rules.items() if n != FLEET)
    assert find(production, "PrometheusRule")["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# --- network openings ------------------------------------------------------------------------------------


def test_network_policy_admits_the_prometheus_pods_and_the_dicom_sources(production):
    values = _production()
    prometheus = {"namespaceSelector": values["networkPolicy"]["metricsNamespaceSelector"],
                  "podSelector": values["networkPolicy"]["metricsPodSelector"]}
    assert prometheus["podSelector"] and prometheus["namespaceSelector"]
    gateway = find(production, "NetworkPolicy", "-gateway")["spec"]["ingress"]

    def peers(rules, port):
        return [p for r in rules if {"port": port, "protocol": "TCP"} in r["ports"] for p in r.get("from", [{}])]

    assert prometheus in peers(gateway, "http"), "Prometheus must scrape the gateway's /metrics"
    sources = values["gateway"]["dicom"]["sources"]
    assert sources and peers(gateway, "dicom") == [{"ipBlock": {"cidr": c}} for c in sources]
    assert not any("ipBlock" in p for p in peers(gateway, "http"))
    triton = find(production, "NetworkPolicy", "-triton")["spec"]["ingress"]
    assert peers(triton, "metrics") == [prometheus]
    # the DICOM Service keeps the sender's address (Local) so affinity and the ipBlocks see the PACS
    svc = find(production, "Service", "-gateway-dicom")["spec"]
    assert svc["externalTrafficPolicy"] == "Local" and svc["sessionAffinity"] == "ClientIP"
    assert svc["loadBalancerSourceRanges"] == sources
    clusterip = find(render(_production(gateway__dicom__service={"type": "ClusterIP", "port": 104})),
                     "Service", "-gateway-dicom")["spec"]
    assert "externalTrafficPolicy" not in clusterip  # only valid for LoadBalancer and NodePort


def test_helm_test_pod_screens_one_study_through_the_gateway_and_may_reach_it(production):
    pod = find(production, "Pod", "-smoke-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["CTSCREEN_URL"] == f"http://{RELEASE}-gateway:80"
    script = c["args"][-1]
    assert "/readyz" in script and "ctscreen phantom --out /tmp/study" in script
    assert "ctscreen screen" in script and pod["spec"]["restartPolicy"] == "Never"
    gateway = find(production, "NetworkPolicy", "-gateway")["spec"]["ingress"]
    labels = pod["metadata"]["labels"]
    assert any(all(labels.get(k) == v for k, v in p.get("podSelector", {}).get("matchLabels", {}).items())
               and "namespaceSelector" not in p for r in gateway for p in r.get("from", [])), \
        "the gateway's NetworkPolicy must admit the test pod"


# --- Triton pod on real GPU nodes ----------------------------------------------------------------------


def test_triton_keeps_the_ngc_entrypoint(production):
    deployment = find(production, "Deployment", "-triton")
    for name, init in (("triton", False), ("build-engines", True)):
        c = container(deployment, name, init=init)
        assert "command" not in c, f"{name}: command replaces the NGC entrypoint (CUDA forward compatibility)"
    assert container(deployment, "triton")["args"][0] == "tritonserver"


@pytest.mark.parametrize(("resource", "mig"), [("nvidia.com/mig-1g.10gb", "1g.10gb"),
                                                ("nvidia.com/gpu.shared", None)])
def test_gpu_resource_name_comes_from_values_and_reaches_the_cache_key(resource, mig):
    deployment = find(render(_production(triton__gpuResource=resource)), "Deployment", "-triton")
    for name, init in (("triton", False), ("build-engines", True)):
        limits = container(deployment, name, init=init)["resources"]["limits"]
        assert limits[resource] == 1 and "nvidia.com/gpu" not in limits
    env = {e["name"]: e["value"] for e in container(deployment, "build-engines", init=True)["env"]}
    assert env["GPU_RESOURCE"] == resource and env.get("MIG_PROFILE") == mig


def test_production_rollout_disruption_priority_and_spread(production):
    values = _production()
    triton = find(production, "Deployment", "-triton")
    assert triton["spec"]["progressDeadlineSeconds"] > values["triton"]["engines"].get("buildTimeoutSeconds", 1800)
    assert triton["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    for pdb in (o for o in production if o["kind"] == "PodDisruptionBudget"):
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", pdb["metadata"]["name"]
    spec = triton["spec"]["template"]["spec"]
    (pc,) = [o for o in production if o["kind"] == "PriorityClass"]
    assert pc["metadata"]["name"] == spec["priorityClassName"] == "ctscreen-inference"
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "triton"
    standard = ("kubernetes.io/", "node.kubernetes.io/", "topology.kubernetes.io/", "nvidia.com/",
                "feature.node.kubernetes.io/")
    for deployment in (o for o in production if o["kind"] == "Deployment"):
        for key in deployment["spec"]["template"]["spec"].get("nodeSelector", {}):
            assert key.startswith(standard), f"non-standard node label {key}"
    assert spec["serviceAccountName"] == f"{RELEASE}-triton" and spec["automountServiceAccountToken"] is False


def test_user_affinity_is_kept_next_to_the_gpu_products_and_the_spread():
    user = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [
                    {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["p4d"]}]}}]},
        "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 5, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                              "labelSelector": {"matchLabels": {"app": "cache"}}}}]},
        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "training"}}}]},
    }
    spec = find(render(_production(triton__affinity=user)), "Deployment", "-triton")["spec"]["template"]["spec"]
    aff = spec["affinity"]
    (term,) = aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [e["key"] for e in term["matchExpressions"]] == ["topology.kubernetes.io/zone", "nvidia.com/gpu.product"]
    assert aff["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == \
        user["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert aff["podAffinity"] == user["podAffinity"]
    anti = aff["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"] == \
        user["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == \
        "kubernetes.io/hostname"


def test_escape_hatches_and_ca_bundle_reach_both_pods():
    hatches = {"extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
               "extraVolumes": [{"name": "extra", "emptyDir": {}}],
               "extraVolumeMounts": [{"name": "extra", "mountPath": "/extra"}],
               "initContainers": [{"name": "wait-for-storage", "image": "busybox:1.36", "args": ["true"]}],
               "podLabels": {"team": "radiology"}, "podAnnotations": {"example.org/owner": "ops"}}
    values = _production(triton__serviceAccount={"create": True, "name": "triton-sa",
                                                 "annotations": {"eks.amazonaws.com/role-arn": "arn:x"}},
                         caBundle={"configMapName": "hospital-ca", "key": "ca.pem"})
    for component in ("triton", "gateway"):
        values[component].update(hatches)
    objs = render(values)
    for component in ("triton", "gateway"):
        deployment = find(objs, "Deployment", f"-{component}")
        pod = deployment["spec"]["template"]
        c = container(deployment, component)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HTTPS_PROXY"] == "http://proxy:3128" and env["SSL_CERT_FILE"] == "/etc/ctscreen/ca/ca.crt"
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["extra"] == "/extra" and mounts["ca-bundle"] == "/etc/ctscreen/ca"
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["ca-bundle"]["configMap"] == {"name": "hospital-ca", "items": [{"key": "ca.pem", "path": "ca.crt"}]}
        assert "extra" in volumes and pod["spec"]["initContainers"][0]["name"] == "wait-for-storage"
        assert pod["metadata"]["labels"]["team"] == "radiology"
        assert pod["metadata"]["annotations"]["example.org/owner"] == "ops"
    sa = find(objs, "ServiceAccount", "triton-sa")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:x"}
    fetch = container(find(objs, "Deployment", "-triton"), "fetch-models", init=True)
    assert {"name": "AWS_CA_BUNDLE", "value": "/etc/ctscreen/ca/ca.crt"} in fetch["env"]


def test_image_digests_are_allowed_and_pinned():
    digest = "sha256:" + "ab" * 32
    values = _production(triton__image={**_production()["triton"]["image"], "digest": digest})
    values["gateway"]["image"]["digest"] = digest
    objs = render(values)
    assert container(find(objs, "Deployment", "-triton"), "triton")["image"].endswith(f":24.10-py3@{digest}")
    assert container(find(objs, "Deployment", "-gateway"), "gateway")["image"].endswith(f":0.1.0@{digest}")
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as info:
        chart.validate_schema({"gateway": {"image": {"digest": "latest"}}})
    assert "/gateway/image/digest" in str(info.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"triton": {"gpuResource": "gpu"}}, "/triton/gpuResource"),
        ({"gateway": {"dicom": {"sources": ["pacs.example.org"]}}}, "/gateway/dicom/sources/0"),
        ({"triton": {"pdb": {"unhealthyPodEvictionPolicy": "Never"}}}, "/triton/pdb/unhealthyPodEvictionPolicy"),
        ({"triton": {"rollout": {"progressDeadlineSeconds": 5}}}, "/triton/rollout/progressDeadlineSeconds"),
        ({"autoscaling": {"fleetSignal": {"nominalSlicesPerSecondPerReplica": 0}}},
         "/autoscaling/fleetSignal/nominalSlicesPerSecondPerReplica"),
    ],
)
def test_schema_rejects_bad_production_values(values, message):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as info:
        chart.validate_schema(values)
    assert message in str(info.value)


@pytest.mark.parametrize("component", ["triton", "gateway"])
def test_replicas_are_left_to_the_autoscaler_without_a_reset(component):
    """Autoscaled: no replicas field offline (the chart keeps the live count with lookup on a cluster)."""
    fixed = _production(autoscaling__mode="none", gateway__autoscaling={"enabled": False})
    assert find(render(fixed), "Deployment", f"-{component}")["spec"]["replicas"] >= 1
    assert "replicas" not in find(render(_production()), "Deployment", f"-{component}")["spec"]
    template = (CHART / "templates" / f"{component}-deployment.yaml").read_text()
    assert re.search(r'include "ctscreen.replicas"', template)
