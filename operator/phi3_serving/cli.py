"""The data-plane commands behind `phi3-operator package | serve | fetch | publish`.

`phi3_operator.cli` forwards these verbatim: `main(["package", "onnx", DIR, "--name", N])`.
Problems the user can fix print one line on stderr and exit with 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but `error()` raises instead of exiting so main() keeps control of the exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="phi3-operator", description="Package, fetch and serve Phi-3 style models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    package = commands.add_parser("package", help="log a model folder to MLflow and register it")
    flavors = package.add_subparsers(dest="flavor", required=True, parser_class=_Parser)
    for flavor, help_text in (
        ("onnx", "an onnxruntime-genai folder, or a folder of variant folders (cpu-int4/, cuda-int4/, ...)"),
        ("transformers", "a Hugging Face model folder with a chat template"),
    ):
        sub = flavors.add_parser(flavor, help=help_text)
        sub.add_argument("model_dir", type=Path, metavar="DIR")
        sub.add_argument("--name", required=True, help="registered model name")
        sub.add_argument("--alias", help="alias to point at the new version, e.g. champion")
        sub.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
        sub.add_argument("--requirement", action="append", default=[], metavar="REQ", dest="requirements",
                         help="a pip requirement the model needs beyond the runtime's (repeatable); the operator "
                              "builds an image with it when the catalog image lacks it")

    serve = commands.add_parser("serve", help="serve a model with MLServer (what the runtime container runs)")
    serve.add_argument("--model-uri", required=True, help="a local MLflow model folder or any MLflow model URI")
    serve.add_argument("--model-name", help="name in the V2 and OpenAI APIs (default: from the URI)")
    serve.add_argument("--host", default="0.0.0.0", help="interface to bind (default: all)")
    serve.add_argument("--http-port", type=int, default=8080)
    serve.add_argument("--grpc-port", type=int, default=8081)
    serve.add_argument("--metrics-port", type=int, default=8082)

    fetch = commands.add_parser("fetch", help="download a model into a folder (the init container)")
    fetch.add_argument("--model-uri", required=True)
    fetch.add_argument("--dest", required=True, type=Path)

    publish = commands.add_parser(
        "publish", help="push a model version to an OCI registry as an image that pods mount (once per tag)")
    publish.add_argument("--model-uri", required=True)
    publish.add_argument("--image", required=True, help="REGISTRY/REPOSITORY:TAG")
    publish.add_argument("--plain-http", action="store_true", help="the registry speaks HTTP, not HTTPS")
    publish.add_argument("--workdir", type=Path, help="scratch space for the download and the layer")
    publish.add_argument("--result-file", type=Path,
                         help="also write the result JSON here (a pod's /dev/termination-log)")
    return parser


# Quiet, private defaults for every command; an explicit setting in the environment wins.
_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def main(argv: list[str]) -> int:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as error:
        print(str(error), file=sys.stderr)
        return EXIT_USAGE
    if args.command == "package":
        return _package(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "publish":
        return _publish(args)
    return _fetch(args)


def _package(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from phi3_serving.packaging import PackagingError, package_onnx, package_transformers

    package = package_onnx if args.flavor == "onnx" else package_transformers
    try:
        packaged = package(args.model_dir, name=args.name, alias=args.alias, tracking_uri=args.tracking_uri,
                           extra_requirements=args.requirements)
    except PackagingError as error:
        print(f"phi3-operator package: {error}", file=sys.stderr)
        return EXIT_USAGE
    except MlflowException as error:
        print(f"phi3-operator package: MLflow refused: {error.message.splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    if packaged.alias:
        print(f"alias: models:/{packaged.name}@{packaged.alias} -> version {packaged.version}")
    print(f"run: {packaged.run_id}")
    # The last line is the contract: scripts take `tail -n1`.
    print(packaged.uri, flush=True)
    return 0


def _exit_while_starting(signum: int, frame: object) -> None:
    # Before MLServer installs its own handlers (after the model has loaded), SIGTERM would be dropped
    # when the runtime is the container's PID 1, which has no default action: a pod scaled down while
    # loading then waited out its whole grace period. Nothing is served yet, so there is nothing to drain.
    os._exit(128 + signum)


def _serve(args: argparse.Namespace) -> int:
    import signal

    from phi3_serving.serve import ServeOptions, default_model_name, serve

    signal.signal(signal.SIGTERM, _exit_while_starting)

    options = ServeOptions(
        model_uri=args.model_uri,
        model_name=args.model_name or default_model_name(args.model_uri),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
    )
    return serve(options)


def _fetch(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from phi3_serving.fetch import fetch_model, mask_uri

    shown = mask_uri(args.model_uri)
    try:
        result = fetch_model(args.model_uri, args.dest)
    except MlflowException as error:
        print(f"phi3-operator fetch: cannot fetch {shown}: {error.message.splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as error:
        print(f"phi3-operator fetch: cannot fetch {shown}: {error}", file=sys.stderr)
        return EXIT_USAGE
    verb = "already present" if result.reused else "fetched"
    size_mb = result.size_bytes / 1e6
    print(f"{verb}: {shown} in {result.dest} ({result.files} files, {size_mb:.1f} MB)", flush=True)
    return 0


# Distinct exit codes let the operator tell a model it cannot fetch from a registry it cannot use.
EXIT_PUBLISH_FETCH, EXIT_PUBLISH_REGISTRY = 3, 4


def _publish(args: argparse.Namespace) -> int:
    from phi3_serving.fetch import mask_uri
    from phi3_serving.publish import PublishError, publish_model

    try:
        result = publish_model(args.model_uri, args.image, plain_http=args.plain_http, workdir=args.workdir)
    except ValueError as error:
        print(f"phi3-operator publish: {error}", file=sys.stderr)
        return EXIT_USAGE
    except PublishError as error:
        print(f"phi3-operator publish: {mask_uri(str(error))}", file=sys.stderr, flush=True)
        return EXIT_PUBLISH_FETCH if error.stage == "fetch" else EXIT_PUBLISH_REGISTRY
    verb = "already published" if result.reused else "published"
    print(f"{verb}: {mask_uri(args.model_uri)} as {result.image} ({result.size_bytes / 1e6:.1f} MB)")
    if args.result_file:
        args.result_file.write_text(result.as_json())
    # The last line is the contract: scripts take `tail -n1`.
    print(result.as_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
