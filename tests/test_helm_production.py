"""The chart on a real GPU cluster, offline: the fleet scaling signal, network openings, alerts, helm test,
and the production values (rendered with the helpers of tests/test_helm_chart.py, which also validates
every object strictly for Kubernetes 1.29-1.33).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from tests.test_helm_chart import CHART, NAMESPACE, RELEASE, ROOT, VALUE_SETS, container, find, helm, render

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


def test_every_rule_on_gateway_series_selects_the_service_the_servicemonitor_scrapes(production):
    """The Prometheus operator labels each scraped series with the name of the Service it came through. The
    rules selected service="<release>-gateway" while /metrics is served only through <release>-gateway-metrics:
    the fleet signal was always empty (Triton never scaled up) and the gateway alerts could never fire."""
    monitor = find(production, "ServiceMonitor", "-gateway")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    scraped = [o["metadata"]["name"] for o in production if o["kind"] == "Service"
               and wanted.items() <= (o["metadata"].get("labels") or {}).items()]
    assert len(scraped) == 1, scraped
    selected = {m for r in _rules(production).values() for m in re.findall(r'service="([^"]+)"', r["expr"])}
    assert selected == set(scraped), (selected, scraped)


def test_the_fleet_signal_sums_raw_backlog_slices_over_triton_fleet_rate_with_a_floor(production):
    from ctscreen.contracts import ENSEMBLE_MODEL

    record = _rules(production)[FLEET]
    expr = " ".join(record["expr"].split())
    numerator, denominator = expr.split(" / ", 1)
    # numerator: the raw per-gateway gauges of this release's gateways, summed
    assert numerator == f'sum(ctscreen_backlog_slices{{namespace="{NAMESPACE}",service="{RELEASE}-gateway-metrics"}})'
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
    assert all(r["labels"]["severity"] in {"warning", "critical"} for r in rules.values() if "alert" in r)
    assert find(production, "PrometheusRule")["metadata"]["labels"]["release"] == "kube-prometheus-stack"



def test_alerts_watch_the_intake_and_the_volumes_and_name_their_runbook(production):
    """Senders told to retry (0xA700 / 503) and the volumes filling (the blob claim; the in-chart
    PostgreSQL's claim, not an external database's) alert before the intake refuses everything; each
    alert names its section of the chart README's runbook when a base URL is set."""
    rules = _rules(production)
    refusing = rules["CtscreenIntakeRefusing"]["expr"]
    assert "ctscreen_errors_total" in refusing and 'reason=~"out_of_resources.*|store_unavailable|association_limit"' in refusing
    blobs = rules["CtscreenBlobVolumeFilling"]["expr"]
    assert f'persistentvolumeclaim="{RELEASE}-blobs"' in blobs and "< 0.15" in blobs
    assert "CtscreenDatabaseVolumeFilling" not in rules  # production: an external database (existingSecret)
    base = _production()["monitoring"]["prometheusRule"]["runbookBaseUrl"]
    alerts = {n: r for n, r in rules.items() if "alert" in r}
    assert {r["annotations"]["runbook_url"] for r in alerts.values()} == {f"{base}#{n.lower()}" for n in alerts}
    runbook = (ROOT / "helm" / "ctscreen" / "README.md").read_text().split("## Runbook", 1)[1]
    assert all(f"### {n}" in runbook for n in alerts), "every alert has its runbook section"
    in_chart = _rules(render({"monitoring": {"prometheusRule": {"enabled": True}}}))
    claim = f'persistentvolumeclaim="data-{RELEASE}-postgresql-0"'
    assert claim in in_chart["CtscreenDatabaseVolumeFilling"]["expr"]
    assert all("runbook_url" not in r["annotations"] for r in in_chart.values() if "alert" in r)
    pg = find(render({}), "StatefulSet", "-postgresql")
    assert f"{pg['spec']['volumeClaimTemplates'][0]['metadata']['name']}-{pg['metadata']['name']}-0" \
        == claim.split('"')[1]  # the claim the StatefulSet makes for its pod 0


def test_slo_burn_rate_alerts_read_indicators_the_gateway_exports(production):
    """Two SLOs (studies with a verdict; studies with a verdict within slo.latencySeconds of their last
    instance received or their upload accepted), each recorded over the four windows of the multiwindow
    burn-rate alert and alerted on when a 30-day budget burns 14.4x (1 h, confirmed over 5 min) or 6x
    (6 h, confirmed over 30 min). The latency indicator
    reads the histogram bucket the gateway exports, by its exact le label."""
    from prometheus_client import generate_latest

    from gateway.metrics import Metrics

    rules = _rules(production)
    for sli in ("studies_without_verdict", "studies_slow"):
        for window in ("5m", "30m", "1h", "6h"):
            recorded = rules[f"ctscreen:{sli}:ratio_rate{window}"]
            assert f"[{window}]" in recorded["expr"] and recorded["labels"]["app_kubernetes_io_instance"] == RELEASE
    slow = rules["ctscreen:studies_slow:ratio_rate1h"]["expr"]
    (le,) = re.findall(r'le="([^"]+)"', slow)
    # the study's turnaround (its last instance, or its upload's acceptance, to the verdict: the quiet period
    # and the queue count), not the stage total, which starts when the job is created
    assert "ctscreen_study_turnaround_seconds_bucket" in slow and "ctscreen_study_turnaround_seconds_count" in slow
    assert "ctscreen_stage_seconds" not in slow
    metrics = Metrics()
    for origin in ("upload", "stow"):
        metrics.turnaround.labels(origin, "routine").observe(1.0)
        assert f'ctscreen_study_turnaround_seconds_bucket{{le="{le}",origin="{origin}",priority="routine"}} 1.0' \
            in generate_latest(metrics.registry).decode()
    assert float(le) == yaml.safe_load((CHART / "values.yaml").read_text())["monitoring"]["prometheusRule"]["slo"]["latencySeconds"]
    verdicts = rules["CtscreenVerdictBudgetBurn"]["expr"]
    assert "ratio_rate1h" in verdicts and "> 0.144" in verdicts and "> 0.06" in verdicts  # 1 - 0.99
    assert "ctscreen:studies_slow:ratio_rate5m" in rules["CtscreenLatencyBudgetBurn"]["expr"]
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match="latencySeconds"):
        chart.validate_schema({"monitoring": {"prometheusRule": {"slo": {"latencySeconds": 90}}}})


