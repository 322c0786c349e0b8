"""The Helm chart against what breaks on a real cluster although the manifests validate: values that collide,
drains the kubelet cuts short, published APIs nobody may reach, settings pods never re-read, labels the cost
tools never see, and Argo CD's ordering of hooks. Offline renders with the real Helm v4 SDK, as in
``tests/test_helm_chart.py`` (no cluster runs here)."""

from __future__ import annotations

import pytest

from tests.test_helm_chart import CHART, container, find, helm, render


def _env(c: dict) -> list[tuple[str, str | None]]:
    return [(e["name"], e.get("value")) for e in c["env"]]


def _migration_job(objs: list[dict]) -> dict:
    (job,) = [o for o in objs if o["kind"] == "Job" and o["metadata"]["name"].endswith("-db-migrate")]
    return job


def test_an_extra_variable_the_chart_also_sets_replaces_it_in_place():
    """gateway.extraEnv and triton.extraEnv naming a variable the chart sets rendered it twice in one container,
    which server-side apply (Helm 4's default) refuses: the install failed on the cluster, not at render. Now the
    extra entry takes the chart's entry's place (its order kept for $(VAR) references) and the list names each
    variable once, in the gateway, the migration Job and Triton."""
    values = {"caBundle": {"configMapName": "hospital-ca"},
              "gateway": {"extraEnv": [{"name": "CTSCREEN_TRITON_BATCH_SIZE", "value": "4"},
                                       {"name": "SSL_CERT_FILE", "value": "/x/ca.pem"},
                                       {"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]},
              "triton": {"extraEnv": [{"name": "HOME", "value": "/scratch"},
                                      {"name": "SSL_CERT_FILE", "value": "/x/ca.pem"},
                                      {"name": "MALLOC_ARENA_MAX", "value": "2"}]}}
    objs = render(values)
    gateway = container(find(objs, "Deployment", "-gateway"), "gateway")
    job = _migration_job(objs)["spec"]["template"]["spec"]["containers"][0]
    triton = container(find(objs, "Deployment", "-triton"), "triton")
    for c, expected in ((gateway, {"CTSCREEN_TRITON_BATCH_SIZE": "4", "SSL_CERT_FILE": "/x/ca.pem",
                                   "HTTPS_PROXY": "http://proxy:3128"}),
                        (job, {"SSL_CERT_FILE": "/x/ca.pem"}),
                        (triton, {"HOME": "/scratch", "SSL_CERT_FILE": "/x/ca.pem", "MALLOC_ARENA_MAX": "2"})):
        env = _env(c)
        names = [n for n, _ in env]
        assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
        assert {n: v for n, v in env if n in expected} == expected
    # in place: the chart's position, not the end of the list
    names = [n for n, _ in _env(gateway)]
    assert names.index("CTSCREEN_TRITON_BATCH_SIZE") < names.index("CTSCREEN_DATA_DIR") < names.index("HTTPS_PROXY")
    assert [n for n, _ in _env(triton)][0] == "HOME"


def test_pods_carry_common_and_recommended_labels_and_keep_their_selectors():
    """commonLabels ("extra labels on every object") reached the Deployments but no pod, and pods had no
    version, part-of or managed-by: tools that attribute GPU cost (OpenCost, Kubecost) read pods."""
    values = {"commonLabels": {"cost-centre": "radiology", "app.kubernetes.io/name": "not-this"},
              "gateway": {"podLabels": {"team": "pacs", "app.kubernetes.io/component": "not-this"}}}
    objs = render(values)
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
            for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")}
    assert len(pods) == 4, sorted(pods)  # gateway, triton, postgresql, migrations
    for name, labels in pods.items():
        assert labels["cost-centre"] == "radiology", name
        assert labels["app.kubernetes.io/name"] == "ctscreen", name  # a selector label is never overridden
        assert labels["app.kubernetes.io/part-of"] == "ctscreen" and labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"]
    gateway = find(objs, "Deployment", "-gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "pacs" and labels["app.kubernetes.io/component"] == "gateway"
    assert gateway["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_a_changed_oidc_issuer_rolls_the_gateways():
    """The OIDC issuer and audience reach the pods through a Secret read at start: an upgrade that changed them
    left the gateways trusting the old issuer until something else restarted them."""
    def pod_annotations(issuer: str) -> dict:
        objs = render({"gateway": {"auth": {"oidcIssuer": issuer, "oidcAudience": "ctscreen"}}})
        return find(objs, "Deployment", "-gateway")["spec"]["template"]["metadata"]["annotations"]

    a, b = pod_annotations("https://idp.example.org/realms/a"), pod_annotations("https://idp.example.org/realms/b")
    assert a["checksum/auth"] != b["checksum/auth"]
    assert pod_annotations("https://idp.example.org/realms/a") == a


def test_the_gateway_drain_fits_its_grace_period():
    """The grace period was a free value beside a graceful-shutdown timeout hard-coded in the command: a longer
    preStop (a load balancer's deregistration delay) had the kubelet kill the pod mid-upload."""
    gateway = container(find(render(), "Deployment", "-gateway"), "gateway")
    command, env = gateway["command"], dict(_env(gateway))
    graceful = int(command[command.index("--timeout-graceful-shutdown") + 1])
    spec = find(render(), "Deployment", "-gateway")["spec"]["template"]["spec"]
    sleep = int(gateway["lifecycle"]["preStop"]["exec"]["command"][-1].split()[-1])
    assert spec["terminationGracePeriodSeconds"] >= sleep + graceful + float(env["CTSCREEN_SHUTDOWN_GRACE_S"]) + 5
    with pytest.raises(helm.HelmError, match="shorter than a drain: preStopSleepSeconds 30"):
        render({"gateway": {"drain": {"preStopSleepSeconds": 30}}})


@pytest.mark.parametrize(("values", "message"), [
    ({"triton": {"gpuResource": "nvidia.com/mig-1g.10gb", "gpus": 2}}, "sees one MIG device only"),
    ({"gateway": {"ingress": {"enabled": True}}}, "published (gateway.ingress.enabled is true) but networkPolicy.gatewayIngressFrom is empty"),
    ({"gateway": {"service": {"type": "LoadBalancer"}}}, "published (gateway.service.type is LoadBalancer) but networkPolicy.gatewayIngressFrom is"),
    ({"gateway": {"metricsPort": 8080}}, "must differ"),
    ({"gateway": {"dicom": {"enabled": True, "port": 9102, "allowedPeers": ["CT@*"]}}}, "must differ"),
    ({"triton": {"ports": {"metrics": 8000}}}, "must differ"),
])
def test_values_that_validate_but_cannot_work_fail_the_render(values, message):
    with pytest.raises(helm.HelmError) as info:
        render(values)
    assert message in str(info.value)


def test_a_published_api_renders_once_its_clients_are_named():
    objs = render({"gateway": {"ingress": {"enabled": True}},
                   "networkPolicy": {"gatewayIngressFrom": [{"namespaceSelector": {"matchLabels": {
                       "kubernetes.io/metadata.name": "ingress-nginx"}}}]}})
    assert find(objs, "Ingress")
    render({"gateway": {"ingress": {"enabled": True}}, "networkPolicy": {"enabled": False}})


@pytest.mark.parametrize(("values", "where"), [
    ({"gateway": {"dicom": {"port": 104}}}, "/gateway/dicom/port"),  # non-root, no capabilities: cannot bind it
    ({"gateway": {"metricsPort": 80}}, "/gateway/metricsPort"),
    ({"gateway": {"readyPath": "/ready"}}, "/gateway/readyPath"),  # the gateway serves /readyz only
])
def test_schema_refuses_ports_and_paths_the_gateway_cannot_serve(values, where):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as info:
        chart.validate_schema(values)
    assert where in str(info.value)


@pytest.mark.parametrize("external", [False, True])
def test_argo_cd_runs_the_migrations_after_the_in_chart_database_exists(external):
    """Argo CD maps Helm's pre-upgrade hook to PreSync, which runs before any resource of the first sync: with the
    chart's own PostgreSQL the Job met no database, failed, and stopped every sync. It is a Sync hook there now;
    an external database exists before the release, so PreSync stays right."""
    values = {"state": {"database": {"existingSecret": "site-db"}, "blobs": {"existingClaim": "nfs"}}} if external else {}
    annotations = _migration_job(render(values))["metadata"]["annotations"]
    if external:
        assert "argocd.argoproj.io/hook" not in annotations
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    else:
        assert annotations["argocd.argoproj.io/hook"] == "Sync"
        assert annotations["helm.sh/hook"] == "pre-upgrade"


def test_gateway_settings_the_gateway_or_triton_would_refuse_fail_at_render_or_are_made_to_fit():
    """A review of the values found three the chart accepted and the pods did not: a batch over the plans'
    largest (Triton refuses every request), a batch or in-flight bound over the gateway's 64 (it does not
    start), and uploads over the gateway's default budget of 4 GiB (it does not start)."""
    with pytest.raises(helm.HelmError, match="over triton.engines.maxBatch 32"):
        render({"gateway": {"batchSize": 48}})
    with helm.Chart.load(CHART) as chart:
        for key in ("batchSize", "maxInflightPerEndpoint"):
            with pytest.raises(helm.HelmValuesError, match=f"/gateway/{key}"):
                chart.validate_schema({"gateway": {key: 65}})
    env = dict(_env(container(find(render({"gateway": {"maxUploadMiB": 8192}}), "Deployment", "-gateway"), "gateway")))
    assert int(env["CTSCREEN_UPLOAD_BUDGET_BYTES"]) >= int(env["CTSCREEN_MAX_UPLOAD_BYTES"]) == 8192 * 2**20
    assert "CTSCREEN_UPLOAD_BUDGET_BYTES" not in dict(_env(container(find(render(), "Deployment", "-gateway"), "gateway")))


def test_the_queue_compute_ratio_reads_the_ensembles_steps_not_the_ensemble():
    """The ensemble's own compute time is its steps' queue and compute again (a real tritonserver 2.51: 1.86 s
    for a study whose lesion step queued 0.40 s and computed 1.28 s), so the ratio over every model read half the
    steps' (0.128 against 0.256) and the 1.5 target could not be reached. Every place that computes it leaves the
    ensemble out; the dashboard shows where a slow study's time goes, by stage, as the runbook says."""
    import json

    values = {"autoscaling": {"mode": "keda"}, "monitoring": {"serviceMonitor": {"enabled": True},
                                                              "podMonitor": {"enabled": True},
                                                              "prometheusRule": {"enabled": True}}}
    (scaled,) = [o for o in render(values) if o["kind"] == "ScaledObject"]
    (ratio,) = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["name"] == "queue-compute-ratio"]
    rules = (CHART / "files" / "prometheus-adapter-rules.yaml").read_text()
    adapter = rules[rules.index('as: "ctscreen_triton_queue_compute_ratio"'):rules.index("external:")]  # its query
    dashboard = json.loads((CHART / "dashboards" / "ctscreen-overview.json").read_text())
    panels = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for text in [ratio, adapter, *[e for e in panels if "nv_inference_queue_duration_us" in e]]:
        for metric in ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"):
            selectors = [part.split("}")[0] for part in text.split(metric + "{")[1:]]
            assert selectors and all('model!="ct_screen"' in s for s in selectors), (metric, text)
    assert any("by (le, stage)" in e for e in panels)


def test_the_gateway_bounds_a_request_head():
    """uvicorn's httptools parser has no limit on a header: the chart's command names the bounded protocol
    (gateway.httpserver) and passes gateway.maxRequestHeadKiB to it (pen test rev1, 27)."""
    gateway = container(find(render({"gateway": {"maxRequestHeadKiB": 32}}), "Deployment", "-gateway"), "gateway")
    command = gateway["command"]
    assert command[command.index("--http") + 1] == "gateway.httpserver:BoundedHttpToolsProtocol"
    assert dict(_env(gateway))["CTSCREEN_MAX_REQUEST_HEAD_BYTES"] == str(32 * 1024)
