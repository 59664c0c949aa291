"""A directory laid out the way the kubelet writes a Secret volume, and updated the way it updates one.

Kubernetes' AtomicWriter puts the files in a fresh `..<timestamp>` directory, points a `..data_tmp`
symlink at it and renames that over `..data` (the atomic step), then makes `name -> ..data/name`
symlinks for new keys, removes the ones of keys that are gone, and deletes the old directory.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

DATA = "..data"


def write_secret_volume(root: Path, files: Mapping[str, str]) -> None:
    """Make `root` hold exactly `files` (name -> content), as one kubelet update."""
    root.mkdir(parents=True, exist_ok=True)
    previous = os.readlink(root / DATA) if (root / DATA).is_symlink() else None
    stamp = root / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.perf_counter_ns()}"
    stamp.mkdir()
    for name, content in files.items():
        (stamp / name).write_text(content)
    temporary = root / "..data_tmp"
    temporary.symlink_to(stamp.name)
    temporary.rename(root / DATA)
    for name in files:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(f"{DATA}/{name}")
    for entry in root.iterdir():
        if not entry.name.startswith(".") and entry.name not in files:
            entry.unlink()
    if previous is not None:
        shutil.rmtree(root / previous)