# --- network openings ------------------------------------------------------------------------------------


def test_network_policy_admits_the_prometheus_pods_and_the_dicom_sources(production):
    values = _production()
    prometheus = {"namespaceSelector": values["networkPolicy"]["metricsNamespaceSelector"],
                  "podSelector": values["networkPolicy"]["metricsPodSelector"]}
    assert prometheus["podSelector"] and prometheus["namespaceSelector"]
    gateway = find(production, "NetworkPolicy", "-gateway")["spec"]["ingress"]

    def peers(rules, port):
        return [p for r in rules if {"port": port, "protocol": "TCP"} in r["ports"] for p in r.get("from", [{}])]

    assert prometheus in peers(gateway, "metrics"), "Prometheus must scrape the gateway's /metrics"
    assert prometheus not in peers(gateway, "http"), "/metrics has a port of its own"
    sources = values["gateway"]["dicom"]["sources"]
    assert sources and peers(gateway, "dicom") == [{"ipBlock": {"cidr": c}} for c in sources]
    assert not any("ipBlock" in p for p in peers(gateway, "http"))
    triton = find(production, "NetworkPolicy", "-triton")["spec"]["ingress"]
    assert peers(triton, "metrics") == [prometheus]
    # the DICOM Service keeps the sender's address (Local) so affinity and the ipBlocks see the PACS
    svc = find(production, "Service", "-gateway-dicom")["spec"]
    assert svc["externalTrafficPolicy"] == "Local" and "sessionAffinity" not in svc  # the state store groups a study
    assert svc["loadBalancerSourceRanges"] == sources
    clusterip = find(render(_production(gateway__dicom__service={"type": "ClusterIP", "port": 104})),
                     "Service", "-gateway-dicom")["spec"]
    assert "externalTrafficPolicy" not in clusterip  # only valid for LoadBalancer and NodePort


def test_a_load_balancer_that_health_checks_the_pods_is_admitted_to_the_dicom_port_only() -> None:
    """An AWS NLB with IP targets health-checks the pods' DICOM port from its subnets: the NetworkPolicy
    dropped those checks, every target read unhealthy and no study arrived. Its subnets are admitted by
    the NetworkPolicy, to the DICOM port only, and do not widen loadBalancerSourceRanges."""
    values = _production()
    sources = values["gateway"]["dicom"]["sources"]
    checks = ["10.0.64.0/24", "10.0.65.0/24"]
    objs = render(_production(gateway__dicom__healthCheckSources=checks))
    rules = find(objs, "NetworkPolicy", "-gateway")["spec"]["ingress"]
    dicom = [p["ipBlock"]["cidr"] for r in rules if {"port": "dicom", "protocol": "TCP"} in r["ports"] for p in r["from"]]
    assert dicom == sources + checks
    others = [p for r in rules if {"port": "dicom", "protocol": "TCP"} not in r["ports"] for p in r.get("from", [])]
    assert not [p for p in others if p.get("ipBlock", {}).get("cidr") in checks]
    assert find(objs, "Service", "-gateway-dicom")["spec"]["loadBalancerSourceRanges"] == sources


def test_an_api_load_balancer_does_not_publish_the_metrics_port() -> None:
    """gateway.service.type LoadBalancer puts the API on the load balancer and nothing else: /metrics
    stays on its own ClusterIP Service, which the ServiceMonitor scrapes."""
    objs = render(_production(gateway__service__type="LoadBalancer"))
    api = find(objs, "Service", "-gateway")["spec"]
    assert api["type"] == "LoadBalancer" and [p["name"] for p in api["ports"]] == ["http"]
    metrics = find(objs, "Service", "-gateway-metrics")["spec"]
    assert metrics["type"] == "ClusterIP" and [p["name"] for p in metrics["ports"]] == ["metrics"]
    published = [p["name"] for o in objs if o["kind"] == "Service" and o["spec"].get("type") in ("LoadBalancer", "NodePort")
                 for p in o["spec"]["ports"]]
    assert "metrics" not in published and "http" in published


