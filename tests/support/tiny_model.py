"""A tiny Phi-3-architecture model for tests, demos and benchmarks.

Random weights (2 layers, 64 wide), a tokenizer trained here on a few lines of text (byte-level
BPE, or a SentencePiece BPE model with byte fallback as Phi-3 itself ships), and Phi-3's chat
template. It is saved as a Hugging Face folder and converted by the
onnxruntime-genai model builder into `cpu-int4` and `cpu-fp32` variants of one folder, the
layout `phi3-operator package onnx` takes. Nothing is downloaded: the Hub is switched off.

The result is cached under ~/.cache/phi3-operator/models/<key>/, keyed on every parameter
below and the versions of the packages that shape it, so only the first run pays the few
seconds the conversion takes.

    python -m tests.support.tiny_model OUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

CACHE_ROOT = Path(os.environ.get("PHI3_MODEL_CACHE", Path.home() / ".cache" / "phi3-operator" / "models"))

# Phi-3's chat template, which the onnxruntime-genai tokenizer and transformers both render.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
VARIANTS = {"cpu-int4": ("int4", "cpu"), "cpu-fp32": ("fp32", "cpu")}

# Text the tokenizer learns its merges from: anything English-like will do.
_CORPUS = [
    "Hello! How can I help you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes runs containers; MLflow tracks models; MLServer serves them.",
    "What is the capital of France? Paris is the capital of France.",
    "Write a short poem about the sea and the stars at night.",
    "Tokens are generated one at a time and streamed to the client.",
    "The operator reconciles a Phi3Model into a Deployment and a Service.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
]


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that shapes the model; part of the cache key."""

    vocab_size: int = 320
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    context_length: int = 1024
    seed: int = 1234
    variants: tuple[str, ...] = tuple(VARIANTS)
    # The embedding and LM head rows; 0 means exactly the tokenizer's vocabulary. A larger value
    # gives a real model's vocabulary shape while the locally trained tokenizer stays small.
    model_vocab_size: int = 0
    num_key_value_heads: int = 0  # 0: as many as attention heads
    # "bpe": byte-level BPE (tokenizer.json only). "sentencepiece": a SentencePiece BPE model with
    # byte fallback saved as tokenizer.model beside tokenizer.json, Phi-3's own layout, which
    # llama.cpp's GGUF converter requires, so that both engines of the CPU bench see one tokenizer.
    tokenizer: str = "bpe"
    # The model builder's --extra_options (e.g. "int4_block_size=128"): what the CPU bench tunes.
    builder_options: tuple[str, ...] = ()


# Phi-3-mini's layer shapes (hidden 3072, intermediate 8192, 32 heads, 32 KV heads, vocabulary
# 32064) with 2 decoder layers, so it fits a small machine: what the batching benchmark runs.
# Random weights, converted locally to int4 CPU; about 0.4 B parameters before quantization. Its
# tokenizer is SentencePiece, as Phi-3's is, so that llama.cpp's converter takes it (bench/llama_cpp.py).
PHI3_MINI_SHAPED = TinyModelSpec(
    vocab_size=512,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=32,
    model_vocab_size=32064,
    context_length=1024,
    variants=("cpu-int4",),
    tokenizer="sentencepiece",
)


@dataclass(frozen=True)
class TinyModel:
    hf_dir: Path  # a Hugging Face model folder (transformers flavor)
    onnx_dir: Path  # a folder of onnxruntime-genai variant subfolders (onnx flavor)
    context_length: int

    def variant_dir(self, variant: str) -> Path:
        return self.onnx_dir / variant


def _package_versions() -> dict[str, str]:
    names = ("torch", "transformers", "tokenizers", "onnxruntime-genai", "onnx", "onnx-ir", "onnxruntime")
    return {name: metadata.version(name) for name in names}


