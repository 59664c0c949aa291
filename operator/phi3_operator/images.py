"""Runtime image selection from the catalog, and the ONNX variant a target loads."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

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


def pin_met(specifier: SpecifierSet, version: str) -> bool:
    """Whether a carried version meets a requirement's specifier.

    MLflow pins every requirement to the logging machine's exact version (`numpy==2.4.7`), which records
    what the model was logged with rather than what it needs; a release of the same major.minor meets
    such a pin, another minor does not (so `torch==2.4.0` builds on an image with torch 2.15). Any other
    specifier (`>=`, `~=`, `<`, `!=`) is taken as written."""
    try:
        carried = Version(version)
    except InvalidVersion:
        return True  # a version pip could not have installed either: the name is what we can judge
    for clause in specifier:
        if clause.operator == "==" and "*" not in clause.version:
            try:
                pinned = Version(clause.version)
            except InvalidVersion:
                return False
            if (pinned.epoch, pinned.release[:2]) != (carried.epoch, carried.release[:2]):
                return False
        elif not clause.contains(carried, prereleases=True):
            return False
    return True


def missing_packages(
    requirements: Iterable[str], carried: Mapping[str, str], target: str = "cpu"
) -> tuple[str, ...]:
    """The packages an image with `carried` (name -> version) lacks, or carries at a version the
    requirements rule out: what a build must install."""
    missing: set[str] = set()
    for line in requirements:
        if not (names := requirement_names([line])):
            continue
        name = names[0]
        if name in ALWAYS_SATISFIED:
            continue
        try:
            requirement: Requirement | None = Requirement(line.split("#", 1)[0].strip())
        except InvalidRequirement:
            requirement = None  # pip's own syntax (an option, a URL): judge it by name alone
        if requirement is not None and requirement.marker is not None and not requirement.marker.evaluate():
            continue
        found = name if name in carried else CUDA_EQUIVALENTS.get(name, "") if target == "cuda" else ""
        met = found in carried and (requirement is None or pin_met(requirement.specifier, carried[found]))
        if not met:
            missing.add(name)
    return tuple(sorted(missing))


def requirements_named(requirements: Iterable[str], names: Iterable[str]) -> tuple[str, ...]:
    """The requirement lines (with their versions) of these packages: what a build installs. Those the
    base image carries stay out: pip would otherwise look for the logging machine's exact pins of them."""
    wanted = set(names)
    return tuple(line for line in requirements if (found := requirement_names([line])) and found[0] in wanted)


def candidate_entries(catalog: Iterable[CatalogImage], flavor: str, target: str) -> list[CatalogImage]:
    """The catalog's images for this flavor and target, in catalog order; then the generic pyfunc ones,
    which our runtime can also load this flavor from."""
    entries = [entry for entry in catalog if entry.target == target]
    exact = [entry for entry in entries if entry.flavor == flavor]
    generic = [entry for entry in entries if entry.flavor == "pyfunc" and entry not in exact]
    return exact + generic


def select_image(spec: Phi3ModelSpec, model: ResolvedModel, settings: OperatorSettings) -> ImageDecision:
    """The first catalog image that carries everything the model requires; if none does, a build on
    the first image of the model's flavor (what a smaller image plus the missing packages gives)."""
    if spec.image.override:
        return ImageDecision(image=spec.image.override, source="Override")
    target = spec.hardware.target
    candidates = candidate_entries(settings.image_catalog, model.flavor, target)
    if not candidates:
        raise NoCompatibleImage(f"the image catalog has no {target} image for flavor {model.flavor!r}")
    lacking = [
        missing_packages(model.requirements, entry.packages, target) if entry.packages else ()
        for entry in candidates
    ]
    if spec.image.policy != "Build":
        for entry, missing in zip(candidates, lacking, strict=True):
            if not missing:
                return ImageDecision(image=entry.image, source="Catalog")
    entry, missing = candidates[0], lacking[0]
    if spec.image.policy == "Prebuilt":
        raise NoCompatibleImage(
            f"{entry.image} lacks {', '.join(missing)} required by {model.uri}; "
            "set image.policy to Auto or Build, or image.override"
        )
    return ImageDecision(image="", source="Build", missing=missing, base_image=entry.image)


def onnx_variant(target: str, variants: Iterable[str]) -> str:
    """The variant a pod of this target should load: the artifact's best match, else the conventional name."""
    available = list(variants)
    for preferred in (f"{target}-int4", f"{target}-fp16", f"{target}-fp32"):
        if preferred in available:
            return preferred
    same_target = [v for v in available if v.startswith(target)]
    return same_target[0] if same_target else f"{target}-int4"
