"""`phi3-operator serve`: MLServer with the Phi3Runtime, exactly as the container runs it.

The settings go into a fresh temp dir (the container's root file system is read-only; /tmp
is an emptyDir) and MLServer is started in this process, the way `mlserver start DIR` does.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from phi3_serving.guard import Guard

RUNTIME_IMPLEMENTATION = "phi3_serving.runtime.Phi3Runtime"
EXIT_USAGE = 2
GIL_SWITCH_INTERVAL_S = 0.0005
# uvicorn closes an idle keep-alive connection after 5 s; the proxies in front (Knative's queue proxy and
# activator, Envoy, nginx) keep theirs for 60-90 s, and one that sends on a connection the runtime is
# closing gets a reset: a 502 for the client. The runtime must be the side that waits longer.
HTTP_KEEP_ALIVE_S = 120
# The operator reads this from the container's last words (podhealth.MODEL_LOAD_FAILED_MARKER).
LOAD_FAILED_PREFIX = "phi3-operator serve: the model failed to load: "


@dataclass(frozen=True)
class ServeOptions:
    model_uri: str
    model_name: str
    host: str = "0.0.0.0"
    http_port: int = 8080
    grpc_port: int = 8081
    metrics_port: int = 8082


def default_model_name(model_uri: str) -> str:
    """`models:/phi3-mini/7` → phi3-mini; a local folder → its name."""
    parsed = urlparse(model_uri)
    if parsed.scheme == "models":
        name = (parsed.netloc + parsed.path).strip("/").split("/")[0].split("@")[0]
        return name or "model"
    tail = Path(parsed.path.rstrip("/")).name
    return tail or "model"


def resolve_local_uri(model_uri: str) -> str:
    """Relative local folders become absolute: MLServer would read them relative to its settings dir."""
    parsed = urlparse(model_uri)
    if parsed.scheme in ("", "file") and not parsed.netloc:
        return str(Path(parsed.path).expanduser().resolve())
    return model_uri


def server_settings(options: ServeOptions, workdir: Path) -> dict[str, Any]:
    return {
        "debug": False,
        "host": options.host,
        "http_port": options.http_port,
        "grpc_port": options.grpc_port,
        "metrics_port": options.metrics_port,
        # Streaming needs the model in the server process (0 workers) and no gzip middleware.
        "parallel_workers": 0,
        "gzip_enabled": False,
        # MLServer defaults both to the working directory, which is read-only in the container.
        "metrics_dir": str(workdir / "metrics"),
        "environments_dir": str(workdir / "envs"),
        "load_models_at_startup": True,
        "server_name": "phi3-operator",
    }


def model_settings(options: ServeOptions) -> dict[str, Any]:
    return {
        "name": options.model_name,
        "implementation": RUNTIME_IMPLEMENTATION,
        "parameters": {"uri": resolve_local_uri(options.model_uri)},
    }


def write_settings(options: ServeOptions, workdir: Path) -> None:
    (workdir / "metrics").mkdir(parents=True, exist_ok=True)
    (workdir / "envs").mkdir(parents=True, exist_ok=True)
    (workdir / "settings.json").write_text(json.dumps(server_settings(options, workdir), indent=2))
    # MLServer expects a model's folder to carry the model's name.
    model_folder = workdir / "models" / options.model_name
    model_folder.mkdir(parents=True, exist_ok=True)
    (model_folder / "model-settings.json").write_text(json.dumps(model_settings(options), indent=2))


def install_guard(server: Any, guard: Guard) -> None:
    """Put the guard in front of every route of MLServer's HTTP port, before it serves one request.

    MLServer 1.7.1 has no hook for this: `create_app` builds its FastAPI app inside RESTServer's
    constructor and adds no middleware of ours. Of the ways in, this is the least fragile: it
    reaches one attribute (`MLServer._rest_server._app`, the app uvicorn is given) and then uses
    Starlette's public `add_middleware`, which wraps the app around the router, so MLServer's V2
    routes and the runtime's custom handlers (added to the router as models load) all pass the
    guard. Replacing `mlserver.rest.server.create_app` or subclassing RESTServer would depend on
    how MLServer imports and calls them. Should a later MLServer keep its app elsewhere, `serve`
    refuses to start rather than serve unguarded.
    """
    from starlette.applications import Starlette

    from phi3_serving.guard import GuardMiddleware, activate

    app = getattr(getattr(server, "_rest_server", None), "_app", None)
    if not isinstance(app, Starlette):
        raise RuntimeError("MLServer's REST app is not where MLServer 1.7.1 keeps it: refusing to serve unguarded")
    app.add_middleware(GuardMiddleware, guard=guard)
    if guard.keys is not None:
        # MLServer's gRPC server takes its interceptors fixed inside a private method, so no key check
        # can be put in front of it: with keys required it does not start, rather than serve unguarded.
        server._grpc_server = _NoGrpc()
        print("phi3-operator serve: API keys are required, so the gRPC port is off (use HTTP)", flush=True)
    activate(guard)


class _NoGrpc:
    """Stands where MLServer keeps its gRPC server: starts nothing, stops nothing."""

    async def start(self) -> None:
        return None

    async def stop(self, sig: int | None = None) -> None:
        return None


def serve(options: ServeOptions) -> int:
    """Run MLServer until SIGTERM/SIGINT; returns the exit code."""
    # Serving never reaches a model hub nor phones home.
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("DO_NOT_TRACK", "true"),
    ):
        os.environ.setdefault(key, value)
    # MLflow traces some pyfuncs (a ResponsesAgent) on every call into its tracking store: request
    # contents would go to the tracking server, or to ./mlflow.db. Serving records none.
    import mlflow.tracing

    mlflow.tracing.disable()
    from phi3_serving.guard import Guard, GuardSettings

    try:
        guard = Guard(GuardSettings.from_env(os.environ))
    except ValueError as error:
        print(f"phi3-operator serve: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    workdir = Path(tempfile.mkdtemp(prefix="phi3-serve-"))
    write_settings(options, workdir)
    print(f"phi3-operator serve: settings in {workdir}", flush=True)

    from mlserver import MLServer
    from mlserver.cli.serve import load_settings
    from mlserver.logging import configure_logger
    from mlserver.utils import install_uvloop_event_loop

    async def run() -> None:
        settings, models_settings = await load_settings(str(workdir))
        # MLServer passes these to uvicorn.Config as they are; it has no public setting for the keep-alive.
        settings._custom_rest_server_settings = {"timeout_keep_alive": HTTP_KEEP_ALIVE_S}
        server = MLServer(settings)
        install_guard(server, guard)
        await server.start(models_settings)

    # Generation threads hand the GIL back only between tokens; with CPython's default 5 ms switch
    # interval the event loop then waits up to 5 ms per step it takes, which delays the first
    # streamed token of a fast model by ~10 ms. A shorter interval keeps the loop responsive.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    configure_logger()
    install_uvloop_event_loop()
    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    from phi3_serving.runtime import LOAD_FAILURES

    if LOAD_FAILURES:
        for failure in LOAD_FAILURES:
            print(f"{LOAD_FAILED_PREFIX}{failure}", file=sys.stderr, flush=True)
        return 1
    return 0
