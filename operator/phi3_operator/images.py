"""Runtime image selection from the catalog, and the ONNX variant a target loads."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from phi3_operator.resolve import ResolvedModel
from phi3_operator.settings import CatalogImage, OperatorSettings, normalise_package
from phi3_operator.spec import Phi3ModelSpec

REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
# Packages every runtime image provides implicitly or that MLflow pins for the logging
# environment only; they never force a build.
ALWAYS_SATISFIED = {"mlflow", "mlflow-skinny", "cloudpickle", "pip", "setuptools", "wheel"}


@dataclass(frozen=True)
class ImageDecision:
    image: str
    source: str  # Override | Catalog | Build
    missing: tuple[str, ...] = ()
    base_image: str = ""


class NoCompatibleImage(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def requirement_names(requirements: Iterable[str]) -> list[str]:
    names = []
    for line in requirements:
        match = REQUIREMENT_NAME.match(line)
        if match:
            names.append(normalise_package(match.group(1)))
    return names


# A model logged on a CPU machine names the CPU builds; a CUDA image carries their GPU twins.
CUDA_EQUIVALENTS = {"onnxruntime-genai": "onnxruntime-genai-cuda", "onnxruntime": "onnxruntime-gpu"}


def missing_packages(
    requirements: Iterable[str], carried: Mapping[str, str], target: str = "cpu"
) -> tuple[str, ...]:
    def satisfied(name: str) -> bool:
        if name in carried or name in ALWAYS_SATISFIED:
            return True
        return target == "cuda" and CUDA_EQUIVALENTS.get(name, "") in carried

    return tuple(sorted(name for name in requirement_names(requirements) if not satisfied(name)))


def requirements_named(requirements: Iterable[str], names: Iterable[str]) -> tuple[str, ...]:
    """The requirement lines (with their versions) of these packages: what a build installs. Those the
    base image carries stay out: pip would otherwise look for the logging machine's exact pins of them."""
    wanted = set(names)
    return tuple(line for line in requirements if (found := requirement_names([line])) and found[0] in wanted)


def catalog_entry(catalog: Iterable[CatalogImage], flavor: str, target: str) -> CatalogImage | None:
    entries = list(catalog)
    for entry in entries:
        if entry.flavor == flavor and entry.target == target:
            return entry
    # Our runtime loads any pyfunc, so a generic pyfunc image is a valid fallback.
    for entry in entries:
        if entry.flavor == "pyfunc" and entry.target == target:
            return entry
    return None


def select_image(spec: Phi3ModelSpec, model: ResolvedModel, settings: OperatorSettings) -> ImageDecision:
    if spec.image.override:
        return ImageDecision(image=spec.image.override, source="Override")
    target = spec.hardware.target
    entry = catalog_entry(settings.image_catalog, model.flavor, target)
    if entry is None:
        raise NoCompatibleImage(f"the image catalog has no {target} image for flavor {model.flavor!r}")
    missing = missing_packages(model.requirements, entry.packages, target) if entry.packages else ()
    if spec.image.policy == "Build" or missing:
        if spec.image.policy == "Prebuilt":
            raise NoCompatibleImage(
                f"{entry.image} lacks {', '.join(missing)} required by {model.uri}; "
                "set image.policy to Auto or Build, or image.override"
            )
        return ImageDecision(image="", source="Build", missing=missing, base_image=entry.image)
    return ImageDecision(image=entry.image, source="Catalog")


def onnx_variant(target: str, variants: Iterable[str]) -> str:
    """The variant a pod of this target should load: the artifact's best match, else the conventional name."""
    available = list(variants)
    for preferred in (f"{target}-int4", f"{target}-fp16", f"{target}-fp32"):
        if preferred in available:
            return preferred
    same_target = [v for v in available if v.startswith(target)]
    return same_target[0] if same_target else f"{target}-int4"
