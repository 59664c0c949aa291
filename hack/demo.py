"""`make demo`: the whole product on the embedded local cluster, on a real node, step by step.

Starts the local cluster (control plane, kwok nodes and one real node: kubelet + containerd), builds
the project's images with buildah and pushes them to the cluster's registry, runs MLflow in the
cluster, builds the tiny Phi-3 model and packages it into MLflow with the alias `champion`, installs
the operator with its Helm chart (model images go to the cluster's registry), applies
examples/phi3-cpu.yaml, and asks the model through its Service with the openai SDK, streaming. The
operator publishes the model version once as an OCI image and the pod mounts it as an image volume.
Then it moves the alias and shows the rollout to a new pod. Last, it logs the Phi-3 + MLflow recipe's
two paths with MLflow's own APIs (a transformers pipeline with task llm/v1/chat, and the recipe's
onnxruntime-genai PythonModel) and serves them from the catalog's images.
`--down` stops everything the demo started.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.cluster import Cluster, localcluster  # noqa: E402
from tests.support.realnode import (  # noqa: E402
    NODE_SELECTOR,
    NODE_TOLERATION,
    build_images,
    model_manifest,
    on_real_node,
    pod_start_phases,
    ready_model,
    service_base_url,
    serving_pods,
)
from tests.support.wait import wait_until  # noqa: E402

from phi3_operator.settings import DEFAULT_CATALOG_IMAGES  # noqa: E402

STATE = Path(os.environ.get("PHI3_DEMO_DIR", Path.home() / ".cache" / "phi3-operator" / "demo"))
NAMESPACE = "phi3-demo"
MLFLOW_NAMESPACE = "mlflow"
OPERATOR_NAMESPACE = "phi3-system"
# What pods use; the chart's default trackingUri names the same Service.
IN_CLUSTER_TRACKING_URI = f"http://mlflow.{MLFLOW_NAMESPACE}.svc:5000"
MODEL = "phi3-mini"
BIN = Path(sys.executable).parent
STEP_NUMBERS = itertools.count(1)


def step(text: str) -> None:
    print(f"\n==> [{next(STEP_NUMBERS)}] {text}", flush=True)


def info(text: str) -> None:
    print(f"    {text}", flush=True)


def run(*cmd: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, text=True, capture_output=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"demo: {' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def mlflow_manifests(image: str) -> list[dict[str, Any]]:
    """MLflow as users run it: a Deployment and a Service (sqlite and artifacts on an emptyDir: a demo)."""
    labels = {"app.kubernetes.io/name": "mlflow"}
    command = [
        "mlflow", "server", "--backend-store-uri", "sqlite:////data/mlflow.db",
        "--artifacts-destination", "/data/artifacts", "--serve-artifacts",
        "--host", "$(POD_IP)", "--port", "5000", "--workers", "1",
        # MLflow checks the Host header: the Service's names and cluster-internal addresses.
        "--allowed-hosts", f"mlflow.{MLFLOW_NAMESPACE}.svc:5000,mlflow.{MLFLOW_NAMESPACE}.svc.cluster.local:5000,10.*",
    ]
    security = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "mlflow", "labels": labels}, "spec": {
            "replicas": 1, "selector": {"matchLabels": labels}, "strategy": {"type": "Recreate"},
            "template": {"metadata": {"labels": labels}, "spec": {
                "nodeSelector": NODE_SELECTOR, "tolerations": [NODE_TOLERATION],
                "automountServiceAccountToken": False,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "mlflow", "image": image, "command": command,
                    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"},
                            {"name": "HOME", "value": "/tmp"}],
                    "ports": [{"name": "http", "containerPort": 5000}],
                    "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 2},
                    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
                    "securityContext": security,
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"}],
                }],
                "volumes": [{"name": "data", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
            }},
        }},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mlflow", "labels": labels},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 5000, "targetPort": "http"}]}},
    ]


def package(onnx_dir: Path, tracking_uri: str) -> str:
    out = run(str(BIN / "phi3-operator"), "package", "onnx", str(onnx_dir), "--name", MODEL,
              "--alias", "champion", "--tracking-uri", tracking_uri)
    return out.strip().splitlines()[-1]


def phi3(cluster: Cluster) -> dict[str, Any]:
    result: dict[str, Any] = cluster.get("phi3", MODEL, NAMESPACE)
    return result


def ready(cluster: Cluster) -> dict[str, Any] | None:
    obj = phi3(cluster)
    status = obj.get("status", {})
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    fresh = status.get("observedGeneration") == obj["metadata"]["generation"]
    return obj if fresh and conditions.get("Ready", {}).get("status") == "True" else None


MODEL_REGISTRY = "10.88.0.1:5000/demo"


def operator_values(images: dict[str, str]) -> dict[str, Any]:
    repository, digest = images["operator"].split("@", 1)
    return {
        "image": {"repository": repository, "digest": digest},
        "nodeSelector": NODE_SELECTOR, "tolerations": [NODE_TOLERATION],
        "config": {
            "defaultTrackingUri": IN_CLUSTER_TRACKING_URI,
            "resyncIntervalSeconds": 10, "modelRefreshIntervalSeconds": 5,
            # Model versions are published once to the node's registry and mounted as image volumes.
            "modelRegistry": MODEL_REGISTRY, "plainHttpRegistries": [MODEL_REGISTRY.split("/", maxsplit=1)[0]],
            # The chart's own CPU catalog, naming the images just built.
            "imageCatalog": [{"flavor": flavor, "target": target, "image": images[image],
                              "packagesFile": f"files/{image}.packages.txt"}
                             for flavor, target, image in DEFAULT_CATALOG_IMAGES if target == "cpu"],
        },
    }


def placed_example() -> dict[str, Any]:
    """examples/phi3-cpu.yaml on this machine's real node: its label, its taint, and a smaller CPU request
    so that the old and the new pod fit its 2 cores side by side during a rollout."""
    example = yaml.safe_load((REPO / "examples" / "phi3-cpu.yaml").read_text())
    placed = on_real_node(example)
    placed["spec"]["resources"] = copy.deepcopy(example["spec"]["resources"])
    placed["spec"]["resources"]["requests"] = {"cpu": "250m", "memory": "1Gi"}
    return placed


def ask(base_url: str, question: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=24
    )
    info(f"user:      {question}")
    info(f"assistant: {answer.choices[0].message.content!r}")
    info(f"usage:     {answer.usage.model_dump() if answer.usage else {}}")
    started = time.monotonic()
    streamed, first_token_s = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                max_tokens=24, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first_token_s = first_token_s if first_token_s is not None else time.monotonic() - started
            streamed.append(chunk.choices[0].delta.content)
    info(f"streamed:  {len(streamed)} chunks, first after {first_token_s or 0:.3f}s: {''.join(streamed)!r}")


def describe_delivery(cluster: Cluster, obj: dict[str, Any]) -> None:
    delivery = obj["status"].get("delivery", {})
    where = f": pods mount {delivery['image']}" if delivery.get("image") else ""
    info(f"model delivery: {delivery.get('mode', 'Download')}{where}")
    current = {p["metadata"]["name"] for p in serving_pods(cluster, MODEL, NAMESPACE)
               if not p["metadata"].get("deletionTimestamp")}

    def current_rollout_event() -> dict[str, Any] | None:
        """The operator reports a rollout once it completes, which can be a moment after the demo sees the new
        version served: wait briefly for the event that names a pod serving now."""
        events = json.loads(cluster.kubectl("get", "events", "-n", NAMESPACE, "--field-selector", "reason=PodReady",
                                            "-o", "json").stdout)["items"]
        return next((e for e in events if any(f"pod {name} " in e["message"] for name in current)), None)

    deadline = time.monotonic() + 30
    event = current_rollout_event()
    while event is None and time.monotonic() < deadline:
        time.sleep(1)
        event = current_rollout_event()
    if event is not None:
        info(f"event PodReady: {event['message']}")


def describe_pods(cluster: Cluster) -> None:
    for pod in serving_pods(cluster, MODEL, NAMESPACE):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        phases = pod_start_phases(pod)
        info(f"pod {pod['metadata']['name']} on node {pod['spec'].get('nodeName')} ({pod['status'].get('podIP')}): "
             + ", ".join(f"{name} +{seconds:.0f}s" for name, seconds in phases.items()))


USER_MODELS = ("recipe-pipeline", "recipe-pyfunc")


def serve_user_models(cluster: Cluster, tracking_uri: str, hf_dir: Path, onnx_variant_dir: Path) -> None:
    """The Phi-3 + MLflow recipe's two paths, logged with MLflow's own APIs (not our packager), served
    from the catalog with no image named."""
    from openai import OpenAI
    from tests.support.user_models import RECIPE_PROMPT, log_recipe_model, log_recipe_pipeline

    step("Logging the recipe's two paths with MLflow's own APIs: a transformers pipeline "
         "(mlflow.transformers.log_model, task llm/v1/chat) and its onnxruntime-genai PythonModel")
    uris = {"recipe-pipeline": log_recipe_pipeline(tracking_uri, hf_dir, name="recipe-pipeline"),
            "recipe-pyfunc": log_recipe_model(tracking_uri, onnx_variant_dir, name="recipe-pyfunc")}
    for name, uri in uris.items():
        info(f"registered {uri}")
        manifest = model_manifest(name, uri, IN_CLUSTER_TRACKING_URI)
        cluster.apply(manifest, NAMESPACE)
    info("applied a Phi3Model for each, with no image: the operator picks one from its catalog")
    for name in USER_MODELS:
        wait_until(lambda name=name: ready_model(cluster, name, NAMESPACE), timeout=900, interval=3,
                   message=f"{name} to be Ready")
    info(cluster.kubectl("get", "phi3", "-n", NAMESPACE).stdout.strip().replace("\n", "\n    "))
    for name in USER_MODELS:
        image = next(c for c in cluster.get("phi3", name, NAMESPACE)["status"]["conditions"]
                     if c["type"] == "ImageReady")["message"]
        (pod,) = [p for p in serving_pods(cluster, name, NAMESPACE) if not p["metadata"].get("deletionTimestamp")]
        phases = pod_start_phases(pod)
        info(f"{name}: {image}; pod Ready {phases.get('ready', 0):.0f}s after it was created")

    pipeline = OpenAI(base_url=f"{service_base_url(cluster, 'recipe-pipeline', NAMESPACE)}/v1", api_key="not-needed",
                      max_retries=0, timeout=120)
    question = [{"role": "user", "content": "Hello from the recipe"}]
    chunks = [c.choices[0].delta.content for c in pipeline.chat.completions.create(
        model="recipe-pipeline", messages=question, stream=True) if c.choices and c.choices[0].delta.content]  # type: ignore[arg-type]
    info(f"recipe-pipeline, chat streamed in {len(chunks)} chunks: {''.join(chunks)!r}")
    pyfunc = OpenAI(base_url=f"{service_base_url(cluster, 'recipe-pyfunc', NAMESPACE)}/v1", api_key="not-needed",
                    max_retries=0, timeout=120)
    completion = pyfunc.completions.create(model="recipe-pyfunc", prompt=RECIPE_PROMPT)
    info(f"recipe-pyfunc, completions: {completion.choices[0].text!r}")


def up() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    step("Starting the local cluster: etcd, kube-apiserver, controller-manager, scheduler, kwok, and a real node")
    out = localcluster("up").stdout.strip().splitlines()[-1]
    cluster = Cluster(kubeconfig=Path(localcluster("kubeconfig").stdout.strip()))
    info(out)
    info(cluster.kubectl("get", "nodes", "-o", "wide").stdout.strip().replace("\n", "\n    "))

    step("Building images/operator, images/mlserver-cpu, images/mlserver-torch-cpu and images/mlflow with buildah, "
         "pushing to the cluster's registry")
    images = build_images("operator", "mlserver-cpu", "mlserver-torch-cpu", "mlflow")
    for name, ref in images.items():
        info(f"{name}: {ref}")

    step(f"Running MLflow in the cluster ({IN_CLUSTER_TRACKING_URI}), from images/mlflow")
    cluster.kubectl("create", "namespace", MLFLOW_NAMESPACE, check=False)
    cluster.apply(mlflow_manifests(images["mlflow"]), MLFLOW_NAMESPACE)
    cluster.kubectl("rollout", "status", "-n", MLFLOW_NAMESPACE, "deployment/mlflow", "--timeout=300s", timeout=320)
    tracking_uri = service_base_url(cluster, "mlflow", MLFLOW_NAMESPACE)
    info(f"MLflow is Ready; this host reaches it through its ClusterIP: {tracking_uri}")

    step("Building the tiny Phi-3 model (random weights, local tokenizer) and its ONNX variants")
    from tests.support.tiny_model import build_tiny_model

    tiny = build_tiny_model(STATE / "tiny-model")
    info(f"ONNX GenAI variants: {sorted(p.name for p in tiny.onnx_dir.iterdir() if p.is_dir())}")

    step(f"Packaging it into MLflow: phi3-operator package onnx ... --name {MODEL} --alias champion")
    first_uri = package(tiny.onnx_dir, tracking_uri)
    info(f"registered {first_uri} with alias champion")

    step("Installing the CRD and the operator: helm install phi3-operator charts/phi3-operator")
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/phi3models.phi3.ai", "--timeout=60s")
    values = STATE / "operator-values.yaml"
    values.write_text(yaml.safe_dump(operator_values(images)))
    helm = localcluster("which", "helm").stdout.strip().splitlines()[-1]
    run(helm, "upgrade", "--install", "phi3-operator", str(REPO / "charts" / "phi3-operator"),
        "-n", OPERATOR_NAMESPACE, "--create-namespace", "-f", str(values), "--wait", "--timeout", "5m",
        env=cluster.env)
    operator_pod = cluster.get("pods", namespace=OPERATOR_NAMESPACE)["items"][0]
    info(f"operator pod {operator_pod['metadata']['name']} runs {operator_pod['spec']['containers'][0]['image']}")

    step(f"kubectl apply -f examples/phi3-cpu.yaml -n {NAMESPACE} (placed on the real node)")
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    cluster.apply(placed_example(), NAMESPACE)
    obj = wait_until(lambda: ready(cluster), timeout=600, interval=2, message="Ready=True")
    info(cluster.kubectl("get", "phi3", "-n", NAMESPACE).stdout.strip().replace("\n", "\n    "))
    model = obj["status"]["model"]
    info(f"models:/{MODEL}@champion resolved to {model['resolvedUri']} (run {model.get('runId', '')})")
    info(f"endpoint: {obj['status']['endpoint']['chatCompletions']}")
    describe_delivery(cluster, obj)
    describe_pods(cluster)

    base_url = service_base_url(cluster, MODEL, NAMESPACE)
    step(f"Asking the model through its Service ({base_url}) with the openai SDK")
    ask(base_url, "Hello! Who are you?")
    info("The tiny model has random weights, so the words are noise; the path is real: this answer")
    info("came from the runtime container of the pod above, through the Service.")

    step("Packaging a new version and moving the alias champion to it")
    second_uri = package(tiny.onnx_dir, tracking_uri)
    info(f"registered {second_uri}; champion now points at it")

    def rolled() -> dict[str, Any] | None:
        current = ready(cluster)
        if not current or current["status"]["model"]["resolvedUri"] != second_uri:
            return None
        pods = [p for p in serving_pods(cluster, MODEL, NAMESPACE) if not p["metadata"].get("deletionTimestamp")]
        uris = {p["metadata"].get("annotations", {}).get("phi3.ai/model-uri") for p in pods}
        return current if uris == {second_uri} else None

    wait_until(rolled, timeout=600, interval=2, message=f"the rollout to {second_uri}")
    deployment = cluster.get("deployment", MODEL, NAMESPACE)
    info(f"Deployment now serves {deployment['spec']['template']['metadata']['annotations']['phi3.ai/model-uri']}")
    info(cluster.kubectl("get", "phi3", "-n", NAMESPACE).stdout.strip().replace("\n", "\n    "))
    describe_delivery(cluster, cluster.get("phi3", MODEL, NAMESPACE))
    describe_pods(cluster)
    events = cluster.kubectl("get", "events", "-n", NAMESPACE, "--field-selector",
                             "reason=ModelVersionChanged", "-o", "json").stdout
    for event in json.loads(events)["items"][-1:]:
        info(f"event ModelVersionChanged: {event['message']}")
    ask(base_url, "And now?")

    serve_user_models(cluster, tracking_uri, tiny.hf_dir, tiny.variant_dir("cpu-int4"))

    print(f"\nDemo finished in {time.monotonic() - started:.0f}s. Everything is still running, so you can look:")
    print(f"  eval \"$({REPO / 'hack' / 'localcluster'} env)\"   # PATH with the cached kubectl and helm, KUBECONFIG")
    print(f"  kubectl get phi3,deploy,svc,pods -n {NAMESPACE} -o wide")
    print(f"  kubectl logs -n {NAMESPACE} deploy/{MODEL} -c runtime")
    print(f"  MLflow: {tracking_uri}   operator: kubectl logs -n {OPERATOR_NAMESPACE} deploy/phi3-operator")
    print("Clean up with: make demo-down")


def down() -> None:
    localcluster("down")
    print("local cluster stopped (the node's pods, the operator and MLflow with it)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--down", action="store_true", help="stop what the demo started")
    args = parser.parse_args()
    down() if args.down else up()
    return 0


if __name__ == "__main__":
    sys.exit(main())