def cache_key(spec: TinyModelSpec) -> str:
    material = json.dumps(
        {"spec": asdict(spec), "versions": _package_versions(), "template": CHAT_TEMPLATE, "format": 3},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _build_hf_model(spec: TinyModelSpec, hf_dir: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    tokenizer = (
        _sentencepiece_tokenizer(spec, hf_dir) if spec.tokenizer == "sentencepiece" else _byte_level_tokenizer(spec)
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if spec.model_vocab_size > len(tokenizer):
        # Every id the random model can sample must decode to text, or a stream shows nothing.
        tokenizer.add_tokens([f"<t{index}>" for index in range(len(tokenizer), spec.model_vocab_size)])
    vocab_size = max(len(tokenizer), spec.model_vocab_size)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    torch.manual_seed(spec.seed)
    config = Phi3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads or spec.num_attention_heads,
        max_position_embeddings=spec.context_length,
        original_max_position_embeddings=spec.context_length,
        bos_token_id=eos_id,
        eos_token_id=[end_id, eos_id],
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    model = Phi3ForCausalLM(config)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=[end_id, eos_id], pad_token_id=eos_id, do_sample=True
    )
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    if spec.tokenizer == "sentencepiece":
        _write_added_tokens_decoder(hf_dir)


def _write_added_tokens_decoder(hf_dir: Path) -> None:
    """Put the added tokens in tokenizer_config.json as transformers 4 wrote them (5 no longer does):
    llama.cpp's Phi-3 converter reads them from there, or leaves those ids as [PAD] tokens."""
    added = json.loads((hf_dir / "tokenizer.json").read_text())["added_tokens"]
    config_path = hf_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["added_tokens_decoder"] = {
        str(token["id"]): {key: value for key, value in token.items() if key != "id"} for token in added
    }
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _byte_level_tokenizer(spec: TinyModelSpec) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=spec.context_length,
    )


def _sentencepiece_tokenizer(spec: TinyModelSpec, hf_dir: Path) -> Any:
    """Phi-3's tokenizer layout: a SentencePiece BPE model (<unk>, <s>, </s>, 256 byte pieces, merges)
    in tokenizer.model, then the chat's special tokens added after it."""
    import sentencepiece
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    hf_dir.mkdir(parents=True, exist_ok=True)
    model_file = hf_dir / "tokenizer.model"
    with model_file.open("wb") as sink:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(_CORPUS * 4),
            model_writer=sink,
            model_type="bpe",
            vocab_size=spec.vocab_size,
            # A corpus this small has fewer merges than vocab_size asks: take what it has.
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=1.0,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            minloglevel=2,
        )
    # transformers' own SentencePiece reader needs a newer protobuf than mlflow pins; sentencepiece's
    # API gives the same vocabulary, and BPE merges follow from it (what that reader does too).
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {processor.id_to_piece(index): index for index in range(processor.get_piece_size())}
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        add_bos_token=False,
        add_eos_token=False,
        legacy=False,
        model_max_length=spec.context_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


def _convert(
    hf_dir: Path, out_dir: Path, precision: str, execution_provider: str, cache_dir: Path, options: tuple[str, ...]
) -> None:
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out_dir),
        "-p",
        precision,
        "-e",
        execution_provider,
        "-c",
        str(cache_dir),
        *(("--extra_options", *options) if options else ()),
    ]
    result = subprocess.run(command, env=_offline_env(), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"model builder failed ({' '.join(command)}):\n{result.stdout}\n{result.stderr}")


def _build_into(spec: TinyModelSpec, root: Path) -> None:
    hf_dir = root / "hf"
    _build_hf_model(spec, hf_dir)
    with tempfile.TemporaryDirectory(prefix="phi3-builder-cache-") as builder_cache:
        for variant in spec.variants:
            precision, provider = VARIANTS[variant]
            _convert(hf_dir, root / "onnx" / variant, precision, provider, Path(builder_cache), spec.builder_options)


def build_tiny_model(out_dir: Path, spec: TinyModelSpec | None = None) -> TinyModel:
    """Make the tiny model (or reuse the cached one) and place it under `out_dir`.

    `out_dir/hf` is the Hugging Face folder and `out_dir/onnx/<variant>` the converted ones.
    """
    spec = spec or TinyModelSpec()
    cached = CACHE_ROOT / cache_key(spec)
    if not (cached / "complete").exists():
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        # Build beside the cache entry and rename it into place, so a crashed or concurrent
        # build never leaves a half-written entry behind.
        staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=CACHE_ROOT))
        try:
            _build_into(spec, staging)
            (staging / "complete").write_text(json.dumps(asdict(spec)))
            try:
                staging.rename(cached)
            except OSError:
                if not (cached / "complete").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for part in ("hf", "onnx"):
        target = out_dir / part
        if target.resolve() != (cached / part).resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(cached / part, target)
    return TinyModel(hf_dir=out_dir / "hf", onnx_dir=out_dir / "onnx", context_length=spec.context_length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where to put hf/ and onnx/<variant>/")
    parser.add_argument("--phi3-mini-shaped", action="store_true", help="Phi-3-mini's layer shapes, 2 layers")
    args = parser.parse_args(argv)
    model = build_tiny_model(args.out_dir, PHI3_MINI_SHAPED if args.phi3_mini_shaped else None)
    print(f"hf: {model.hf_dir}")
    print(f"onnx: {model.onnx_dir} ({', '.join(sorted(p.name for p in model.onnx_dir.iterdir()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