def test_helm_test_pod_screens_one_study_through_the_gateway_and_may_reach_it(production):
    pod = find(production, "Pod", "-smoke-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CTSCREEN_URL"] == f"http://{RELEASE}-gateway:80"
    # the gateway wants a credential in production: an API key from a Secret, never a literal
    token = next(e for e in c["env"] if e["name"] == "CTSCREEN_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "ctscreen-helm-test-key", "key": "token"}}
    script = c["args"][-1]
    assert "/readyz/triton" in script and "ctscreen phantom --out /tmp/study" in script
    assert "ctscreen screen" in script and pod["spec"]["restartPolicy"] == "Never"
    gateway = find(production, "NetworkPolicy", "-gateway")["spec"]["ingress"]
    labels = pod["metadata"]["labels"]
    assert any(all(labels.get(k) == v for k, v in p.get("podSelector", {}).get("matchLabels", {}).items())
               and "namespaceSelector" not in p for r in gateway for p in r.get("from", [])), \
        "the gateway's NetworkPolicy must admit the test pod"


def _pod_secret_names(node) -> set[str]:
    """The Secrets a rendered object's pods read: env, envFrom, volumes, image pull secrets."""
    names: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretKeyRef", "secretRef"):
                names.add(value["name"])
            elif key == "secret" and isinstance(value, dict) and "secretName" in value:
                names.add(value["secretName"])
            elif key == "imagePullSecrets":
                names.update(s["name"] for s in value)
            else:
                names |= _pod_secret_names(value)
    elif isinstance(node, list):
        for item in node:
            names |= _pod_secret_names(item)
    return names


def test_the_install_steps_create_every_secret_the_production_pods_read(production):
    """The chart README's production install never created ctscreen-db (state.database.existingSecret):
    the gateways and the migrations Job could not start. Every Secret a pod reads is rendered by the chart,
    created by a ``kubectl create secret`` step, or issued by cert-manager from a step's Certificate."""
    readme = (CHART / "README.md").read_text()
    steps = readme.split("## Install on a real cluster", 1)[1].split("\n## ", 1)[0]
    rendered = {o["metadata"]["name"] for o in production if o["kind"] == "Secret"}
    missing = sorted(name for name in _pod_secret_names(production) - rendered
                     if not re.search(rf"create secret [\w-]+ {re.escape(name)}\b", steps)
                     and f"secretName {name}" not in steps)
    assert missing == []


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
    values["state"]["database"] = {**values["state"]["database"], "existingSecret": ""}
    values["state"]["database"].setdefault("postgresql", {}).setdefault("image", {})["digest"] = digest
    objs = render(values)
    (pg,) = [o for o in objs if o["kind"] == "StatefulSet"]
    assert pg["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":15@{digest}")
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


# --- security (issue 14 item 7): auth from Secrets, DICOM TLS, closed NetworkPolicy, Ingress TLS --------------


def _gateway_env(objs: list[dict]) -> tuple[dict, dict, dict]:
    """The gateway container's env entries, its mounts and the pod's volumes, each by name."""
    deployment = find(objs, "Deployment", "-gateway")
    c = container(deployment, "gateway")
    return ({e["name"]: e for e in c["env"]}, {m["name"]: m for m in c.get("volumeMounts", [])},
            {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]})


def _settings_in_the_pod(objs: list[dict], monkeypatch):
    """gateway.settings.Settings as the pod builds it: literal values, and secretKeyRef resolved from the
    Secrets the chart renders (a Secret the chart does not own stands for its name)."""
    from gateway.settings import Settings

    secrets = {o["metadata"]["name"]: o.get("stringData", {}) for o in objs if o["kind"] == "Secret"}
    env, _, _ = _gateway_env(objs)
    for name in [n for n in __import__("os").environ if n.startswith("CTSCREEN_")]:
        monkeypatch.delenv(name)
    for name, entry in env.items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["secretKeyRef"]
            stand_in = (f"postgresql://ctscreen@{ref['name']}.example/ctscreen" if name == "CTSCREEN_DATABASE_URL"
                        else f"https://{ref['name']}.example")
            monkeypatch.setenv(name, secrets.get(ref["name"], {}).get(ref["key"], stand_in))
    return Settings()


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_gateway_listens_on_every_address_so_it_is_held_to_the_auth_requirement(value_set, monkeypatch):
    """CTSCREEN_HOST=0.0.0.0: the gateway's own exposure check applies in the pod. Default values (no auth)
    refuse to start, production starts, gateway.auth.insecure starts (and says so in the notes)."""
    from gateway.auth import AuthConfigError, check_exposure

    values = VALUE_SETS[value_set]()
    objs = render(values)
    env, _, _ = _gateway_env(objs)
    assert env["CTSCREEN_HOST"] == {"name": "CTSCREEN_HOST", "value": "0.0.0.0"}
    command = container(find(objs, "Deployment", "-gateway"), "gateway")["command"]
    assert command[command.index("--host") + 1] == "0.0.0.0"  # the address uvicorn binds is the one checked
    settings = _settings_in_the_pod(objs, monkeypatch)
    assert settings.host == "0.0.0.0"
    if value_set == "default":
        with pytest.raises(AuthConfigError, match="refusing to listen on 0.0.0.0 without authentication"):
            check_exposure(settings, settings.host)
        insecure = render({"gateway": {"auth": {"insecure": True}}})
        assert _gateway_env(insecure)[0]["CTSCREEN_AUTH_INSECURE"]["value"] == "true"
        check_exposure(_settings_in_the_pod(insecure, monkeypatch), "0.0.0.0")
    else:
        check_exposure(settings, settings.host)  # OIDC + API keys; DICOM with an AE allow-list
        assert settings.auth_oidc_issuer == values["gateway"]["auth"]["oidcIssuer"]
        assert settings.auth_oidc_audience == "ctscreen"
        assert settings.dicom_allowed_peers == values["gateway"]["dicom"]["allowedPeers"]
        assert settings.dicom_urgent_ae_titles == values["gateway"]["dicom"]["urgentAeTitles"] == ["CT_SCANNER_1"]


def test_auth_settings_reach_the_pod_from_secrets_never_as_literals(production):
    values = _production()
    env, mounts, volumes = _gateway_env(production)
    # OIDC: secretKeyRef into the chart's own Secret, which holds the (public) issuer and audience
    for name, key in (("CTSCREEN_AUTH_OIDC_ISSUER", "oidcIssuer"), ("CTSCREEN_AUTH_OIDC_AUDIENCE", "oidcAudience")):
        assert "value" not in env[name]
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": f"{RELEASE}-gateway-auth", "key": key}}
    secret = find(production, "Secret", "-gateway-auth")
    assert secret["stringData"] == {"oidcIssuer": values["gateway"]["auth"]["oidcIssuer"], "oidcAudience": "ctscreen"}
    # API keys: the hashed key file from the named Secret, mounted read-only, the whole Secret (no subPath:
    # an updated Secret, a revoked key, reaches the running pod)
    path = env["CTSCREEN_AUTH_API_KEYS_FILE"]["value"]
    mount = mounts["api-keys"]
    assert path == f"{mount['mountPath']}/api-keys.json" and mount["readOnly"] is True and "subPath" not in mount
    assert volumes["api-keys"]["secret"] == {"secretName": "ctscreen-api-keys", "defaultMode": 0o440,
                                             "items": [{"key": "api-keys.json", "path": "api-keys.json"}]}
    # nothing else about auth is literal
    assert {n for n, e in env.items() if n.startswith("CTSCREEN_AUTH_") and "value" in e} == {"CTSCREEN_AUTH_API_KEYS_FILE"}
    # an operator-managed Secret replaces the chart's
    own = render(_production(gateway__auth={"existingSecret": "idp-settings", "insecure": False}))
    assert not [o for o in own if o["kind"] == "Secret"]
    env, mounts, _ = _gateway_env(own)
    assert env["CTSCREEN_AUTH_OIDC_ISSUER"]["valueFrom"]["secretKeyRef"] == {"name": "idp-settings", "key": "oidcIssuer"}
    assert "CTSCREEN_AUTH_API_KEYS_FILE" not in env and "api-keys" not in mounts


def test_dicom_tls_certificates_are_mounted_from_a_cert_manager_secret(production, monkeypatch):
    env, mounts, volumes = _gateway_env(production)
    mount = mounts["dicom-tls"]
    assert mount["readOnly"] is True and "subPath" not in mount
    assert volumes["dicom-tls"]["secret"]["secretName"] == "ctscreen-dicom-tls"
    items = {i["key"]: i["path"] for i in volumes["dicom-tls"]["secret"]["items"]}
    assert items == {"tls.crt": "tls.crt", "tls.key": "tls.key", "ca.crt": "ca.crt"}  # cert-manager's layout
    settings = _settings_in_the_pod(production, monkeypatch)
    assert (str(settings.dicom_tls_cert), str(settings.dicom_tls_key), str(settings.dicom_tls_ca)) == tuple(
        f"{mount['mountPath']}/{f}" for f in ("tls.crt", "tls.key", "ca.crt"))
    # not mutual: no CA, so peers need no certificate; no secret: plain DICOM
    one_way = render(_production(gateway__dicom__tls={"secretName": "ctscreen-dicom-tls", "mutual": False}))
    env, _, volumes = _gateway_env(one_way)
    assert "CTSCREEN_DICOM_TLS_CERT" in env and "CTSCREEN_DICOM_TLS_CA" not in env
    assert [i["key"] for i in volumes["dicom-tls"]["secret"]["items"]] == ["tls.crt", "tls.key"]
    plain = render(_production(gateway__dicom__tls={"secretName": "", "mutual": True}))
    env, mounts, volumes = _gateway_env(plain)
    assert not [n for n in env if n.startswith("CTSCREEN_DICOM_TLS")] and "dicom-tls" not in mounts | volumes


def test_dicom_needs_an_ae_allow_list_unless_insecure():
    with pytest.raises(helm.HelmError) as info:
        render(_production(gateway__dicom__allowedPeers=[]))
    assert "gateway.dicom.enabled needs gateway.dicom.allowedPeers" in str(info.value)
    render(_production(gateway__dicom__allowedPeers=[], gateway__auth={"insecure": True}))


def test_production_without_ingress_tls_fails_to_render(tmp_path):
    for tls in ("", None):
        values = _production(gateway__ingress__tlsSecretName=tls)
        if tls is None:
            del values["gateway"]["ingress"]["tlsSecretName"]
            values["gateway"]["ingress"]["tlsSecretName"] = None  # a --set ...=null
        with pytest.raises(helm.HelmError) as info:
            render(values)
        assert "tlsSecretName" in str(info.value)
    # without the schema (helm --skip-schema-validation) the Ingress template itself refuses
    unchecked = tmp_path / "ctscreen"
    shutil.copytree(CHART, unchecked)
    (unchecked / "values.schema.json").unlink()
    with helm.Chart.load(unchecked) as chart, pytest.raises(helm.HelmError) as info:
        chart.render(_production(gateway__ingress__tlsSecretName=""), name=RELEASE, namespace=NAMESPACE,
                     is_install=True)
    assert "gateway-ingress.yaml" in str(info.value) and "an enabled ingress must terminate TLS" in str(info.value)
    ingress = find(render(_production()), "Ingress")
    assert ingress["spec"]["tls"] == [{"hosts": [_production()["gateway"]["ingress"]["host"]],
                                      "secretName": "ctscreen-tls"}]


def test_default_network_policy_admits_only_the_documented_sources(rendered_default):
    """Closed by default: the gateway's HTTP port admits the Prometheus pods and the helm test pod, nothing
    else; the DICOM port nobody until gateway.dicom.sources/allowFrom name the senders; Triton only the
    gateway (gRPC, HTTP) and Prometheus (metrics). Every rule names its peers (a rule without `from`, or
    with an empty selector, would admit every pod)."""
    policies = {o["metadata"]["name"]: o["spec"] for o in rendered_default if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {f"{RELEASE}-gateway", f"{RELEASE}-triton", f"{RELEASE}-postgresql"}
    for spec in policies.values():
        assert spec["policyTypes"] == ["Ingress"]
        for rule in spec["ingress"]:
            assert rule.get("from"), rule
            for peer in rule["from"]:
                assert peer.get("podSelector") or peer.get("ipBlock"), f"peer {peer} admits every pod"
    prometheus = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    smoke = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "smoke-test",
                                             "app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/name": "ctscreen"}}}
    gateway = [(r["ports"], r["from"]) for r in policies[f"{RELEASE}-gateway"]["ingress"]]
    http, metrics = [{"port": "http", "protocol": "TCP"}], [{"port": "metrics", "protocol": "TCP"}]
    assert gateway == [(metrics, [prometheus]), (http, [smoke])]
    triton = [r["from"] for r in policies[f"{RELEASE}-triton"]["ingress"]]
    assert triton[1] == [prometheus] and len(triton) == 2
    assert triton[0][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    # the in-chart PostgreSQL (issue 13): the gateways and the migrations Job, nothing else
    database = [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                for r in policies[f"{RELEASE}-postgresql"]["ingress"] for p in r["from"]]
    assert database == ["gateway", "migrations"]
    # DICOM on, no sources: still closed; each documented opening adds exactly its peers
    dicom = {"enabled": True, "allowedPeers": ["PACS@10.0.0.5"]}
    closed = find(render({"gateway": {"dicom": dicom}}), "NetworkPolicy", "-gateway")["spec"]["ingress"]
    assert not [r for r in closed if {"port": "dicom", "protocol": "TCP"} in r["ports"]]
    ingress_nginx = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    opened = find(render({"gateway": {"dicom": {**dicom, "sources": ["10.0.0.5/32"]}},
                          "networkPolicy": {"gatewayIngressFrom": [ingress_nginx]}}), "NetworkPolicy", "-gateway")
    rules = [(r["ports"], r["from"]) for r in opened["spec"]["ingress"]]
    assert (http, [ingress_nginx]) in rules
    assert ([{"port": "dicom", "protocol": "TCP"}], [{"ipBlock": {"cidr": "10.0.0.5/32"}}]) in rules
    assert len(rules) == 4
    # the Prometheus opening must name pods: cleared (null; a {} merges with the default), the render fails
    with pytest.raises(helm.HelmError) as info:
        render({"networkPolicy": {"metricsPodSelector": None}})
    assert "networkPolicy.metricsPodSelector must select the Prometheus pods" in str(info.value)


@pytest.fixture(scope="module")
def rendered_default() -> list[dict]:
    return render({})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"auth": {"oidcIssuer": "http://idp.example.org", "insecure": False}}}, "/gateway/auth/oidcIssuer"),
        ({"gateway": {"auth": {"oidcIssuer": "https://idp.example.org", "insecure": False}}}, "oidcAudience"),
        ({"gateway": {"auth": {"apiKeysSecret": "Keys!", "insecure": False}}}, "/gateway/auth/apiKeysSecret"),
        ({"gateway": {"auth": {"apiKey": "cts_0123456789ab_secret", "insecure": False}}},
         "additional properties 'apiKey' not allowed"),  # no literal credentials in values
        ({"gateway": {"dicom": {"allowedPeers": ["PACS"]}}}, "/gateway/dicom/allowedPeers/0"),
        ({"gateway": {"dicom": {"tls": {"secretName": "Bad_Name", "mutual": True}}}}, "/gateway/dicom/tls/secretName"),
        ({"networkPolicy": {"enabled": True, "gatewayIngressFrom": [{}]}}, "/networkPolicy/gatewayIngressFrom/0"),
    ],
)
def test_schema_rejects_insecure_or_literal_security_values(values, message):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as info:
        chart.validate_schema(values)
    assert message in str(info.value)


