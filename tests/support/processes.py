"""What every server the tests start needs: its log's tail, and a stop that takes its whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def log_tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def stop_process_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the group `process` leads (it was started with start_new_session), SIGKILL after `timeout`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
