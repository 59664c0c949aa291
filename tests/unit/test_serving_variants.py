"""Finding and choosing ONNX GenAI variants in a model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi3_serving.variants import (
    NotAnOnnxGenAIModel,
    OnnxVariant,
    UnknownVariant,
    choose_variant,
    context_length,
    execution_target,
    find_variants,
)


def make_variant(folder: Path, provider: str | None = None) -> Path:
    folder.mkdir(parents=True)
    options = [{provider: {}}] if provider else []
    config = {"model": {"context_length": 4096, "decoder": {"session_options": {"provider_options": options}}}}
    (folder / "genai_config.json").write_text(json.dumps(config))
    return folder


def test_variant_folders_in_preference_order(tmp_path: Path) -> None:
    for name in ("cpu-fp32", "cuda-fp16", "cpu-int4", "cuda-int4"):
        make_variant(tmp_path / name)
    (tmp_path / "notes").mkdir()
    assert [variant.name for variant in find_variants(tmp_path)] == ["cpu-int4", "cuda-int4", "cuda-fp16", "cpu-fp32"]


def test_single_folder_model(tmp_path: Path) -> None:
    make_variant(tmp_path / "m", provider="cuda")
    variants = find_variants(tmp_path / "m")
    assert variants == [OnnxVariant("default", tmp_path / "m")]
    assert variants[0].target == "cuda"


def test_folder_without_genai_config_is_named(tmp_path: Path) -> None:
    (tmp_path / "cpu-int4").mkdir()
    with pytest.raises(NotAnOnnxGenAIModel, match=r"not an ONNX GenAI model folder.*genai_config\.json"):
        find_variants(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(NotAnOnnxGenAIModel, match="not a directory"):
        find_variants(tmp_path / "nope")


def variants(*names: str) -> list[OnnxVariant]:
    return [OnnxVariant(name, Path(name)) for name in names]


def test_requested_variant_wins() -> None:
    assert choose_variant(variants("cpu-int4", "cuda-int4"), "cuda-int4", cuda_available=False).name == "cuda-int4"


def test_unknown_requested_variant_lists_what_exists() -> None:
    with pytest.raises(UnknownVariant, match="no ONNX variant 'cuda-fp16'; it has: cpu-int4, cpu-fp32"):
        choose_variant(variants("cpu-int4", "cpu-fp32"), "cuda-fp16", cuda_available=False)


def test_autodetect_prefers_cuda_when_a_gpu_is_usable() -> None:
    available = variants("cpu-int4", "cuda-int4", "cpu-fp32")
    assert choose_variant(available, None, cuda_available=True).name == "cuda-int4"
    assert choose_variant(available, None, cuda_available=False).name == "cpu-int4"


def test_cuda_only_model_on_a_cpu_machine() -> None:
    with pytest.raises(UnknownVariant, match="CPU only"):
        choose_variant(variants("cuda-int4"), None, cuda_available=False)


def test_config_readers() -> None:
    assert context_length({"model": {"context_length": 128}}) == 128
    assert context_length({"search": {"max_length": 64}}) == 64
    assert execution_target({}) == "cpu"