def test_gateway_image_holds_itself_to_the_auth_requirement_where_it_binds():
    """`docker run` of the image without the chart: CMD binds 0.0.0.0 and CTSCREEN_HOST says so."""
    text = (ROOT / "helm" / "gateway.Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert re.search(r"^ENV CTSCREEN_HOST=(\S+)$", text, re.M).group(1) == cmd[cmd.index("--host") + 1]


def test_gateway_image_runs_the_charts_server_command():
    """`docker run` of the image ran plain ``uvicorn --factory``, whose httptools parser bounds no request head (one
    connection sending a huge header stalled the gateway): the chart's command names ``--http
    gateway.httpserver:BoundedHttpToolsProtocol``, the image's did not. CMD is the chart's command and its port."""
    text = (ROOT / "helm" / "gateway.Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    values = yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]
    assert cmd == [*values["command"], "--port", str(values["port"])]
    assert re.search(r"^EXPOSE (\d+)$", text, re.M).group(1) == str(values["port"])


def test_runtime_class_and_a_writable_cuda_cache_reach_the_triton_pod():
    """k3s, RKE2 and the GPU Operator without a default nvidia runtime need runtimeClassName; the read-only
    root filesystem leaves CUDA's JIT cache ($HOME/.nv) nowhere to go unless HOME points at /tmp."""
    deployment = find(render(_production(triton__runtimeClassName="nvidia")), "Deployment", "-triton")
    assert deployment["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    for c in (container(deployment, "triton"), container(deployment, "build-engines", init=True)):
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HOME"] == "/tmp" and env["CUDA_CACHE_PATH"].startswith("/tmp/"), c["name"]
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
    default = find(render(_production()), "Deployment", "-triton")
    assert "runtimeClassName" not in default["spec"]["template"]["spec"]


@pytest.mark.parametrize(("autoscaling", "replicas", "budget"), [(True, None, True), (False, 3, True), (False, 2, False)])
def test_the_gateway_budget_never_blocks_every_drain(autoscaling, replicas, budget):
    """A budget of minAvailable 2 (the production values) over two replicas, or 1 over one (the chart forces
    one replica for a ReadWriteOnce results claim), allows no eviction: a node drain waits forever."""
    patch = {"gateway__autoscaling__enabled": autoscaling}
    if replicas is not None:
        patch["gateway__replicas"] = replicas
    objs = render(_production(**patch))
    pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"].endswith("-gateway")]
    assert bool(pdbs) is budget


_LOCAL_VOLUMES = "cluster-autoscaler.kubernetes.io/safe-to-evict-local-volumes"


def _disk_empty_dirs(deployment: dict) -> set[str]:
    """The volumes the cluster autoscaler counts as local storage (its drain rule: a hostPath, or an emptyDir
    not backed by memory), each of which keeps the pod, and so its node, in place unless the pod names it."""
    return {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]
            if "hostPath" in v or ("emptyDir" in v and v["emptyDir"].get("medium") != "Memory")}


@pytest.mark.parametrize("patch", [
    {},
    {"triton__engines__cache__type": "emptyDir"},
    {"triton__engines__build": False},
    {"triton__modelRepository__source": "pvc"},
    {"gateway__resultsDir__claimName": "scratch", "gateway__resultsDir__claimAccessMode": "ReadWriteMany"},
])
def test_the_cluster_autoscaler_may_move_triton_and_gateway_pods(patch):
    """The cluster autoscaler (--skip-nodes-with-local-storage, its default) never moves a pod with a disk-backed
    emptyDir it is not told of, so a node holding one Triton pod (models, tmp) or one gateway (tmp, results)
    was never removed: a GPU node of a scaled-down fleet stayed up for a pod that fits elsewhere. Each pod names
    exactly its own disk emptyDirs (scratch, copies, the engine cache when it is one), whatever the values."""
    objs = render(_production(**patch))
    for suffix in ("-triton", "-gateway"):
        deployment = find(objs, "Deployment", suffix)
        named = deployment["spec"]["template"]["metadata"]["annotations"][_LOCAL_VOLUMES].split(",")
        assert sorted(named) == sorted(_disk_empty_dirs(deployment)), suffix
    assert "dshm" not in find(objs, "Deployment", "-triton")["spec"]["template"]["metadata"]["annotations"][_LOCAL_VOLUMES]


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str | int) -> int:
    """A Kubernetes quantity of bytes (the suffixes the schema accepts) as a number."""
    number, unit = re.fullmatch(r"([0-9.]+)([kMGT]i?)?", str(quantity)).groups()  # type: ignore[union-attr]
    return int(float(number) * _UNITS[unit or ""])


def _disk_writers(deployment: dict) -> dict[str, dict]:
    """Every container (init containers too) that writes one of the pod's disk-backed emptyDirs, by name."""
    spec = deployment["spec"]["template"]["spec"]
    disk = _disk_empty_dirs(deployment)
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]
            if any(m["name"] in disk and not m.get("readOnly") for m in c.get("volumeMounts", []))}


