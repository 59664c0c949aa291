"""Knative Serving on the real node (`build-knative`, `knative up|down`): Revisions of a `Configuration` that scale
to and from zero, the activator holding requests while none runs. No Route, no ingress, no cert-manager: a
Revision is reached through its own Service (named after it, port 80), as the activator's Endpoints stand in for
its pods while it is at zero.

The five commands come from knative.dev/serving's module, the manifests from its config/core (and the CRDs that
folder links to from knative.dev/networking and knative.dev/caching, at the versions serving's go.mod pins).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ..build import binary, go_env
from ..certs import kubeconfig_path
from ..config import (
    BRIDGE_ADDRESS,
    KNATIVE_SERVING_DIR,
    KNATIVE_SERVING_VERSION,
    NODE_LABEL,
    NODE_TAINT,
    REGISTRY_PORT,
    STATE_DIR,
    die,
    log,
    real_node_enabled,
    run,
)
from ..nodes import kubectl, wait_for
from ..processes import running_pid

SERVING_MODULE = "knative.dev/serving"
SERVING_GROUP = "serving.knative.dev"
FINALIZED_KINDS = ("services", "routes", "domainmappings")
COMMANDS = ("controller", "webhook", "activator", "autoscaler", "queue")
DEPLOYMENTS = ("activator", "autoscaler", "controller", "webhook")
REPO_ROOT = Path(__file__).resolve().parents[3]
NAMESPACE = "knative-serving"
FIELD_MANAGER = "localcluster-knative"
IMAGE = "knative-serving"
REGISTRY = f"{BRIDGE_ADDRESS}:{REGISTRY_PORT}"
# What of config/core is installed: the HPAs and PDBs (a minAvailable: 80% PDB over one replica blocks a drain)
# and the cert-manager Certificate for system-internal TLS are left out.
CORE_FILES = ("100-namespace.yaml", "200-roles/*.yaml", "200-serviceaccount.yaml", "configmaps/*.yaml",
              "webhooks/secret.yaml", "deployments/activator.yaml", "deployments/autoscaler.yaml",
              "deployments/controller.yaml", "deployments/webhook.yaml", "999-cache.yaml")
# Last: they send the API server's calls for Knative's objects (and its config maps) to the webhook.
WEBHOOK_FILES = ("webhooks/configmap-validation.yaml", "webhooks/defaulting.yaml",
                 "webhooks/resource-validation.yaml")
# config/core's links into the modules it vendors, which the module zip leaves out.
LINKED_CRDS = {"knative.dev/networking": ("certificate.yaml", "domain-claim.yaml", "ingress.yaml",
                                          "serverlessservice.yaml"),
               "knative.dev/caching": ("image.yaml",)}
LINKED_CONFIGMAPS = {"knative.dev/networking": ("config-network.yaml",)}
FEATURES = {
    "kubernetes.podspec-securitycontext": "enabled",
    "kubernetes.podspec-init-containers": "enabled",
    "kubernetes.podspec-tolerations": "enabled",
    "kubernetes.podspec-nodeselector": "enabled",
    "kubernetes.podspec-affinity": "enabled",
    "kubernetes.podspec-fieldref": "enabled",
    "kubernetes.podspec-volumes-emptydir": "enabled",
    "kubernetes.podspec-persistent-volume-claim": "enabled",
    "kubernetes.podspec-persistent-volume-write": "enabled",
    "kubernetes.containerspec-addcapabilities": "disabled",
    "secure-pod-defaults": "enabled",
}
# The node has two cores: the four Deployments ask for little (their limits stay Knative's).
REQUESTS = {"cpu": "25m", "memory": "64Mi"}
WEBHOOK_PROBE = {
    "apiVersion": "serving.knative.dev/v1", "kind": "Configuration",
    "metadata": {"name": "localcluster-webhook-probe", "namespace": "default"},
    "spec": {"template": {"spec": {"containers": [{"image": "localhost/probe:1"}]}}},
}


def build_knative() -> Path:
    """controller, webhook, activator, autoscaler and queue, static; serving's go.mod has no replace or exclude,
    so one `go install` builds them all at the release."""
    if all((KNATIVE_SERVING_DIR / name).is_file() for name in COMMANDS):
        return KNATIVE_SERVING_DIR
    log(f"building {KNATIVE_SERVING_DIR.name} (cached in {KNATIVE_SERVING_DIR}; the first build takes minutes)")
    started = time.monotonic()
    out = KNATIVE_SERVING_DIR.with_name(KNATIVE_SERVING_DIR.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run(["go", "install", "-trimpath", "-ldflags", "-s -w",
         *(f"{SERVING_MODULE}/cmd/{name}@{KNATIVE_SERVING_VERSION}" for name in COMMANDS)],
        env={**go_env(), "GOFLAGS": "-buildvcs=false", "GOBIN": str(out)})
    out.rename(KNATIVE_SERVING_DIR)
    log(f"built {KNATIVE_SERVING_DIR.name} in {time.monotonic() - started:.0f}s")
    return KNATIVE_SERVING_DIR


def installed_marker() -> Path:
    return STATE_DIR / "knative-installed"


def module_dir(module: str, version: str) -> Path:
    return Path(json.loads(run(["go", "mod", "download", "-json", f"{module}@{version}"], env=go_env()))["Dir"])


def required_version(gomod: Path, module: str) -> str:
    for line in gomod.read_text().splitlines():
        parts = line.strip().removeprefix("require").split()
        if len(parts) >= 2 and parts[0] == module:
            return parts[1]
    die(f"{gomod} requires no {module}")
    raise AssertionError


def manifest_files() -> tuple[list[Path], list[Path], list[Path]]:
    """(CRDs, the rest, the webhook configurations) from the modules, in the order they are applied."""
    serving = module_dir(SERVING_MODULE, KNATIVE_SERVING_VERSION)
    core = serving / "config" / "core"
    linked = {module: module_dir(module, required_version(serving / "go.mod", module)) / "config"
              for module in {*LINKED_CRDS, *LINKED_CONFIGMAPS}}
    crds = sorted((core / "300-resources").glob("*.yaml"))
    crds += [linked[module] / name for module, names in LINKED_CRDS.items() for name in names]
    rest = [path for pattern in CORE_FILES for path in sorted(core.glob(pattern))]
    rest += [linked[module] / name for module, names in LINKED_CONFIGMAPS.items() for name in names]
    webhooks = [core / name for name in WEBHOOK_FILES]
    missing = [str(path) for path in (*crds, *rest, *webhooks) if not path.is_file()]
    if missing:
        die(f"Knative's manifests moved: {missing}")
    return crds, rest, webhooks


def kubectl_ok(*args: str, stdin: str | None = None) -> bool:
    return subprocess.run([binary("kubectl"), f"--kubeconfig={kubeconfig_path()}", *args], input=stdin, text=True,
                          capture_output=True).returncode == 0


def as_objects(paths: list[Path], image: str) -> list[dict[str, Any]]:
    """The YAML files as JSON objects (kubectl converts them; hack/ has no YAML parser), images substituted."""
    text = "\n---\n".join(path.read_text() for path in paths)
    for name in COMMANDS:
        text = text.replace(f"ko://{SERVING_MODULE}/cmd/{name}", image)
    if "ko://" in text:
        die("Knative's manifests name an image this add-on does not build")
    out = kubectl("create", "--dry-run=client", "--validate=false", "-o", "json", "-f", "-", stdin=text)
    decoder, objects, index = json.JSONDecoder(), list[dict[str, Any]](), 0
    while index < len(out):
        if out[index].isspace():
            index += 1
            continue
        document, index = decoder.raw_decode(out, index)
        objects.extend(document["items"] if document.get("kind") == "List" else [document])
    return objects


def localize(obj: dict[str, Any], image: str) -> None:
    """What this cluster changes: the Deployments run on the real node, small; the config maps name the image."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind == "Deployment" and name in DEPLOYMENTS:
        spec = obj["spec"]["template"]["spec"]
        spec["nodeSelector"] = {NODE_LABEL[0]: NODE_LABEL[1]}
        spec["tolerations"] = [{**NODE_TAINT, "operator": "Equal"}]
        # Both drain their connections for up to their grace period: the cluster's `down` must not wait that long.
        spec["terminationGracePeriodSeconds"] = 30
        obj["spec"]["replicas"] = 1
        (container,) = spec["containers"]
        container["command"] = [f"/ko-app/{name}"]
        container["resources"]["requests"] = dict(REQUESTS)
    elif kind == "ConfigMap" and name == "config-deployment":
        obj["data"].update({
            "queue-sidecar-image": image,
            # The controller resolves tags to digests over HTTPS; the local registry speaks plain HTTP.
            "registries-skipping-tag-resolving": f"kind.local,ko.local,dev.local,localhost,{REGISTRY}",
            # Models load slowly: a Revision may take this long to become Ready.
            "progress-deadline": "600s",
        })
    elif kind == "ConfigMap" and name == "config-features":
        obj["data"].update(FEATURES)
    elif kind == "ConfigMap" and name == "config-autoscaler":
        obj["data"]["enable-scale-to-zero"] = "true"
    elif kind == "Image":
        obj["spec"]["image"] = image


