"""The chart on its own: the CRD copy, lint, the values schema and what the templates render."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from phi3_operator.settings import BUILD_ARGS, DEFAULT_MONITORING_PEERS, OperatorSettings, default_catalog
from tests.chart.helpers import CHART_DIR, Helm
from tests.support.cluster import REPO_ROOT

NAMESPACED_VALUES = ("--set", "rbac.scope=namespace", "--set", "watchNamespaces={team-a,team-b}")
FORBIDDEN_VERBS = {"*", "deletecollection", "escalate", "bind", "impersonate"}


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def workload_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Roles that grant the operator its models and children (not the leader-election Role)."""
    return [r for r in by_kind(docs, "Role") if not r["metadata"]["name"].endswith("-leader-election")]


LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def rules_of(doc: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in doc["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


# Exactly what operator/phi3_operator/{k8s,reconcile,handlers}.py and kopf call, per namespace.
EXPECTED_NAMESPACED_RULES = {
    ("phi3.ai", "phi3models"): {"get", "list", "watch"},
    ("phi3.ai", "phi3models/status"): {"get", "patch"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "create", "patch", "delete"},
    ("serving.knative.dev", "configurations"): {"get", "create", "patch", "delete"},
    ("serving.knative.dev", "revisions"): {"get"},
    ("", "pods"): {"list"},
    ("autoscaling", "horizontalpodautoscalers"): {"get", "create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "create", "patch", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"get", "create", "patch", "delete"},
    ("", "events"): {"create"},
    ("events.k8s.io", "events"): {"create"},
    ("", "secrets"): {"get"},
    ("batch", "jobs"): {"get", "create", "patch"},
    ("", "configmaps"): {"get", "create", "patch"},
}
CRD_RULE = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
# kopf lists and watches namespaces only when it serves a list of them (never clusterwide).
NAMESPACES_RULE = {("", "namespaces"): {"list", "watch"}}


def test_chart_crd_is_a_byte_copy_of_the_top_level_crd() -> None:
    top = REPO_ROOT / "crds"
    chart = CHART_DIR / "crds"
    assert sorted(p.name for p in chart.glob("*.yaml")) == sorted(p.name for p in top.glob("*.yaml"))
    for source in top.glob("*.yaml"):
        assert (chart / source.name).read_bytes() == source.read_bytes(), (
            f"charts/phi3-operator/crds/{source.name} differs from crds/{source.name}: run hack/sync-chart-crds"
        )


@pytest.mark.parametrize("image", ["mlserver-cpu", "mlserver-torch-cpu", "mlserver-cuda"])
def test_chart_catalog_reads_what_the_runtime_images_install(image: str, helm: Helm) -> None:
    source = REPO_ROOT / "images" / image / "packages.txt"
    copy = CHART_DIR / "files" / f"{image}.packages.txt"
    assert copy.read_bytes() == source.read_bytes(), f"{copy} differs from {source}: run hack/sync-chart-crds"
    config = yaml.safe_load(one(helm.template(), "ConfigMap")["data"]["config.yaml"])
    carried = [line for line in source.read_text().splitlines() if line and not line.startswith("#")]
    entries = [e for e in config["imageCatalog"] if e["image"].startswith(f"ghcr.io/phi3-operator/{image}:")]
    assert entries and all(e["packages"] == carried for e in entries)


@pytest.mark.parametrize("values", [(), NAMESPACED_VALUES], ids=["default", "namespaced"])
def test_helm_lint_strict_is_clean(helm: Helm, values: tuple[str, ...]) -> None:
    proc = helm.run("lint", "--strict", str(CHART_DIR), *values)
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (("--set-string", "replicaCount=two"), "/replicaCount"),
        (("--set", "replicaCount=6"), "/replicaCount"),
        (("--set", "rbac.scope=everywhere"), "/rbac/scope"),
        (("--set", "colour=blue"), "additional properties 'colour' not allowed"),
        (("--set", "config.imageCatalog[0].flavor=sklearn"), "/config/imageCatalog/0/flavor"),
        (("--set", "config.maxWorkers=0"), "/config/maxWorkers"),
        (("--set", "watchNamespaces={Not_A_Namespace}"), "/watchNamespaces/0"),
    ],
    ids=["replicas-string", "replicas-six", "rbac-scope", "unknown-key", "flavor", "max-workers", "namespace-name"],
)
def test_values_schema_rejects_bad_values(helm: Helm, values: tuple[str, ...], complaint: str) -> None:
    proc = helm.run("template", "phi3", str(CHART_DIR), *values, check=False)
    assert proc.returncode != 0, f"helm template accepted {values}"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert complaint in proc.stderr, proc.stderr


def test_default_render_runs_the_operator_hardened_and_cluster_wide(helm: Helm) -> None:
    docs = helm.template()
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/phi3-operator/operator:0.1.0"
    assert container["command"] == ["phi3-operator"]
    assert container["args"] == ["run", "--liveness-endpoint", "http://0.0.0.0:8080/healthz",
                                 "--metrics-address", "0.0.0.0:8081", "--leader-election-namespace", "phi3-system"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    for probe in ("livenessProbe", "readinessProbe"):  # answered by standbys too, not only by kopf
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PHI3_OPERATOR_CONFIG"] == "/etc/phi3-operator/config.yaml"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/etc/phi3-operator": "config", "/tmp": "tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    assert "emptyDir" in volumes["tmp"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]

    assert workload_roles(docs) == []
    # Clusterwide, kopf does not observe namespaces: no grant for them.
    assert rules_of(one(docs, "ClusterRole")) == {**CRD_RULE, **EXPECTED_NAMESPACED_RULES}
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "phi3-system"}
    ]
    assert by_kind(docs, "ServiceMonitor") == []


