"""Building and caching the binaries `up` runs: the cluster's Go module graph, kwok's stages, the pause image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import (
    BINARIES,
    CACHE_DIR,
    CLUSTER_BIN_DIR,
    CLUSTER_MODULES,
    CONTAINERD_BUILD_TAGS,
    CONTAINERD_VERSION,
    CONTROL_PLANE_PACKAGES,
    HELM_VERSION,
    KUBERNETES_VERSION,
    KWOK_VERSION,
    NODE_BINARIES,
    NODE_PACKAGES,
    PAUSE_DIR,
    TEST_BINARIES,
    WRAPPER_MAINS,
    die,
    real_node_enabled,
    run,
)


def go_env() -> dict[str, str]:
    # GOFLAGS=-mod=mod lets `go build` fill go.sum for the generated wrapper modules.
    return {"GOFLAGS": "-mod=mod -buildvcs=false", "CGO_ENABLED": "0"}


def staging_replaces(kubernetes_gomod: Path, version: str) -> list[str]:
    """Map each `k8s.io/<m> v0.0.0` requirement of k8s.io/kubernetes to the published v0.X.Y."""
    published = "v0." + version.removeprefix("v").split(".", 1)[1]
    replaces = []
    for line in kubernetes_gomod.read_text().splitlines():
        parts = line.strip().split()
        if len(parts) >= 2 and parts[0].startswith("k8s.io/") and parts[1] == "v0.0.0":
            replaces.append(f"replace {parts[0]} => {parts[0]} {published}")
    if not replaces:
        die(f"no v0.0.0 staging requirements found in {kubernetes_gomod}")
    return replaces


def build_cluster_binaries() -> None:
    """Every binary `up` runs, in one `go build` over one wrapper module: Kubernetes at KUBERNETES_VERSION (its
    staging modules at their published versions), etcd, kwok, Helm, containerd, CoreDNS and the registry. One
    module graph means one version of each shared library (client-go, gRPC, OpenTelemetry, the etcd client...),
    compiled once for all of them, and one link step per binary."""
    src = CACHE_DIR / "src" / CLUSTER_BIN_DIR.name
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    info = json.loads(run(["go", "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"]))
    replaces = staging_replaces(Path(info["GoMod"]), KUBERNETES_VERSION)
    (src / "go.mod").write_text(
        "module phi3operator.local/clusterbuild\n\ngo 1.26\n\nrequire (\n"
        + "".join(f"\t{module} {version}\n" for module, version in CLUSTER_MODULES.items())
        + ")\n\n" + "\n".join(replaces) + "\n"
    )
    for name, main in WRAPPER_MAINS.items():
        (src / name).mkdir()
        (src / name / "main.go").write_text(main)
    external = sorted({package for package in (*CONTROL_PLANE_PACKAGES.values(), *NODE_PACKAGES.values())
                       if not package.startswith("./")})
    # Blank imports keep `go mod tidy` from dropping the requirements; this file is never built.
    (src / "tools.go").write_text("//go:build tools\n\npackage tools\n\nimport (\n"
                                  + "".join(f'\t_ "{package}"\n' for package in external) + ")\n")
    run(["go", "mod", "tidy"], cwd=src, env=go_env())
    minor = KUBERNETES_VERSION.split(".")[1]
    ldflags = " ".join(
        [
            "-s -w",
            f"-X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION}",
            "-X k8s.io/component-base/version.gitMajor=1",
            f"-X k8s.io/component-base/version.gitMinor={minor}",
            "-X k8s.io/component-base/version.gitTreeState=clean",
            f"-X k8s.io/client-go/pkg/version.gitVersion={KUBERNETES_VERSION}",
            "-X k8s.io/client-go/pkg/version.gitMajor=1",
            f"-X k8s.io/client-go/pkg/version.gitMinor={minor}",
            f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
            f"-X github.com/containerd/containerd/v2/version.Version={CONTAINERD_VERSION}",
        ]
    )
    out = CLUSTER_BIN_DIR.with_name(CLUSTER_BIN_DIR.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    packages = [*CONTROL_PLANE_PACKAGES.values(), *NODE_PACKAGES.values()]
    run(["go", "build", "-trimpath", "-tags", CONTAINERD_BUILD_TAGS, "-ldflags", ldflags, "-o", str(out) + "/",
         *packages], cwd=src, env=go_env())
    out.rename(CLUSTER_BIN_DIR)
    write_kwok_stages()


KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)


def kwok_stages_file() -> Path:
    """kwok's own stage definitions (node init and heartbeat, pod ready/complete/delete), from its module."""
    return CLUSTER_BIN_DIR / "kwok-stages.yaml"


