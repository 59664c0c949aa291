"""The recipe's two paths serve on CPU from the image catalog, with no build and no image override.

An operator whose catalog is the chart's CPU catalog (the images built here, with what their
packages.txt says they carry) picks mlserver-torch-cpu for the recipe's transformers pipeline
(`mlflow.transformers.log_model(task="llm/v1/chat")`, requiring torch) and for the recipe's
PythonModel (which lists torch among its requirements), and serves both from pods on the real node.
A torch pin that no catalog image meets still needs a build.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI
from tests.support.operator import OperatorProcess, operator_with_config
from tests.support.realnode import (
    BRIDGE_ADDRESS,
    RealPath,
    build_images,
    catalog_packages,
    diagnose,
    model_manifest,
    pod_start_phases,
    ready_model,
    service_base_url,
    serving_pods,
)
from tests.support.user_models import RECIPE_PROMPT, log_recipe_model, log_recipe_pipeline
from tests.support.wait import wait_until

from phi3_operator.settings import DEFAULT_CATALOG_IMAGES

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CPU_IMAGES = sorted({image for _, target, image in DEFAULT_CATALOG_IMAGES if target == "cpu"})


@pytest.fixture(scope="module")
def catalog_operator(real_path: RealPath, operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[dict[str, str]]:
    """An operator with the default CPU catalog of real images (in its order); returns name -> image.
    The session's operator, whose catalog names images that exist nowhere, is stopped meanwhile: two
    operators on one model fight over its Deployment."""
    images = build_images(*CPU_IMAGES)
    config = {
        "plainHttpRegistries": [f"{BRIDGE_ADDRESS}:5000"],
        "imageCatalog": [{"flavor": flavor, "target": target, "image": images[image],
                          "packages": catalog_packages(image)}
                         for flavor, target, image in DEFAULT_CATALOG_IMAGES if target == "cpu"],
    }
    with operator_with_config(operator, config, tmp_path_factory.mktemp("catalog-realnode")):
        yield {image: images[image] for image in CPU_IMAGES}


def _condition(real_path: RealPath, name: str, kind: str) -> dict[str, Any]:
    obj = real_path.cluster.get("phi3", name, real_path.namespace)
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def test_the_recipes_two_paths_serve_on_cpu_from_the_catalog(real_path: RealPath, catalog_operator: dict[str, str]
                                                             ) -> None:
    cluster, namespace, tracking_uri = real_path.cluster, real_path.namespace, real_path.mlflow.tracking_uri
    hf_dir = real_path.onnx_dir.parent / "hf"
    uris = {
        "catalog-pipeline": log_recipe_pipeline(tracking_uri, hf_dir, name="catalog-pipeline"),
        "catalog-old-torch": log_recipe_pipeline(tracking_uri, hf_dir, name="catalog-old-torch", torch_pin="2.4.0"),
        "catalog-recipe": log_recipe_model(tracking_uri, real_path.onnx_dir / "cpu-int4", name="catalog-recipe"),
    }
    for name, uri in uris.items():
        manifest = model_manifest(name, uri, tracking_uri)
        assert "override" not in manifest["spec"].get("image", {})
        cluster.apply(manifest, namespace)
    served = ("catalog-pipeline", "catalog-recipe")
    try:
        for name in served:
            # The first start pulls the 5.5 GB image onto the node.
            wait_until(lambda name=name: ready_model(cluster, name, namespace), timeout=900, interval=3,
                       message=f"{name} to be Ready from the catalog")
        needs_build = wait_until(
            lambda: (c := _condition(real_path, "catalog-old-torch", "ImageReady")).get("reason") == "RegistryRequired"
            and c, timeout=120, interval=2, message="catalog-old-torch to need a build")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(cluster, namespace, real_path.operator)}") from None

    torch_image = catalog_operator["mlserver-torch-cpu"]
    for name in served:
        assert _condition(real_path, name, "ImageReady")["message"] == f"using {torch_image}"
        (pod,) = [p for p in serving_pods(cluster, name, namespace) if p["status"].get("phase") == "Running"]
        assert pod["spec"]["containers"][0]["image"] == torch_image
        print(f"{name}: pod start phases {json.dumps(pod_start_phases(pod))}")
    assert "torch" in needs_build["message"] and needs_build["status"] == "False", needs_build

    # The pipeline answers the openai SDK, whole and streamed, through its Service.
    base = service_base_url(cluster, "catalog-pipeline", namespace)
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "hello from the catalog"}]
    answer = client.chat.completions.create(model="catalog-pipeline", messages=messages, temperature=0)  # type: ignore[arg-type]
    assert answer.choices[0].message.content and answer.usage and answer.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="catalog-pipeline", messages=messages, temperature=0,  # type: ignore[arg-type]
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content

    # The recipe's PythonModel: its own /invocations input and OpenAI completions give the same answer.
    recipe = service_base_url(cluster, "catalog-recipe", namespace)
    request = urllib.request.Request(f"{recipe}/invocations", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"inputs": {"prompt": RECIPE_PROMPT}}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        reference = json.loads(response.read())["predictions"]
    completion = OpenAI(base_url=f"{recipe}/v1", api_key="unused", max_retries=0, timeout=120).completions.create(
        model="catalog-recipe", prompt=RECIPE_PROMPT)
    assert reference and completion.choices[0].text == reference
    for name in uris:
        cluster.kubectl("delete", "phi3", name, "-n", namespace, "--wait=false", check=False)
