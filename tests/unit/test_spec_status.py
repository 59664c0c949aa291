"""Spec parsing, conditions, live-state comparison, image selection: pure functions."""

from __future__ import annotations

from typing import Any

import pytest

from phi3_operator.images import (
    ImageDecision,
    NoCompatibleImage,
    missing_packages,
    onnx_variant,
    requirements_named,
    select_image,
)
from phi3_operator.k8s import is_subset
from phi3_operator.resolve import ResolvedModel, describe_mlmodel
from phi3_operator.settings import OperatorSettings, parse_catalog_entry
from phi3_operator.spec import SpecError, parse_spec
from phi3_operator.status import (
    Condition,
    ObservedState,
    build_status,
    deployment_available,
    merge_conditions,
    status_changed,
)

BASE: dict[str, Any] = {"model": {"uri": "models:/m@champion"}, "hardware": {"target": "cpu"}}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**BASE, "model": {"uri": "ftp://x"}}, "model.uri must be models:/NAME/VERSION"),
        ({**BASE, "hardware": {"target": "tpu"}}, "must be one of cpu, cuda"),
        ({**BASE, "hardware": {"target": "cpu", "gpus": 1}}, "only allowed with target: cuda"),
        ({**BASE, "hardware": {"target": "cuda", "gpus": 0}}, "gpus must be >= 1 and <= 16, got 0"),
        ({**BASE, "replicas": -1}, "replicas must be >= 0 and <= 1000"),
        ({**BASE, "replicas": "2"}, "replicas must be an integer"),
        ({**BASE, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "less than or equal to"),
        ({**BASE, "autoscaling": {"minReplicas": 6}}, r"minReplicas must be <= maxReplicas \(6 > 4\)"),
        ({**BASE, "image": {"policy": "Never"}}, "one of Auto, Prebuilt, Build"),
        ({**BASE, "generation": {"topP": 0}}, "topP must be > 0 and <= 1"),
        ({"hardware": {"target": "cpu"}}, "model.uri is required"),
    ],
)
def test_parse_spec_rejects(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_parse_spec_defaults() -> None:
    spec = parse_spec(BASE)
    assert spec.replicas == 1 and spec.service.port == 8080 and spec.image.policy == "Auto"
    assert spec.hardware.gpus == 0
    assert parse_spec({**BASE, "hardware": {"target": "cuda"}}).hardware.gpus == 1


def test_last_transition_time_moves_only_on_status_change() -> None:
    first = merge_conditions([], [Condition("Ready", "False", "Rolling", "a")], 1, "t1")
    same = merge_conditions(first, [Condition("Ready", "False", "Other", "b")], 2, "t2")
    flipped = merge_conditions(same, [Condition("Ready", "True", "Ready", "c")], 2, "t3")
    assert first[0]["lastTransitionTime"] == "t1"
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == "t3"


def test_unchanged_status_is_not_rewritten() -> None:
    observed = ObservedState(generation=1, conditions=[Condition("Available", "True", "Ok", "fine")],
                             replicas=1, ready_replicas=1)
    first = build_status({}, observed, "t1")
    second = build_status(first, observed, "t2")
    assert not status_changed(first, second)
    assert first["phase"] == "Ready" and first["readyReplicasText"] == "1/1"


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        ([Condition("ModelResolved", "False", "MLflowUnavailable", "")], "Pending"),
        ([Condition("ModelResolved", "False", "ModelNotFound", "")], "Failed"),
        ([Condition("ModelResolved", "True", "Resolved", ""), Condition("Available", "False", "RolloutInProgress", "")],
         "Deploying"),
    ],
)
def test_phase(conditions: list[Condition], phase: str) -> None:
    assert build_status({}, ObservedState(generation=1, conditions=conditions), "t")["phase"] == phase


def test_deployment_available() -> None:
    live = {"metadata": {"generation": 2}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 2, "updatedReplicas": 2, "availableReplicas": 2, "readyReplicas": 2}}
    assert deployment_available(live)[0].status == "True"
    stale = {**live, "status": {**live["status"], "observedGeneration": 1}}
    assert deployment_available(stale)[0].reason == "RolloutInProgress"
    assert deployment_available(None)[0].reason == "DeploymentMissing"
    # A new pod that never becomes Ready counts as updated while the old pod is the one available.
    stalled = {"metadata": {"generation": 3}, "spec": {"replicas": 1},
               "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 1,
                          "readyReplicas": 1, "unavailableReplicas": 1}}
    assert deployment_available(stalled)[0].reason == "RolloutInProgress"


@pytest.mark.parametrize(
    ("desired", "live", "expected"),
    [
        ({"a": 1}, {"a": 1, "b": 2}, True),
        ({"a": 1}, {"a": 2}, False),
        ({"a": {}}, {}, True),
        ({"a": []}, {"b": 1}, True),
        ({"l": [{"x": 1}]}, {"l": [{"x": 1, "y": 2}]}, True),
        ({"l": [{"x": 1}]}, {"l": [{"x": 1}, {"x": 2}]}, False),
        ({"n": "1"}, {"n": 1}, True),
        ({"b": False}, {"b": 0}, False),
    ],
)
def test_is_subset(desired: Any, live: Any, expected: bool) -> None:
    assert is_subset(desired, live) is expected


