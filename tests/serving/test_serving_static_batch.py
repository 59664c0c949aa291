"""How wide the installed onnxruntime-genai's static batching decodes, measured on the real engine.

`spec.serving.maxBatchSize` sets og.Engine's `static_batching.max_batch_size` on CPU, and the engine
reports it back as `configured_max_batch_size`; its static scheduler still decodes
`STATIC_BATCH_DECODE_WIDTH` turns per step of those it has, whatever that setting says (the
runtime admits at most `maxBatchSize` turns to a batch, so smaller values do narrow a batch there).
The runtime's log line and the docs say so; this test fails when an upgrade of the engine changes
the width, so they cannot go stale.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnxruntime_genai as og
import pytest

from phi3_serving.batching import STATIC_BATCH_DECODE_WIDTH, BatchOptions, OnnxBatchEngine
from phi3_serving.variants import OnnxVariant
from tests.support.og_engine import begin_greedy_turns
from tests.support.tiny_model import TinyModel

TURNS = 12
TOKENS = 6


def tokens_per_step(variant_dir: str, max_batch_size: int) -> tuple[int, collections.Counter[int]]:
    """The engine's configured batch and, over TURNS turns begun at once, how many steps decoded n tokens."""
    config = og.Config(variant_dir)
    config.overlay(json.dumps({"engine": {"static_batching": {"max_batch_size": max_batch_size}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    engine = og.Engine(model)
    events = engine.create_event_buffer(256)
    configured = int(engine.get_capabilities().configured_max_batch_size)
    prompt = np.asarray(tokenizer.encode("hello there, how are you"), dtype=np.int32)
    requests = begin_greedy_turns(engine, prompt, TURNS, TOKENS)
    token_flag = int(og.EngineEventFlags.TOKEN)
    steps: collections.Counter[int] = collections.Counter()
    while engine.has_pending_requests():
        steps[sum(1 for event in engine.run(events) if int(event.flags) & token_flag)] += 1
    for request in requests:
        request.close()
    return configured, steps


@pytest.mark.parametrize("max_batch_size", [2, 4, 8])
def test_static_batching_decodes_the_documented_width_whatever_is_configured(tiny_model: TinyModel,
                                                                              max_batch_size: int) -> None:
    configured, steps = tokens_per_step(str(tiny_model.variant_dir("cpu-int4")), max_batch_size)
    assert configured == max_batch_size, "the engine reports the batch it was given"
    assert max(steps) == STATIC_BATCH_DECODE_WIDTH, f"steps by tokens decoded: {dict(steps)}"
    assert sum(n * count for n, count in steps.items()) == TURNS * TOKENS, "every turn generated all its tokens"


@pytest.mark.parametrize(("max_batch_size", "width"), [(2, 2), (8, STATIC_BATCH_DECODE_WIDTH)])
def test_the_runtime_says_how_wide_it_decodes(tiny_model: TinyModel, max_batch_size: int, width: int) -> None:
    variant = OnnxVariant("cpu-int4", tiny_model.variant_dir("cpu-int4"))
    model = OnnxBatchEngine(variant, options=BatchOptions(max_batch_size=max_batch_size, solo_path="engine"))
    try:
        assert model.max_batch_size == max_batch_size
        assert model.decode_width == width
        assert f"max batch {max_batch_size}, decoding at most {width} together per step" in model.describe()
    finally:
        model.close()