def image_ref() -> str:
    """Build (cached) and push the image; `hack/images build` prints repository@digest last."""
    proc = subprocess.run([str(REPO_ROOT / "hack" / "images"), "build", IMAGE], text=True, capture_output=True)
    if proc.returncode != 0:
        die(f"hack/images build {IMAGE} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout.strip().splitlines()[-1]


def deployments_available() -> bool:
    out = json.loads(kubectl("get", "deployments", "-n", NAMESPACE, "-o", "json"))
    available = {item["metadata"]["name"] for item in out["items"]
                 if any(c["type"] == "Available" and c["status"] == "True"
                        for c in item.get("status", {}).get("conditions", []))}
    return available >= set(DEPLOYMENTS)


def webhook_answers() -> bool:
    """The API server hands a Configuration to the webhook (defaulting and validation) and gets answers."""
    return kubectl_ok("create", "--dry-run=server", "-o", "name", "-f", "-", stdin=json.dumps(WEBHOOK_PROBE))


def apply(objects: list[dict[str, Any]]) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", f"--field-manager={FIELD_MANAGER}", "-f", "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))


def cmd_knative_up() -> None:
    if not real_node_enabled() or running_pid("kubelet") is None:
        die("Knative runs on the real node: run `hack/localcluster up` first")
    started = time.monotonic()
    build_knative()
    image = image_ref()
    crds, rest, webhooks = manifest_files()
    installed_marker().write_text(image + "\n")
    crd_objects = as_objects(crds, image)
    apply(crd_objects)
    kubectl("wait", "--for=condition=Established", "--timeout=60s",
            *(f"crd/{obj['metadata']['name']}" for obj in crd_objects))
    # The rest only now: kubectl needs the CRDs to convert the queue-proxy's caching Image.
    for group in (rest, webhooks):
        objects = as_objects(group, image)
        for obj in objects:
            localize(obj, image)
        apply(objects)
    wait_for("Knative's Deployments to be Available", deployments_available, deadline_s=600)
    wait_for("Knative's webhook to answer", webhook_answers, deadline_s=120)
    log(f"Knative Serving {KNATIVE_SERVING_VERSION} ready in {time.monotonic() - started:.1f}s ({image})")


