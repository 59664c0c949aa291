"""llama.cpp, the CPU peer the serving bench compares us with: built from source, cached, on demand.

PyPI's `llama-cpp-python` sdist carries llama.cpp's source (`vendor/llama.cpp`: the server, the
quantizer, `convert_hf_to_gguf.py` and `gguf-py`), so it is built from PyPI alone. CMake and Ninja come
from PyPI too, in a tools venv. Everything is cached under ~/.cache/phi3-operator/, keyed by version;
only the bench asks for it, CI never waits for it.

    python bench/llama_cpp.py build    build (once) and print the folder holding bin/ and src/
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CMAKE_VERSION = "4.4.5"
NINJA_VERSION = "1.13.2"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi3-operator"
LLAMA_CPP_DIR = CACHE_DIR / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
TOOLS_VENV = CACHE_DIR / f"cmake-{CMAKE_VERSION}-ninja-{NINJA_VERSION}"
TARGETS = ("llama-server", "llama-quantize", "llama-bench")

# Nothing may download at build time: llama.cpp would fetch its web UI from a model hub
# (LLAMA_USE_PREBUILT_UI) and link OpenSSL for model downloads nobody makes here.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
)


def _log(message: str) -> None:
    print(f"llama_cpp: {message}", file=sys.stderr, flush=True)


def _tools_bin() -> Path:
    bin_dir = TOOLS_VENV / "bin"
    complete = TOOLS_VENV / ".complete"
    if not complete.is_file():
        # Made in place, not renamed into place: a venv's scripts name its interpreter by its path.
        shutil.rmtree(TOOLS_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS_VENV)], check=True)
        subprocess.run([str(bin_dir / "pip"), "install", "--quiet", "--no-deps",
                        f"cmake=={CMAKE_VERSION}", f"ninja=={NINJA_VERSION}"], check=True)
        complete.touch()
    return bin_dir


def build() -> Path:
    """The cached folder: bin/ (llama-server, llama-quantize, llama-bench) and src/ (llama.cpp's tree)."""
    if all((LLAMA_CPP_DIR / "bin" / target).is_file() for target in TARGETS):
        return LLAMA_CPP_DIR
    _log(f"building {LLAMA_CPP_DIR.name} (cached in {LLAMA_CPP_DIR}; the first build takes minutes)")
    started = time.monotonic()
    tools = _tools_bin()
    partial = LLAMA_CPP_DIR.with_name(LLAMA_CPP_DIR.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-") as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", download], check=True)
        (sdist,) = Path(download).glob("llama_cpp_python-*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name.removeprefix(prefix)
            archive.extractall(partial / "src", members=[m for m in members if m.name], filter="data")
    source, build_dir = partial / "src", partial / "build"
    env = {**os.environ, "PATH": f"{tools}:{os.environ.get('PATH', '')}"}
    subprocess.run([str(tools / "cmake"), "-S", str(source), "-B", str(build_dir), "-G", "Ninja",
                    f"-DCMAKE_MAKE_PROGRAM={tools / 'ninja'}", *CMAKE_OPTIONS], check=True, env=env)
    subprocess.run([str(tools / "cmake"), "--build", str(build_dir), "--target", *TARGETS,
                    "--parallel", str(os.cpu_count() or 1)], check=True, env=env)
    (partial / "bin").mkdir()
    for target in TARGETS:
        shutil.copy2(build_dir / "bin" / target, partial / "bin" / target)
    shutil.rmtree(build_dir)
    shutil.rmtree(LLAMA_CPP_DIR, ignore_errors=True)
    partial.rename(LLAMA_CPP_DIR)
    _log(f"built {LLAMA_CPP_DIR.name} in {time.monotonic() - started:.0f}s")
    return LLAMA_CPP_DIR


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print(__doc__, file=sys.stderr)
        return 2
    print(build())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
