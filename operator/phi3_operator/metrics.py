"""Prometheus metrics of the operator, in the text exposition format, over the stdlib.

The operator image carries no metrics library; a handful of counters and gauges do not need one.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reconciles: Counter[str] = Counter()
        self._writes: Counter[str] = Counter()
        self._resync_passes = 0
        self._models = 0
        self._last_resync_seconds = 0.0
        self._queue_depth: Callable[[], int] = lambda: 0

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self._queue_depth = depth

    def reconciled(self, outcome: str) -> None:
        with self._lock:
            self._reconciles[outcome] += 1

    def wrote(self, kind: str) -> None:
        with self._lock:
            self._writes[kind] += 1

    def resynced(self, models: int, seconds: float) -> None:
        with self._lock:
            self._resync_passes += 1
            self._models = models
            self._last_resync_seconds = seconds

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP phi3_operator_reconciles_total Reconcile passes over one Phi3Model, by outcome.",
                "# TYPE phi3_operator_reconciles_total counter",
                *(f'phi3_operator_reconciles_total{{outcome="{k}"}} {v}' for k, v in sorted(self._reconciles.items())),
                "# HELP phi3_operator_applied_total Objects written with server-side apply, by kind.",
                "# TYPE phi3_operator_applied_total counter",
                *(f'phi3_operator_applied_total{{kind="{k}"}} {v}' for k, v in sorted(self._writes.items())),
                "# HELP phi3_operator_resync_passes_total Periodic passes over all Phi3Models.",
                "# TYPE phi3_operator_resync_passes_total counter",
                f"phi3_operator_resync_passes_total {self._resync_passes}",
                "# HELP phi3_operator_models Phi3Models seen by the last resync pass.",
                "# TYPE phi3_operator_models gauge",
                f"phi3_operator_models {self._models}",
                "# HELP phi3_operator_resync_duration_seconds Duration of the last resync pass.",
                "# TYPE phi3_operator_resync_duration_seconds gauge",
                f"phi3_operator_resync_duration_seconds {self._last_resync_seconds:.3f}",
                "# HELP phi3_operator_work_queue_depth Models waiting for a reconcile worker.",
                "# TYPE phi3_operator_work_queue_depth gauge",
                f"phi3_operator_work_queue_depth {self._queue_depth()}",
            ]
        return "\n".join(lines) + "\n"


def serve(metrics: Metrics, host: str, port: int) -> ThreadingHTTPServer:
    """Serve GET /metrics and /healthz from a daemon thread; returns the server (its port may have been 0).

    /healthz answers from the start, so a standby replica waiting for the leader Lease is live too.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path not in ("/metrics", "/healthz"):
                self.send_error(404)
                return
            body = metrics.render().encode() if path == "/metrics" else b"ok\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # scrapes every few seconds would drown the operator's log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