@pytest.mark.parametrize("value_set", ["default", "production"])
def test_pods_request_the_disk_their_empty_dirs_take(value_set, tmp_path):
    """Triton's emptyDirs may take 32Gi (sizeLimits), the gateway's 24Gi, and the scheduler counts none of it
    unless a container requests ephemeral-storage: on a GPU node with a small root disk a pod was placed where
    the kubelet then evicted it under disk pressure (first the pods above their requests). Each container that
    writes such a volume requests at least what the pod holds in normal operation there:
    Triton: the gpu-profile repository twice (source, served copy), each plan twice (cache, served; a plan is
    the weights and their kernels: 64 MiB allowed each, not measured here), the CUDA JIT cache in /tmp (1 GiB,
    CUDA's default CUDA_CACHE_MAXSIZE) and the kubelet's log files (5 x 10 MiB); the gateway: its budget of
    request bodies in flight, spooled to disk (CTSCREEN_UPLOAD_BUDGET_BYTES)."""
    from ctscreen.repo import build_repository
    from gateway.settings import Settings

    repo = build_repository("gpu", tmp_path / "gpu")
    repository = sum(f.stat().st_size for f in repo.rglob("*") if f.is_file())
    values = _production() if value_set == "production" else {}
    objs = render(values)
    triton = find(objs, "Deployment", "-triton")
    models = len(yaml.safe_load((CHART / "values.yaml").read_text())["triton"]["engines"]["models"])
    held = 2 * repository + 2 * models * 64 * 2**20 + 2**30 + 50 * 2**20
    writers = _disk_writers(triton)
    expected = {"build-engines", "triton"} | ({"fetch-models"} if value_set == "production" else set())
    assert set(writers) == expected
    for name, c in writers.items():
        assert _bytes(c["resources"]["requests"]["ephemeral-storage"]) >= held, name
    gateway = find(objs, "Deployment", "-gateway")
    (writer,) = _disk_writers(gateway).values()
    env = {e["name"]: e.get("value") for e in writer["env"]}
    budget = int(env.get("CTSCREEN_UPLOAD_BUDGET_BYTES") or Settings.model_fields["upload_budget_bytes"].default)
    assert _bytes(writer["resources"]["requests"]["ephemeral-storage"]) >= budget
    if value_set == "production":  # a resources block of one's own keeps the chart's disk request beside it
        assert container(triton, "triton")["resources"]["requests"]["cpu"] == _production()["triton"]["resources"]["requests"]["cpu"]


