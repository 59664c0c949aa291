"""Driving a bare onnxruntime-genai engine (`og.Engine`), as its examples do: for tests and the bench."""

from __future__ import annotations

from typing import Any


def begin_greedy_turns(engine: Any, prompt: Any, count: int, tokens: int) -> list[Any]:
    """`count` requests begun at once on `prompt`, each generating exactly `tokens` tokens greedily."""
    import onnxruntime_genai as og

    requests = []
    for _ in range(count):
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(tokens)
        options.set_min_generated_tokens(tokens)
        options.set_do_sample(False)
        request.begin_turn(prompt, options)
        requests.append(request)
    return requests
