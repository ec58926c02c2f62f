"""Structural checks of deploy/: the compose file, the Kubernetes manifests and the Grafana
provisioning agree with each other and with the dashboards (no kubeconform: it needs schemas from
the network, so the checks that matter are written here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from moxco.dashboards import build

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text("utf-8"))


def test_compose_services_and_wiring():
    services = _compose()["services"]
    assert set(services) == {"postgres", "collector-1", "collector-2", "proxy", "prometheus", "grafana"}
    for name in ("collector-1", "collector-2"):
        command = services[name]["command"]
        assert command[0] == "serve" and command[command.index("--host") + 1] == "0.0.0.0"
        assert command[command.index("--store") + 1].startswith("postgresql://moxco:")
        assert command[command.index("--store") + 1].endswith("@postgres:5432/moxco")
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text("utf-8")
    assert re.findall(r"server (collector-\d):8000", nginx) == ["collector-1", "collector-2"]
    assert services["proxy"]["ports"] == ["8000:8000"] and "listen 8000;" in nginx
    # every bind mount exists in the repository
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
    # secrets come from the env file, never the compose file
    text = (DEPLOY / "docker-compose.yml").read_text("utf-8")
    assert "${MOXCO_DB_PASSWORD:?" in text and "change-me" not in text
    example = dict(line.split("=", 1) for line in (DEPLOY / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(re.findall(r"\$\{(\w+):\?", text)) == set(example)


def test_compose_grafana_provisions_the_generated_dashboards():
    grafana = _compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/moxco.yml").read_text("utf-8"))
    path = provider["providers"][0]["options"]["path"]
    assert mounts["../dashboards/json"] == path
    assert (DEPLOY / "../dashboards/json").resolve() == build.JSON_DIR
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{path}/{build.LIVE_UID}.json"


def _datasources(text: str) -> dict:
    return {d["uid"]: d for d in yaml.safe_load(text)["datasources"]}


def test_provisioned_datasources_are_the_ones_the_dashboards_use():
    compose_ds = _datasources((DEPLOY / "grafana/provisioning/datasources/moxco.yml").read_text("utf-8"))
    k8s_ds = _datasources(_k8s()["ConfigMap/grafana-provisioning"]["data"]["datasources.yml"])
    used = {(p["datasource"]["uid"], p["datasource"]["type"])
            for model in (build.to_dict(f()) for f in build.DASHBOARDS.values())
            for p in model["panels"] + [q for r in model["panels"] for q in r.get("panels", [])] if "datasource" in p}
    for provisioned in (compose_ds, k8s_ds):
        assert {(uid, d["type"]) for uid, d in provisioned.items()} == used
        assert provisioned[build.PROMETHEUS_UID]["url"] == "http://prometheus:9090"
        assert provisioned[build.POSTGRES_UID]["user"] == "grafana_reader"  # the read-only role
        assert provisioned[build.POSTGRES_UID]["secureJsonData"]["password"] == "$MOXCO_GRAFANA_DB_PASSWORD"


def _k8s() -> dict:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text("utf-8"))
    objects = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text("utf-8")):
            key = f"{doc['kind']}/{doc['metadata']['name']}"
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def _pod_specs(objects):
    for key, obj in objects.items():
        if obj["kind"] in ("Deployment", "StatefulSet"):
            yield key, obj, obj["spec"]["template"]["spec"]


def test_kubernetes_objects_are_well_formed():
    objects = _k8s()
    assert {k for k in objects if k.split("/")[0] in ("Deployment", "StatefulSet")} == {
        "StatefulSet/postgres", "Deployment/collector", "Deployment/prometheus", "Deployment/grafana"}
    assert objects["Deployment/collector"]["spec"]["replicas"] == 2
    api = {"Namespace": "v1", "ConfigMap": "v1", "Service": "v1", "PersistentVolumeClaim": "v1",
           "Deployment": "apps/v1", "StatefulSet": "apps/v1", "Ingress": "networking.k8s.io/v1"}
    for key, obj in objects.items():
        assert obj["apiVersion"] == api[obj["kind"]], key
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"]), key
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "moxco", key
    secret_keys = set(yaml.safe_load((K8S / "secret.example.yaml").read_text("utf-8"))["stringData"])
    for key, obj, pod in _pod_specs(objects):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items(), key
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claim_templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claim_templates, f"{key}: {mount['name']}"
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, f"{key}: {probe} port {port}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "moxco-secrets" and ref["key"] in secret_keys, f"{key}: {ref}"
        for volume in volumes.values():
            if "configMap" in volume:
                cm = objects.get(f"ConfigMap/{volume['configMap']['name']}")
                assert cm is not None, f"{key}: ConfigMap {volume['configMap']['name']} missing"
                for container in pod["containers"]:
                    for mount in container.get("volumeMounts", []):
                        if mount["name"] == volume["name"] and "subPath" in mount:
                            assert mount["subPath"] in cm["data"], f"{key}: {mount['subPath']}"
            if "persistentVolumeClaim" in volume:
                assert f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}" in objects


def test_kubernetes_services_reach_their_pods():
    objects = _k8s()
    pods = [(key, obj["spec"]["template"]["metadata"]["labels"], pod) for key, obj, pod in _pod_specs(objects)]
    for key, service in objects.items():
        if service["kind"] != "Service":
            continue
        matching = [(k, pod) for k, labels, pod in pods if service["spec"]["selector"].items() <= labels.items()]
        assert len(matching) == 1, f"{key} selects {[k for k, _ in matching]}"
        names = {p["name"] for c in matching[0][1]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, f"{key}: targetPort {port['targetPort']}"
    ingress = objects["Ingress/collector"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert f"Service/{ingress['name']}" in objects
    # Prometheus discovers each collector pod through the headless Service
    assert objects["Service/collector-workers"]["spec"]["clusterIP"] == "None"
    config = yaml.safe_load(objects["ConfigMap/prometheus-config"]["data"]["prometheus.yml"])
    names = config["scrape_configs"][0]["dns_sd_configs"][0]["names"]
    assert names == ["collector-workers.moxco.svc.cluster.local"]


def test_kubernetes_grafana_gets_the_committed_dashboards():
    objects = _k8s()
    data = objects["ConfigMap/grafana-dashboards"]["data"]
    assert data == {p.name: p.read_text("utf-8") for p in sorted(build.JSON_DIR.glob("*.json"))}


def test_postgres_init_scripts_agree():
    """The read-only Grafana role is created the same way in compose and Kubernetes."""
    def sql(text):
        return text[text.index("psql"):].strip().splitlines()
    compose = (DEPLOY / "postgres/init/10-grafana-reader.sh").read_text("utf-8")
    k8s = _k8s()["ConfigMap/postgres-init"]["data"]["10-grafana-reader.sh"]
    assert sql(compose) == sql(k8s)
    assert "GRANT SELECT" in compose and "ALTER DEFAULT PRIVILEGES" in compose