def test_namespaced_render_binds_roles_per_watched_namespace(helm: Helm) -> None:
    docs = helm.template(*NAMESPACED_VALUES)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [
        "run", "--liveness-endpoint", "http://0.0.0.0:8080/healthz", "--metrics-address", "0.0.0.0:8081",
        "--leader-election-namespace", "phi3-system", "--namespace", "team-a", "--namespace", "team-b",
    ]
    # Only kopf's read-only scans stay cluster-wide.
    assert rules_of(one(docs, "ClusterRole")) == {**CRD_RULE, **NAMESPACES_RULE}
    roles = workload_roles(docs)
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rules_of(role) == EXPECTED_NAMESPACED_RULES
    bindings = [b for b in by_kind(docs, "RoleBinding") if not b["metadata"]["name"].endswith("-leader-election")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"][0]["namespace"] == "phi3-system"


def test_namespace_scope_without_a_list_watches_the_release_namespace(helm: Helm) -> None:
    docs = helm.template("--set", "rbac.scope=namespace", namespace="llm-ops")
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--namespace", "llm-ops"]
    assert [r["metadata"]["namespace"] for r in workload_roles(docs)] == ["llm-ops"]


@pytest.mark.parametrize("values", [(), NAMESPACED_VALUES], ids=["default", "namespaced"])
def test_rbac_grants_no_wildcards_and_deletes_only_what_the_operator_replaces(helm: Helm, values: tuple[str, ...]
                                                                              ) -> None:
    docs = helm.template(*values)
    for doc in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        for rule in doc["rules"]:
            assert "*" not in rule["apiGroups"] and "*" not in rule["resources"], rule
            assert not FORBIDDEN_VERBS & set(rule["verbs"]), rule
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        granted = rules_of(doc)
        if doc["metadata"]["name"].endswith("-leader-election"):
            # Only the verbs leader election uses, only on Leases, only in the release namespace.
            assert granted == LEASE_RULES and doc["metadata"]["namespace"] == "phi3-system", doc
            continue
        # Deployments and Services are deleted only when Knative comes to serve a model instead (and a
        # Configuration when it goes back); models, pods, Revisions, config maps never.
        for resource in (("phi3.ai", "phi3models"), ("serving.knative.dev", "revisions")):
            assert "delete" not in granted.get(resource, set()), resource
        # Pods are read only, to say why a model's pods do not become ready (where children are granted).
        assert granted.get(("", "pods"), {"list"}) == {"list"}
        assert "delete" not in granted.get(("", "configmaps"), set())
        assert "list" not in granted.get(("batch", "jobs"), set())
        assert granted.get(("", "namespaces"), {"list", "watch"}) == {"list", "watch"}


def test_config_map_is_what_the_operator_reads(helm: Helm) -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["config"]
    docs = helm.template("--set", "config.maxWorkers=4", "--set", "config.resyncIntervalSeconds=30",
                         "--set", "config.modelRegistry=registry.local:5000/ml",
                         "--set", "config.plainHttpRegistries[0]=registry.local:5000",
                         "--set", "config.buildArgs.PIP_INDEX_URL=http://pypi.local/simple")
    raw = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert set(raw) == {"defaultTrackingUri", "resyncIntervalSeconds", "modelRefreshIntervalSeconds", "builderImage",
                        "buildArgs", "maxWorkers", "imageCatalog", "modelRegistry", "plainHttpRegistries",
                        "monitoring"}
    settings = OperatorSettings.from_mapping(raw, env={})
    # The chart's default is the operator's own.
    assert settings.monitoring_peers == DEFAULT_MONITORING_PEERS
    assert settings.build_args == (("PIP_INDEX_URL", "http://pypi.local/simple"),)
    assert settings.default_tracking_uri == values["defaultTrackingUri"]
    assert settings.resync_interval_s == 30.0
    assert settings.model_refresh_interval_s == float(values["modelRefreshIntervalSeconds"])
    assert settings.builder_image == values["builderImage"]
    assert settings.max_workers == 4
    assert settings.model_registry == "registry.local:5000/ml"
    assert settings.plain_http("registry.local:5000/ml/phi3-models/m") and not settings.plain_http("ghcr.io/x")
    # The chart's catalog is the operator's default one, in the same order (the order is the preference).
    assert [(c.flavor, c.target, c.image) for c in settings.image_catalog] == [
        (c.flavor, c.target, c.image) for c in default_catalog()
    ]
    for entry, source in zip(settings.image_catalog, values["imageCatalog"], strict=True):
        assert entry.image == source["image"]
        listed = (CHART_DIR / source["packagesFile"]).read_text().splitlines()
        packages = [line for line in listed if line and not line.startswith("#")]
        assert set(entry.packages) == {p.split("==")[0] for p in packages}
        assert "phi3-operator" in entry.packages


def test_build_args_schema_names_what_the_dockerfile_declares(helm: Helm) -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    build_args = schema["properties"]["config"]["properties"]["buildArgs"]
    assert tuple(build_args["properties"]) == BUILD_ARGS
    refused = helm.run("template", "phi3", str(CHART_DIR), "--set", "config.buildArgs.HTTP_PROXY=http://proxy",
                       check=False)
    assert refused.returncode != 0 and "HTTP_PROXY" in refused.stderr


def test_config_change_rolls_the_operator(helm: Helm) -> None:
    def checksum(*args: str) -> str:
        deployment = one(helm.template(*args), "Deployment")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum() == checksum()
    assert checksum() != checksum("--set", "config.maxWorkers=2")


def test_image_tag_and_digest_are_configurable(helm: Helm) -> None:
    def image(*args: str) -> str:
        return str(one(helm.template(*args), "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"])

    assert image("--set", "image.repository=registry.local/op", "--set", "image.tag=dev") == "registry.local/op:dev"
    digest = "sha256:" + "a" * 64
    assert image("--set", f"image.digest={digest}") == f"ghcr.io/phi3-operator/operator@{digest}"


def test_metrics_service_and_optional_service_monitor(helm: Helm) -> None:
    docs = helm.template()
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}]
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    assert service["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]

    docs = helm.template("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.port=9090",
                         "--set", "metrics.serviceMonitor.labels.release=prometheus")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert one(docs, "Service")["spec"]["ports"][0]["port"] == 9090


def test_schema_is_strict_at_the_top_level() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert set(values) == set(schema["properties"]), "values.yaml and values.schema.json list different keys"


def test_two_replicas_elect_a_leader_spread_over_nodes_and_survive_a_drain(helm: Helm) -> None:
    docs = helm.template()
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    budget = one(docs, "PodDisruptionBudget")
    assert budget["spec"] == {"maxUnavailable": 1, "selector": deployment["spec"]["selector"]}
    (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    assert rules_of(role) == LEASE_RULES
    binding = next(b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"] == role["metadata"]["name"])
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]

    single = helm.template("--set", "replicaCount=1", "--set", "affinity.nodeAffinity.x=1")
    assert by_kind(single, "PodDisruptionBudget") == [], "a PDB on one replica would block every drain"
    assert one(single, "Deployment")["spec"]["template"]["spec"]["affinity"] == {"nodeAffinity": {"x": 1}}
