"""ONNX GenAI model folders and their variants.

A packaged ONNX model is either one onnxruntime-genai folder (it has `genai_config.json`) or a
folder of such folders, one per variant, named `<target>-<precision>`: `cpu-int4`, `cpu-fp32`,
`cuda-int4`, `cuda-fp16`. The runtime loads one of them, chosen here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENAI_CONFIG = "genai_config.json"
# The name a single-folder model is known by.
SINGLE_VARIANT = "default"
ENV_VARIANT = "PHI3_ONNX_VARIANT"

# Which precision to prefer when the caller does not name a variant: the smallest first, since
# a quantised model is what one ships to serve on that hardware.
_PRECISION_PREFERENCE = ("int4", "int8", "fp16", "bf16", "fp32")


class NotAnOnnxGenAIModel(ValueError):
    """A folder that holds no onnxruntime-genai model."""


class UnknownVariant(ValueError):
    """The requested variant is not in the model."""


@dataclass(frozen=True)
class OnnxVariant:
    name: str
    path: Path

    @property
    def target(self) -> str:
        """`cpu` or `cuda` (or whatever prefix the name carries); a single folder reads its config."""
        if self.name == SINGLE_VARIANT:
            return execution_target(read_genai_config(self.path))
        return self.name.split("-", 1)[0]


def read_genai_config(folder: Path) -> dict[str, Any]:
    config_path = folder / GENAI_CONFIG
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except FileNotFoundError as error:
        raise NotAnOnnxGenAIModel(f"{folder} has no {GENAI_CONFIG}: it is not an ONNX GenAI model folder") from error
    except json.JSONDecodeError as error:
        raise NotAnOnnxGenAIModel(f"{config_path} is not valid JSON: {error}") from error
    return config


def execution_target(genai_config: dict[str, Any]) -> str:
    """`cuda` when the decoder asks for the CUDA provider, else `cpu`."""
    options = genai_config.get("model", {}).get("decoder", {}).get("session_options", {})
    for provider in options.get("provider_options", []):
        if isinstance(provider, dict) and "cuda" in provider:
            return "cuda"
    return "cpu"


def context_length(genai_config: dict[str, Any]) -> int:
    model = genai_config.get("model", {})
    return int(model.get("context_length") or genai_config.get("search", {}).get("max_length") or 4096)


def find_variants(root: Path) -> list[OnnxVariant]:
    """The variants under `root`, in preference order; raises if there are none."""
    if not root.is_dir():
        raise NotAnOnnxGenAIModel(f"{root} is not a directory")
    if (root / GENAI_CONFIG).is_file():
        return [OnnxVariant(SINGLE_VARIANT, root)]
    variants = [
        OnnxVariant(child.name, child)
        for child in root.iterdir()
        if child.is_dir() and (child / GENAI_CONFIG).is_file()
    ]
    if not variants:
        raise NotAnOnnxGenAIModel(
            f"{root} is not an ONNX GenAI model folder: it has no {GENAI_CONFIG} and no variant "
            f"subfolders (such as cpu-int4/) that have one"
        )
    return sorted(variants, key=lambda variant: _preference_key(variant.name))


def _preference_key(name: str) -> tuple[int, str]:
    for rank, precision in enumerate(_PRECISION_PREFERENCE):
        if name.endswith(f"-{precision}"):
            return rank, name
    return len(_PRECISION_PREFERENCE), name


def choose_variant(variants: Sequence[OnnxVariant], requested: str | None, cuda_available: bool) -> OnnxVariant:
    """The named variant, else the preferred CUDA one when a GPU can be used, else the preferred CPU one."""
    names = ", ".join(variant.name for variant in variants)
    if requested:
        for variant in variants:
            if variant.name == requested:
                return variant
        if len(variants) == 1 and variants[0].name == SINGLE_VARIANT:
            # A single-folder model has no named variants; take it whatever the operator asked for.
            return variants[0]
        raise UnknownVariant(f"the model has no ONNX variant {requested!r}; it has: {names}")
    by_target: dict[str, list[OnnxVariant]] = {}
    for variant in variants:
        by_target.setdefault(variant.target, []).append(variant)
    if cuda_available and by_target.get("cuda"):
        return by_target["cuda"][0]
    if by_target.get("cpu"):
        return by_target["cpu"][0]
    raise UnknownVariant(
        f"the model has no ONNX variant this machine can run ({'CUDA' if cuda_available else 'CPU only'}); "
        f"it has: {names}"
    )
