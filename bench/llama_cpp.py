"""llama.cpp, the CPU peer the serving bench compares us with: built from source, cached, on demand.

PyPI's `llama-cpp-python` sdist carries llama.cpp's source (`vendor/llama.cpp`: the server, the
quantizer, `convert_hf_to_gguf.py` and `gguf-py`), so it is built from PyPI alone. CMake and Ninja come
from PyPI too, in a tools venv. Everything is cached under ~/.cache/phi3-operator/, keyed by version;
only the bench asks for it, CI never waits for it.

    python bench/llama_cpp.py build              build (once) and print the folder holding bin/ and src/
    python bench/llama_cpp.py gguf HF_DIR OUT    convert a Hugging Face folder to GGUF, quantized Q4_0

`to_gguf` converts with llama.cpp's own `convert_hf_to_gguf.py` (f16), then `llama-quantize` to Q4_0,
the closest match of onnxruntime-genai's int4 with block size 32. `LlamaServer` runs `llama-server` on
127.0.0.1 and stops it with its process group.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.mlflow_server import free_port  # noqa: E402
from tests.support.processes import log_tail, stop_process_group  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CMAKE_VERSION = "4.4.5"
NINJA_VERSION = "1.13.2"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi3-operator"
LLAMA_CPP_DIR = CACHE_DIR / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
TOOLS_VENV = CACHE_DIR / f"cmake-{CMAKE_VERSION}-ninja-{NINJA_VERSION}"
TARGETS = ("llama-server", "llama-quantize", "llama-bench", "llama-batched-bench")

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


def to_gguf(hf_dir: Path, out_dir: Path, quantization: str = "Q4_0") -> Path:
    """`hf_dir` as `out_dir/model-<quantization>.gguf`, made once: the f16 conversion is removed after."""
    target = out_dir / f"model-{quantization}.gguf"
    if target.is_file():
        return target
    llama = build()
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "model-f16.gguf.partial"
    env = {**os.environ, "PYTHONPATH": str(llama / "src" / "gguf-py"), "HF_HUB_OFFLINE": "1", "NO_LOCAL_GGUF": ""}
    subprocess.run([sys.executable, str(llama / "src" / "convert_hf_to_gguf.py"), str(hf_dir),
                    "--outfile", str(f16), "--outtype", "f16"], check=True, env=env, capture_output=True)
    partial = target.with_name(target.name + ".partial")
    subprocess.run([str(llama / "bin" / "llama-quantize"), str(f16), str(partial), quantization],
                   check=True, capture_output=True)
    f16.unlink()
    partial.rename(target)
    return target


@dataclass
class LlamaServer:
    """`llama-server` on 127.0.0.1 and a free port, serving one GGUF with the OpenAI API."""

    model: Path
    log_path: Path
    parallel: int = 8
    threads: int = 2
    context_per_slot: int = 1024
    extra_args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(build() / "bin" / "llama-server"), "--model", str(self.model), "--host", "127.0.0.1",
            "--port", str(self.port), "--parallel", str(self.parallel), "--threads", str(self.threads),
            "--threads-batch", str(self.threads), "--ctx-size", str(self.context_per_slot * self.parallel),
            # The model's own chat template (the GGUF carries tokenizer_config's), rendered as transformers does.
            "--jinja", "--no-webui", *self.extra_args,
        ]

    def start(self, timeout: float = 120) -> LlamaServer:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        try:
            wait_until(self._ready, timeout=timeout, interval=0.25, message="llama-server to load its model")
        except Exception:
            self.stop()
            raise AssertionError(f"llama-server did not become ready:\n{log_tail(self.log_path, 40)}") from None
        return self

    def _ready(self) -> bool:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {self._process and self._process.returncode}")
        with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as response:
            return bool(json.loads(response.read()).get("status") == "ok")

    def stop(self, timeout: float = 30) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process_group(process, timeout)

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if argv == ["build"]:
        print(build())
        return 0
    if len(argv) == 3 and argv[0] == "gguf":
        print(to_gguf(Path(argv[1]), Path(argv[2])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
