"""Phi-3's own tokenizer layout serves: a SentencePiece BPE model with byte fallback (`tokenizer.model`
beside `tokenizer.json`, LlamaTokenizer), as microsoft/Phi-3-mini ships it, where the rest of the suite's
models use byte-level BPE. Both flavors, through `phi3-operator serve` and the openai SDK."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support.serving import ServedProcess
from tests.support.tiny_model import TinyModel, TinyModelSpec, build_tiny_model

SPEC = replace(TinyModelSpec(), tokenizer="sentencepiece", vocab_size=512, variants=("cpu-int4",))
# Byte fallback is what makes text outside the learned pieces round-trip: accents, CJK, emoji.
TEXT = "Héllo wörld, 42 foxes: 日本語 ✓"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("sp-model"), SPEC)


@pytest.fixture(scope="module", params=("onnx", "transformers"))
def sp_served(request: pytest.FixtureRequest, sp_model: TinyModel, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[ServedProcess]:
    from phi3_serving.packaging import save_onnx_model, transformers_requirements

    workdir = tmp_path_factory.mktemp(f"sp-{request.param}")
    model_dir = workdir / "model"
    env = {}
    if request.param == "onnx":
        save_onnx_model(sp_model.onnx_dir, model_dir)
        env["PHI3_ONNX_VARIANT"] = "cpu-int4"
    else:  # as a user logs it: MLflow's transformers flavor, the llm/v1/chat task
        import mlflow.transformers
        import transformers

        pipeline = transformers.pipeline("text-generation", model=str(sp_model.hf_dir))
        mlflow.transformers.save_model(
            pipeline, str(model_dir), task="llm/v1/chat", pip_requirements=transformers_requirements()
        )
    with ServedProcess(str(model_dir), "sp", workdir / "serve.log", env={**env, "HOME": str(workdir)}) as served:
        yield served


def test_the_model_has_phi3s_tokenizer_files(sp_model: TinyModel) -> None:
    import json

    assert (sp_model.hf_dir / "tokenizer.model").is_file()
    config = json.loads((sp_model.hf_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer"
    tokenizer_json = json.loads((sp_model.hf_dir / "tokenizer.json").read_text())
    assert tokenizer_json["model"]["type"] == "BPE" and tokenizer_json["model"]["byte_fallback"] is True


def test_sentencepiece_text_round_trips_through_both_tokenizers(sp_model: TinyModel) -> None:
    import onnxruntime_genai as og
    import sentencepiece
    from transformers import AutoTokenizer

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(sp_model.hf_dir / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(sp_model.hf_dir)
    assert hf.encode(TEXT, add_special_tokens=False) == pieces.encode(TEXT)
    assert hf.decode(pieces.encode(TEXT)) == TEXT
    og_tokenizer = og.Tokenizer(og.Model(str(sp_model.variant_dir("cpu-int4"))))
    assert [int(token) for token in og_tokenizer.encode(TEXT)] == pieces.encode(TEXT)
    # SentencePiece's dummy prefix: transformers' decoder strips it, onnxruntime-genai's keeps it.
    assert og_tokenizer.decode(og_tokenizer.encode(TEXT)) in (TEXT, " " + TEXT)


def test_a_sentencepiece_model_chats_and_streams(sp_served: ServedProcess) -> None:
    client = OpenAI(base_url=f"{sp_served.base_url}/v1", api_key="-", max_retries=0)
    messages = [{"role": "user", "content": TEXT}]
    whole = client.chat.completions.create(
        model="sp", messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}  # type: ignore[arg-type]
    )
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens > 10  # the prompt's bytes were tokenized, not dropped
    assert whole.choices[0].message.content
    streamed = client.chat.completions.create(
        model="sp", messages=messages, max_tokens=12, temperature=0, stream=True,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == whole.choices[0].message.content


def test_the_model_folder_is_what_llama_cpps_converter_reads(sp_model: TinyModel) -> None:
    """llama.cpp's Phi-3 converter loads `tokenizer.model` with sentencepiece and takes the added tokens from
    tokenizer_config.json: check the two agree on where the chat's special tokens are."""
    import json

    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(Path(sp_model.hf_dir) / "tokenizer.model"))
    added = json.loads((sp_model.hf_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    contents = {entry["content"]: int(token_id) for token_id, entry in added.items()}
    assert min(contents[token] for token in ("<|user|>", "<|assistant|>", "<|end|>")) >= pieces.get_piece_size()