def test_describe_mlmodel_flavors() -> None:
    transformers = describe_mlmodel({"flavors": {"transformers": {"task": "llm/v1/chat"},
                                                 "python_function": {"python_version": "3.11.7"}}}, "torch==2.5\n")
    assert transformers["flavor"] == "transformers" and transformers["task"] == "llm/v1/chat"
    assert transformers["requirements"] == ("torch==2.5",)
    metadata = {"phi3_flavor": "onnx-genai", "phi3_onnx_variants": ["cpu-int4", "cuda-int4"]}
    onnx = describe_mlmodel({"flavors": {"python_function": {}}, "metadata": metadata}, "")
    assert onnx["flavor"] == "onnx-genai" and onnx["variants"] == ("cpu-int4", "cuda-int4")
    assert describe_mlmodel({"flavors": {"python_function": {}}}, "")["flavor"] == "pyfunc"


def test_image_selection() -> None:
    entry = parse_catalog_entry({"flavor": "pyfunc", "target": "cpu", "image": "img:cpu",
                                 "packages": ["mlflow==3.17.2", "numpy==2.1"]})
    settings = OperatorSettings(image_catalog=(entry,))
    fits = ResolvedModel(uri="models:/m/1", requirements=("numpy>=1.0", "mlflow==3.17.2"))
    needs = ResolvedModel(uri="models:/m/1", requirements=("numpy", "scikit-learn==1.5"))
    assert select_image(parse_spec(BASE), fits, settings).image == "img:cpu"
    assert select_image(parse_spec(BASE), needs, settings).source == "Build"
    assert missing_packages(needs.requirements, entry.packages) == ("scikit-learn",)
    prebuilt = parse_spec({**BASE, "image": {"policy": "Prebuilt"}})
    with pytest.raises(NoCompatibleImage, match="scikit-learn"):
        select_image(prebuilt, needs, settings)
    override = parse_spec({**BASE, "image": {"override": "mine:1"}})
    assert select_image(override, needs, settings).image == "mine:1"


def test_a_build_installs_only_what_the_base_lacks_with_its_pin() -> None:
    requirements = ("mlflow==3.99.0", "scikit-learn==1.5.2", "Phi3_Build.Probe>=1", "# a comment", "")
    missing = missing_packages(requirements, {"mlflow": "3.17.2"})
    assert missing == ("phi3-build-probe", "scikit-learn")
    assert requirements_named(requirements, missing) == ("scikit-learn==1.5.2", "Phi3_Build.Probe>=1")


def test_cuda_images_satisfy_cpu_builds_of_onnxruntime() -> None:
    carried = {"onnxruntime-genai-cuda": "0.18.0", "onnxruntime-gpu": "1.22"}
    requirements = ["onnxruntime-genai==0.18.0", "onnxruntime"]
    assert missing_packages(requirements, carried, "cuda") == ()
    assert missing_packages(requirements, carried, "cpu") == ("onnxruntime", "onnxruntime-genai")


def test_onnx_variant() -> None:
    assert onnx_variant("cuda", ["cpu-int4", "cuda-fp16", "cuda-int4"]) == "cuda-int4"
    assert onnx_variant("cpu", ["cpu-fp32"]) == "cpu-fp32"
    assert onnx_variant("cuda", []) == "cuda-int4"


def test_mlflow_exact_pins_are_met_within_the_same_minor_and_other_specifiers_as_written() -> None:
    carried = {"torch": "2.15.0", "numpy": "2.4.6", "pandas": "3.1.1"}
    assert missing_packages(["torch==2.15.1", "numpy==2.4.7", "pandas>=3"], carried) == ()
    assert missing_packages(["torch==2.4.0", "numpy<2", "pandas!=3.1.1"], carried) == ("numpy", "pandas", "torch")
    assert missing_packages(["torch==2.15.*", "numpy~=2.4.0"], carried) == ()
    assert missing_packages(["torch==2.16.*"], carried) == ("torch",)
    # A requirement for another platform does not apply; one pip reads but packaging cannot is judged by name.
    assert missing_packages(['pywin32==306; sys_platform == "win32"', "--extra-index-url x", "numpy"], carried) == ()


def test_the_first_catalog_image_that_carries_the_requirements_wins() -> None:
    small = parse_catalog_entry({"flavor": "pyfunc", "target": "cpu", "image": "small",
                                 "packages": ["numpy==2.4.6", "onnxruntime-genai==0.18.0"]})
    torch = parse_catalog_entry({"flavor": "pyfunc", "target": "cpu", "image": "torch",
                                 "packages": ["numpy==2.4.6", "onnxruntime-genai==0.18.0", "torch==2.15.0"]})
    transformers = parse_catalog_entry({"flavor": "transformers", "target": "cpu", "image": "torch",
                                        "packages": ["torch==2.15.0", "transformers==5.23.0"]})
    settings = OperatorSettings(image_catalog=(small, transformers, torch))
    recipe = ResolvedModel(uri="models:/recipe/1", requirements=("torch", "onnxruntime_genai", "numpy"))
    assert select_image(parse_spec(BASE), recipe, settings) == ImageDecision(image="torch", source="Catalog")
    plain = ResolvedModel(uri="models:/plain/1", requirements=("numpy==2.4.6",))
    assert select_image(parse_spec(BASE), plain, settings).image == "small"
    pipeline = ResolvedModel(uri="models:/chat/1", flavor="transformers", requirements=("torch==2.15.0",))
    assert select_image(parse_spec(BASE), pipeline, settings).image == "torch"
    # No image meets an old torch pin: build on the model's own flavor's first image.
    old = ResolvedModel(uri="models:/old/1", flavor="transformers", requirements=("torch==2.4.0",))
    decision = select_image(parse_spec(BASE), old, settings)
    assert (decision.source, decision.base_image, decision.missing) == ("Build", "torch", ("torch",))
