"""Models as users log them, with MLflow's own APIs (never our packager).

- `RecipePhi3Model`: the Phi-3 + MLflow recipe's `PythonModel` around onnxruntime-genai 0.18
  (`og.Model`, `og.Generator`), input `{"prompt": ...}`, output a string; cloudpickled.
- a `ChatModel` with `predict_stream`, and a `ResponsesAgent` with `predict_stream`, both logged
  as models-from-code, the way MLflow 3 recommends;
- `TabularModel`: a plain DataFrame-in, DataFrame-out pyfunc;
- `BrokenModel`: its `load_context` raises, as a model with a missing file or package does;
- the recipe's transformers pipeline, `mlflow.transformers.log_model(task="llm/v1/chat")`.

Classes are pickled by value, so the serving process needs no copy of this test module.
"""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.models import infer_signature

RECIPE_PROMPT = "<|user|>\nTell me a story<|end|>\n<|assistant|>"
RECIPE_NEW_TOKENS = 12
PIPELINE_NEW_TOKENS = 8
BROKEN_LOAD_ERROR = "the model's weights file weights.bin is missing"


class RecipePhi3Model(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        import onnxruntime_genai as og

        self.model = og.Model(context.artifacts["phi3-mini-onnx"])
        self.tokenizer = og.Tokenizer(self.model)

    def predict(self, context: Any, model_input: Any) -> str:
        import onnxruntime_genai as og

        prompt = model_input["prompt"][0]
        tokens = self.tokenizer.encode(prompt)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(tokens) + RECIPE_NEW_TOKENS, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(tokens)
        stream = self.tokenizer.create_stream()
        pieces = []
        while not generator.is_done():
            generator.generate_next_token()
            pieces.append(stream.decode(generator.get_next_tokens()[0]))
        return "".join(pieces)


class TabularModel(mlflow.pyfunc.PythonModel):
    def predict(self, context: Any, model_input: Any) -> Any:
        import pandas as pd

        a, b = model_input["a"], model_input["b"]
        return pd.DataFrame({"total": a + b, "product": a * b})


class BrokenModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        raise FileNotFoundError(BROKEN_LOAD_ERROR)

    def predict(self, context: Any, model_input: Any) -> Any:
        return model_input


CHAT_MODEL_CODE = textwrap.dedent(
    '''
    """A user's ChatModel: it answers word by word, and streams the same words."""
    import uuid

    import mlflow
    from mlflow.pyfunc import ChatModel
    from mlflow.types.llm import ChatChoice, ChatChoiceDelta, ChatChunkChoice, ChatCompletionChunk
    from mlflow.types.llm import ChatCompletionResponse, ChatMessage


    def words(messages, params):
        last = messages[-1].content
        limit = params.max_tokens or 64
        return (["You", "said:"] + last.split())[:limit]


    class EchoChat(ChatModel):
        def predict(self, context, messages, params):
            text = " ".join(words(messages, params))
            return ChatCompletionResponse(
                choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=text))],
                model="echo-chat",
            )

        def predict_stream(self, context, messages, params):
            chunk_id = str(uuid.uuid4())
            for index, word in enumerate(words(messages, params)):
                yield ChatCompletionChunk(
                    id=chunk_id,
                    choices=[ChatChunkChoice(delta=ChatChoiceDelta(role="assistant",
                                                                   content=(" " if index else "") + word))],
                )


    mlflow.models.set_model(EchoChat())
    '''
)

RESPONSES_AGENT_CODE = textwrap.dedent(
    '''
    """A user's ResponsesAgent: it answers with the user's words reversed, streaming them as deltas."""
    import mlflow
    from mlflow.pyfunc import ResponsesAgent
    from mlflow.types.responses import ResponsesAgentRequest, ResponsesAgentResponse, ResponsesAgentStreamEvent


    def answer(request):
        last = request.input[-1]
        content = last.content if isinstance(last.content, str) else " ".join(
            part.get("text", "") for part in last.content)
        return list(reversed(content.split()))


    class ReverseAgent(ResponsesAgent):
        def predict(self, request: ResponsesAgentRequest) -> ResponsesAgentResponse:
            text = " ".join(answer(request))
            return ResponsesAgentResponse(output=[self.create_text_output_item(text=text, id="msg_1")])

        def predict_stream(self, request: ResponsesAgentRequest):
            words = answer(request)
            for index, word in enumerate(words):
                yield ResponsesAgentStreamEvent(
                    **self.create_text_delta(delta=(" " if index else "") + word, item_id="msg_1"))
            yield ResponsesAgentStreamEvent(
                type="response.output_item.done",
                item=self.create_text_output_item(text=" ".join(words), id="msg_1"),
            )


    mlflow.models.set_model(ReverseAgent())
    '''
)


def _register(client: MlflowClient, model_uri: str, name: str) -> str:
    version = mlflow.register_model(model_uri, name)
    return f"models:/{name}/{version.version}"


@contextlib.contextmanager
def _mlflow_session(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `tracking_uri`. It keeps its choices in the process environment
    (MLFLOW_EXPERIMENT_ID and more), which every later subprocess of the test session would inherit:
    they are put back as they were."""
    saved_env = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}
    previous_tracking_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_tracking_uri)
        for key in [key for key in os.environ if key.startswith("MLFLOW_")]:
            if key not in saved_env:
                del os.environ[key]
        os.environ.update(saved_env)


def _experiment(client: MlflowClient) -> str:
    experiment = client.get_experiment_by_name("user-models")
    return experiment.experiment_id if experiment else client.create_experiment("user-models")


def log_user_models(tracking_uri: str, onnx_variant_dir: Path, workdir: Path) -> dict[str, str]:
    """Log and register each model with MLflow's APIs; returns name -> `models:/N/V`."""

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with _mlflow_session(tracking_uri):
        return _log_all(tracking_uri, onnx_variant_dir, workdir)


def log_recipe_model(tracking_uri: str, onnx_variant_dir: Path, name: str = "user-recipe") -> str:
    """The recipe's PythonModel alone, registered as `name`; returns `models:/N/V`."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with _mlflow_session(tracking_uri):
        client = MlflowClient(tracking_uri)
        with mlflow.start_run(experiment_id=_experiment(client)):
            return _log_recipe_model(client, onnx_variant_dir, name)


def _log_recipe_model(client: MlflowClient, onnx_variant_dir: Path, name: str) -> str:
    # As the recipe logs it: its artifacts, its input example, its requirements.
    info = mlflow.pyfunc.log_model(
        name="phi3-recipe",
        python_model=RecipePhi3Model(),
        artifacts={"phi3-mini-onnx": str(onnx_variant_dir)},
        input_example={"prompt": RECIPE_PROMPT},
        # Given, not inferred: MLflow 3 infers it by loading the model into this very instance, and an
        # og.Model attribute then cannot be pickled.
        signature=infer_signature({"prompt": RECIPE_PROMPT}, "an answer"),
        extra_pip_requirements=["torch", "onnxruntime_genai", "numpy"],
    )
    return _register(client, info.model_uri, name)


def log_recipe_pipeline(tracking_uri: str, hf_dir: Path, name: str = "user-pipeline",
                        torch_pin: str | None = None) -> str:
    """The recipe's transformers path: a text-generation pipeline logged with
    `mlflow.transformers.log_model(task="llm/v1/chat", model_config=...)`; returns `models:/N/V`.

    The requirements are what MLflow records for it (mlflow, torch, transformers at this machine's
    versions), given rather than inferred only because MLflow's inference imports torchvision, which
    this machine lacks. `torch_pin` records another torch version instead, as a model logged elsewhere has."""
    import mlflow.transformers
    import torch
    import transformers

    # Never ask the Hub about a local folder (MLflow retries for about 50 s).
    os.environ["HF_HUB_OFFLINE"] = "1"
    pipeline = transformers.pipeline("text-generation", model=str(hf_dir), tokenizer=str(hf_dir))
    torch_version = torch_pin or torch.__version__.split("+")[0]
    with _mlflow_session(tracking_uri):
        client = MlflowClient(tracking_uri)
        with mlflow.start_run(experiment_id=_experiment(client)):
            info = mlflow.transformers.log_model(
                transformers_model=pipeline,
                name="phi3-chat",
                task="llm/v1/chat",
                model_config={"max_new_tokens": PIPELINE_NEW_TOKENS, "do_sample": False},
                input_example={"messages": [{"role": "user", "content": "hello"}]},
                pip_requirements=[f"torch=={torch_version}", f"transformers=={transformers.__version__}"],
            )
        return _register(client, info.model_uri, name)


def _log_all(tracking_uri: str, onnx_variant_dir: Path, workdir: Path) -> dict[str, str]:
    import pandas as pd

    client = MlflowClient(tracking_uri)
    experiment_id = _experiment(client)
    uris: dict[str, str] = {}
    workdir.mkdir(parents=True, exist_ok=True)
    chat_code = workdir / "echo_chat.py"
    chat_code.write_text(CHAT_MODEL_CODE)
    agent_code = workdir / "reverse_agent.py"
    agent_code.write_text(RESPONSES_AGENT_CODE)
    with mlflow.start_run(experiment_id=experiment_id):
        uris["recipe"] = _log_recipe_model(client, onnx_variant_dir, "user-recipe")
        info = mlflow.pyfunc.log_model(
            name="echo-chat",
            python_model=str(chat_code),
            input_example={"messages": [{"role": "user", "content": "hello there"}]},
        )
        uris["chat"] = _register(client, info.model_uri, "user-chat")
        info = mlflow.pyfunc.log_model(
            name="reverse-agent",
            python_model=str(agent_code),
            input_example={"input": [{"role": "user", "content": "one two three"}]},
        )
        uris["agent"] = _register(client, info.model_uri, "user-agent")
        info = mlflow.pyfunc.log_model(
            name="tabular",
            python_model=TabularModel(),
            input_example=pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}),
        )
        uris["tabular"] = _register(client, info.model_uri, "user-tabular")
        info = mlflow.pyfunc.log_model(name="broken", python_model=BrokenModel())
        uris["broken"] = _register(client, info.model_uri, "user-broken")
    return uris