def test_a_disk_request_of_ones_own_wins():
    """triton.resources, triton.engines.resources (build-engines, and fetch-models with it) and gateway.resources
    set the request; null drops it."""
    values = _production(**{"triton__resources__requests__ephemeral-storage": "20Gi",
                            "triton__engines__resources": {"requests": {"ephemeral-storage": 12 * 2**30}},
                            "gateway__resources": {"requests": {"ephemeral-storage": "30Gi", "cpu": "2"}}})
    objs = render(values)
    triton = find(objs, "Deployment", "-triton")
    requests = {name: c["resources"]["requests"] for name, c in _disk_writers(triton).items()}
    assert requests["triton"]["ephemeral-storage"] == "20Gi" and requests["triton"]["cpu"] == "6"
    assert _bytes(requests["build-engines"]["ephemeral-storage"]) == 12 * 2**30
    assert _bytes(requests["fetch-models"]["ephemeral-storage"]) == 12 * 2**30
    gateway = container(find(objs, "Deployment", "-gateway"), "gateway")["resources"]["requests"]
    assert gateway["ephemeral-storage"] == "30Gi" and gateway["cpu"] == "2"
    dropped = render(_production(**{"triton__engines__resources__requests__ephemeral-storage": None,
                                    "gateway__resources__requests__ephemeral-storage": None}))
    triton = find(dropped, "Deployment", "-triton")
    for name, init in (("fetch-models", True), ("build-engines", True)):
        assert "ephemeral-storage" not in container(triton, name, init=init)["resources"]["requests"], name
    assert "ephemeral-storage" in container(triton, "triton")["resources"]["requests"]
    assert "ephemeral-storage" not in container(find(dropped, "Deployment", "-gateway"), "gateway")["resources"]["requests"]


