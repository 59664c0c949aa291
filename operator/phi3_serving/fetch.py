"""`phi3-operator fetch`: the init container that downloads a model before MLServer starts.

Idempotent: a destination that already holds the same URI (a restarted pod with a kept
emptyDir, or a PVC cache) is left as is. The download lands in a sibling folder first and is
renamed into place, so a killed fetch never leaves a half model that looks complete.
Nothing here prints credential values: only the URI, with any user:password part masked.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse, urlunparse

MARKER = ".phi3-fetched.json"


@dataclass(frozen=True)
class FetchResult:
    dest: Path
    reused: bool
    files: int
    size_bytes: int


def mask_uri(uri: str) -> str:
    """Hide the password of `https://user:pass@host/...`; other URIs are shown as they are."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    netloc = f"{parsed.username}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
    return urlunparse(parsed._replace(netloc=netloc))


def already_fetched(dest: Path, model_uri: str) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(marker.get("model_uri") == model_uri and (dest / "MLmodel").is_file())


def fetch_model(model_uri: str, dest: Path) -> FetchResult:
    dest = Path(dest)
    if already_fetched(dest, model_uri):
        return FetchResult(dest, True, *_tally(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    import mlflow.artifacts

    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(staging)))
        if not (downloaded / "MLmodel").is_file():
            # A URI that names a model's folder one level up, e.g. runs:/ID with the model under it.
            candidates = [path.parent for path in downloaded.rglob("MLmodel")]
            if len(candidates) != 1:
                raise ValueError(f"{mask_uri(model_uri)} holds no MLflow model (no MLmodel file)")
            downloaded = candidates[0]
        (downloaded / MARKER).write_text(json.dumps({"model_uri": model_uri}))
        if dest.exists():
            shutil.rmtree(dest)
        downloaded.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return FetchResult(dest, False, *_tally(dest))


def _tally(folder: Path) -> tuple[int, int]:
    files = [path for path in folder.rglob("*") if path.is_file()]
    return len(files), sum(path.stat().st_size for path in files)
