"""The `phi3-operator` command: `run` starts the control plane; `package`, `serve`, `fetch` and `publish`
belong to the data plane and are forwarded to it, so the operator image need not carry it."""

from __future__ import annotations

import argparse
import sys

DATA_PLANE_COMMANDS = ("package", "serve", "fetch", "publish")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in DATA_PLANE_COMMANDS:
        try:
            from phi3_serving.cli import main as serving_main  # type: ignore[import-not-found,unused-ignore]
        except ImportError as error:
            print(f"phi3-operator {args[0]}: the serving extra is not installed ({error}); "
                  "pip install 'phi3-operator[serving]'", file=sys.stderr)
            return 2
        return int(serving_main(args))

    parser = argparse.ArgumentParser(prog="phi3-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the operator (kubeconfig or in-cluster)")
    run.add_argument("--namespace", "-n", action="append", default=[],
                     help="watch only this namespace (repeatable); default: all namespaces")
    run.add_argument("--config", help="operator config file (default: $PHI3_OPERATOR_CONFIG)")
    run.add_argument("--liveness-endpoint", help="e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("--peering", help="kopf peering name, for more than one operator replica")
    run.add_argument("--metrics-address", help="serve Prometheus /metrics (and /healthz) on HOST:PORT, "
                     "e.g. 0.0.0.0:8081")
    run.add_argument("--leader-election-namespace", metavar="NS",
                     help="elect one active replica with a Lease in NS (env POD_NAME names this replica)")
    run.add_argument("--verbose", "-v", action="store_true")
    for name in DATA_PLANE_COMMANDS:
        commands.add_parser(name, help=f"data plane: see `phi3-operator {name} --help`", add_help=False)
    options = parser.parse_args(args)

    from phi3_operator.main import RunOptions
    from phi3_operator.main import run as run_operator

    run_operator(
        RunOptions(
            namespaces=tuple(options.namespace),
            config_path=options.config,
            liveness_endpoint=options.liveness_endpoint,
            peering_name=options.peering,
            metrics_address=options.metrics_address,
            leader_election_namespace=options.leader_election_namespace,
            verbose=options.verbose,
        )
    )
    return 0