# Build Jobs that push to this registry host fail, as a push to an unreachable registry would:
# the one way to see a failed build on nodes where nothing really runs.
SIMULATED_UNREACHABLE_REGISTRY = "unreachable.invalid"
POD_PUSH_FAILURE_STAGE = f"""\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-push-failure
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values:
      - 'Running'
    - key: '.metadata.labels["phi3.ai/registry"]'
      operator: 'In'
      values:
      - '{SIMULATED_UNREACHABLE_REGISTRY}'
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      containerStatuses:
      {{{{ range $index, $item := .spec.containers }}}}
      - image: {{{{ $item.image | Quote }}}}
        name: {{{{ $item.name | Quote }}}}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            exitCode: 1
            finishedAt: {{{{ $now | Quote }}}}
            reason: Error
            message: "simulated: failed to push: dial tcp: lookup {SIMULATED_UNREACHABLE_REGISTRY}: no such host"
            startedAt: {{{{ $now | Quote }}}}
      {{{{ end }}}}
      phase: Failed
"""
EXCLUDE_PUSH_FAILURES = f"""\
    - key: '.metadata.labels["phi3.ai/registry"]'
      operator: 'NotIn'
      values:
      - '{SIMULATED_UNREACHABLE_REGISTRY}'
"""


def write_kwok_stages() -> None:
    info = json.loads(run(["go", "mod", "download", "-json", f"sigs.k8s.io/kwok@{KWOK_VERSION}"]))
    stage_dir = Path(info["Dir"]) / "kustomize" / "stage"
    documents = []
    for stage in KWOK_STAGES:
        text = (stage_dir / stage).read_text().strip()
        if stage.endswith("pod-complete.yaml"):
            anchor = "    matchExpressions:\n"
            if anchor not in text:
                die(f"unexpected layout of kwok's {stage}")
            text = text.replace(anchor, anchor + EXCLUDE_PUSH_FAILURES, 1)
        documents.append(text)
    documents.append(POD_PUSH_FAILURE_STAGE.strip())
    kwok_stages_file().write_text("\n---\n".join(documents) + "\n")


PAUSE_IMAGE = "localhost/phi3-pause:1"
PAUSE_MAIN = """\
package main

// The sandbox's first process: it holds the pod's namespaces, reaps zombies and exits on a signal.

import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tsignals := make(chan os.Signal, 8)
\tsignal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
\tfor sig := range signals {
\t\tif sig != syscall.SIGCHLD {
\t\t\tos.Exit(0)
\t\t}
\t\tfor {
\t\t\tpid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
\t\t\tif pid <= 0 || err != nil {
\t\t\t\tbreak
\t\t\t}
\t\t}
\t}
}
"""


def write_oci_archive(path: Path, name: str, files: dict[str, tuple[bytes, int]], entrypoint: list[str]) -> None:
    """A one-layer OCI image archive, as `ctr images import` reads it; no registry or builder needed."""
    import hashlib
    import io
    import tarfile

    def blob(data: bytes, media_type: str) -> tuple[dict[str, object], bytes]:
        return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                "size": len(data)}, data

    layer_buffer = io.BytesIO()
    with tarfile.open(fileobj=layer_buffer, mode="w", format=tarfile.PAX_FORMAT) as layer:
        for member_path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(member_path.lstrip("/"))
            info.size, info.mode = len(data), mode
            layer.addfile(info, io.BytesIO(data))
    layer_desc, layer_data = blob(layer_buffer.getvalue(), "application/vnd.oci.image.layer.v1.tar")
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc, config_data = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc, manifest_data = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {**manifest_desc, "platform": {"architecture": "amd64", "os": "linux"},
         "annotations": {"io.containerd.image.name": name,
                                          "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}}]}
    with tarfile.open(path, "w") as archive:
        def add(member: str, data: bytes) -> None:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for desc, data in ((layer_desc, layer_data), (config_desc, config_data), (manifest_desc, manifest_data)):
            add("blobs/sha256/" + str(desc["digest"]).split(":", 1)[1], data)


def build_pause() -> None:
    src = CACHE_DIR / "src" / PAUSE_DIR.name
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text("module phi3operator.local/pause\n\ngo 1.26\n")
    (src / "main.go").write_text(PAUSE_MAIN)
    out = PAUSE_DIR.with_name(PAUSE_DIR.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "pause"), "."], cwd=src, env=go_env())
    write_oci_archive(out / "pause.oci.tar", PAUSE_IMAGE, {"/pause": ((out / "pause").read_bytes(), 0o755)}, ["/pause"])
    out.rename(PAUSE_DIR)


def binaries_built(test_tools: bool = False) -> bool:
    wanted = {**BINARIES, **(TEST_BINARIES if test_tools else {}), **(NODE_BINARIES if real_node_enabled() else {})}
    return kwok_stages_file().is_file() and all((d / name).is_file() for name, d in wanted.items())


def binary(name: str) -> str:
    return str({**BINARIES, **NODE_BINARIES, **TEST_BINARIES}[name] / name)