def test_a_pod_annotation_of_ones_own_replaces_the_charts():
    """A volume of one's own (extraVolumes) is not named for the autoscaler: podAnnotations can name it (or none,
    to keep the pod where it is), replacing the chart's value rather than writing the key twice."""
    mine = {_LOCAL_VOLUMES: "models,tmp,mine", "example.org/owner": "ops"}
    for component in ("triton", "gateway"):
        objs = render(_production(**{f"{component}__podAnnotations": mine}))
        annotations = find(objs, "Deployment", f"-{component}")["spec"]["template"]["metadata"]["annotations"]
        assert annotations[_LOCAL_VOLUMES] == "models,tmp,mine" and annotations["example.org/owner"] == "ops"
        assert any(k.startswith("checksum/") for k in annotations)


def test_without_an_engine_build_the_repository_is_copied_in_the_triton_image_without_a_gpu_or_the_cache():
    """engines.build false (an ONNX Runtime repository, or plans built elsewhere) still pulled the ~10 GB
    TensorRT image, held the GPU for a copy, and mounted the engine cache (a missing claim: Pending)."""
    values = _production(triton__engines={**_production()["triton"]["engines"], "build": False,
                                          "cache": {**_production()["triton"]["engines"]["cache"], "type": "pvc",
                                                    "claimName": "absent"}})
    deployment = find(render(values), "Deployment", "-triton")
    init = container(deployment, "build-engines", init=True)
    assert init["image"] == container(deployment, "triton")["image"]
    assert not any(k.startswith("nvidia.com/") for k in init["resources"].get("limits", {}))
    assert "trt-cache" not in {m["name"] for m in init["volumeMounts"]}
    assert "trt-cache" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    built = find(render(_production()), "Deployment", "-triton")
    assert "tensorrt" in container(built, "build-engines", init=True)["image"]


def _notes(values: dict) -> str:
    from tests.test_helm_chart import helm as helm_sdk

    with helm_sdk.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


@pytest.mark.parametrize(("blobs", "warned"), [({}, True), ({"storageClassName": "efs-sc"}, False),
                                               ({"existingClaim": "site-blobs"}, False),
                                               ({"s3": {"bucket": "site-ct"}}, False)])
def test_install_notes_warn_when_the_shared_blob_claim_falls_to_the_default_storage_class(blobs, warned):
    """EKS, GKE and AKS default classes are ReadWriteOnce: the ReadWriteMany claim stays Pending, silently."""
    values = _production()
    values["state"]["blobs"] = {**values["state"].get("blobs", {}), "storageClassName": "", "existingClaim": "",
                                **blobs}
    assert ("ReadWriteMany" in _notes(values)) is warned


