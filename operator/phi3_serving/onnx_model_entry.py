"""Models-from-code entry for the ONNX GenAI flavor: `mlflow.pyfunc.log_model(python_model=<this file>)`.

MLflow copies this file into the logged model and runs it at load time; it only names the
model class, which the runtime image provides through the installed `phi3_serving` package.
"""

from __future__ import annotations

import mlflow.models

from phi3_serving.onnx_model import OnnxGenAIChatModel

mlflow.models.set_model(OnnxGenAIChatModel())