def knative_crds() -> list[str]:
    out = json.loads(kubectl("get", "crd", "-o", "json"))
    return [item["metadata"]["name"] for item in out["items"] if item["metadata"]["name"].endswith(".knative.dev")]


def cmd_knative_down() -> None:
    """Webhook configurations first (with the webhook gone they would refuse every change to Knative's objects
    and its config maps), then the namespace, then the CRDs (and so every Knative object left), waiting for each."""
    if running_pid("kube-apiserver") is None:
        installed_marker().unlink(missing_ok=True)
        return
    selector = "app.kubernetes.io/name=knative-serving"
    kubectl("delete", "mutatingwebhookconfigurations,validatingwebhookconfigurations", "-l", selector,
            "--ignore-not-found", "--wait=true")
    crds = knative_crds()
    if f"routes.{SERVING_GROUP}" in crds and running_pid("kubelet") is not None:
        # Routes and DomainMappings carry the controller's finalizers: they go while it still runs.
        kubectl("delete", ",".join(f"{kind}.{SERVING_GROUP}" for kind in FINALIZED_KINDS), "--all", "--all-namespaces",
                "--ignore-not-found", "--wait=true", "--timeout=120s")
    kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=300s")
    if crds:
        kubectl("delete", "crd", *crds, "--ignore-not-found", "--wait=true", "--timeout=300s")
    kubectl("delete", "clusterroles,clusterrolebindings", "-l", selector, "--ignore-not-found", "--wait=true")
    installed_marker().unlink(missing_ok=True)
    log("Knative Serving removed")


def knative_cluster_down() -> None:
    """The cluster's `down`: its etcd goes, and the node's drain stops Knative's pods like any other, so nothing
    of Knative stays on the host; only the marker goes."""
    installed_marker().unlink(missing_ok=True)