def test_a_gitops_install_names_its_own_postgresql_password():
    """The generated password is read back with lookup, which a render without cluster access (Argo CD,
    helm template) cannot do: each sync made a new password the database never took, and the gateways could
    not log in. With passwordSecret the chart renders no password at all: the database, the gateways and the
    migration Job read the site's Secret, and the URL takes it by Kubernetes' $(VAR) expansion."""
    from gateway.settings import Settings

    values = _production()
    values["state"]["database"] = {**values["state"]["database"], "existingSecret": "",
                                   "postgresql": {**values["state"]["database"].get("postgresql", {}),
                                                  "passwordSecret": "site-pg"}}
    objs = render(values)
    assert render(values) == objs  # the same render twice: nothing generated
    assert not [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-postgresql")]
    (pg,) = [o for o in objs if o["kind"] == "StatefulSet"]
    (db,) = pg["spec"]["template"]["spec"]["containers"]
    # a long crash recovery (WAL replay) is not killed by the liveness probe
    assert db["startupProbe"]["periodSeconds"] * db["startupProbe"]["failureThreshold"] >= 1800
    assert {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "site-pg", "key": "password"}}} in db["env"]
    job = next(o for o in objs if o["kind"] == "Job")
    for c in (container(find(objs, "Deployment", "-gateway"), "gateway"), job["spec"]["template"]["spec"]["containers"][0]):
        names = [e["name"] for e in c["env"]]
        assert names.index("PGPASSWORD") < names.index("CTSCREEN_DATABASE_URL")  # $(VAR) needs it defined first
        url = next(e["value"] for e in c["env"] if e["name"] == "CTSCREEN_DATABASE_URL")
        assert url == f"postgresql://ctscreen:$(PGPASSWORD)@{RELEASE}-postgresql:5432/ctscreen"
        expanded = url.replace("$(PGPASSWORD)", "s3cretLettersAnd0")
        assert Settings(database_url=expanded, triton_urls="fake:1").database_url == expanded


def test_result_destinations_come_from_a_secret_file(tmp_path):
    """The PACS, STOW-RS and FHIR destinations had no chart value (only extraEnv and extraVolumes)."""
    from gateway.settings import Settings

    values = _production(gateway__destinations={"secretName": "site-destinations", "key": "destinations.yaml"})
    deployment = find(render(values), "Deployment", "-gateway")
    c = container(deployment, "gateway")
    path = next(e["value"] for e in c["env"] if e["name"] == "CTSCREEN_DESTINATIONS_FILE")
    mount = next(m for m in c["volumeMounts"] if m["name"] == "destinations")
    assert path == "/etc/ctscreen/destinations/destinations.yaml" and path.startswith(mount["mountPath"] + "/")
    assert mount["readOnly"] is True
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "destinations")
    assert volume["secret"]["secretName"] == "site-destinations"
    assert volume["secret"]["items"] == [{"key": "destinations.yaml", "path": "destinations.yaml"}]
    # the file as the pod sees it, with the example of docs/gateway.md
    local = tmp_path / "destinations.yaml"
    local.write_text("destinations:\n  - {name: pacs, kind: dicom, ae_title: PACS, host: pacs.local, port: 4242}\n")
    assert [d.name for d in Settings(destinations_file=local, triton_urls="fake:1").destinations()] == ["pacs"]
    default = container(find(render(_production()), "Deployment", "-gateway"), "gateway")
    assert "CTSCREEN_DESTINATIONS_FILE" not in {e["name"] for e in default["env"]}


def test_the_case_rule_reaches_the_gateway_settings(monkeypatch):
    from aggregator.case import CaseRule
    from gateway.main import case_rule
    from gateway.settings import Settings

    for rule, expected in (
        ({"runSlices": 3, "runMm": None}, CaseRule()),
        ({"runSlices": 2, "runMm": 10, "minLungFieldCm2": 40, "minBodyCm2": 250},
         CaseRule(run_slices=2, run_mm=10.0, min_lung_field_cm2=40.0, min_body_cm2=250.0)),
        ({"minLungFieldCm2": 0}, CaseRule(min_lung_field_cm2=None)),  # 0: the check off (the paper's rule)
        ({"minBodyCm2": 0}, CaseRule(min_body_cm2=None)),  # 0: the lung field alone decides
    ):
        c = container(find(render(_production(gateway__caseRule=rule)), "Deployment", "-gateway"), "gateway")
        env = {e["name"]: e["value"] for e in c["env"] if e["name"].startswith("CTSCREEN_CASE_")}
        assert {"CTSCREEN_CASE_MIN_LUNG_FIELD_CM2", "CTSCREEN_CASE_MIN_BODY_CM2"} <= set(env)
        for name in ("CTSCREEN_CASE_RUN_SLICES", "CTSCREEN_CASE_RUN_MM", "CTSCREEN_CASE_MIN_LUNG_FIELD_CM2",
                     "CTSCREEN_CASE_MIN_BODY_CM2"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert case_rule(Settings(triton_urls="fake:1")) == expected


def test_gateway_replicas_prefer_different_nodes_by_default_and_keep_a_given_affinity():
    """With no affinity and no spread by default, every gateway replica could land on one node, whose loss
    took the API and the DICOM intake with it (the PDB does not prevent that)."""
    term = {"topologyKey": "kubernetes.io/hostname"}
    for values, kept in (({}, None), ({"gateway": {"affinity": {"podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 5, "podAffinityTerm": {
                "topologyKey": "topology.kubernetes.io/zone", "labelSelector": {"matchLabels": {"x": "y"}}}}]}}}}, 5)):
        spec = find(render(values), "Deployment", "-gateway")["spec"]["template"]["spec"]
        preferred = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        ours = [p for p in preferred if p["podAffinityTerm"]["topologyKey"] == term["topologyKey"]]
        assert len(ours) == 1 and ours[0]["podAffinityTerm"]["labelSelector"]["matchLabels"][
            "app.kubernetes.io/component"] == "gateway", preferred
        assert kept is None or [p["weight"] for p in preferred if p not in ours] == [kept]
    spec = find(render({"gateway": {"spreadAcrossNodes": False}}), "Deployment", "-gateway")["spec"]["template"]["spec"]
    assert "affinity" not in spec
