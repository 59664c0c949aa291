"""Operator settings: the config file the Helm chart mounts, plus environment overrides."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FIELD_MANAGER = "phi3-operator"
DEFAULT_RUNTIME_VERSION = "0.1.0"
# The build arguments the generated build Dockerfile declares (a private or cluster-local package index,
# its CA bundle); config.buildArgs may set these and no others.
BUILD_ARGS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT")


@dataclass(frozen=True)
class CatalogImage:
    """A prebuilt runtime image and what it carries, so the operator can tell whether a model fits."""

    flavor: str  # onnx-genai | transformers | pyfunc
    target: str  # cpu | cuda
    image: str
    packages: Mapping[str, str] = field(default_factory=dict)  # normalised name -> version


# The images each flavor can run on, in the order the operator tries them (the chart's catalog lists the
# same, with what each carries). transformers needs torch, which only the larger torch-cpu image has on CPU.
DEFAULT_CATALOG_IMAGES = (
    ("onnx-genai", "cpu", "mlserver-cpu"),
    ("transformers", "cpu", "mlserver-torch-cpu"),
    ("pyfunc", "cpu", "mlserver-cpu"),
    ("pyfunc", "cpu", "mlserver-torch-cpu"),
    ("onnx-genai", "cuda", "mlserver-cuda"),
    ("transformers", "cuda", "mlserver-cuda"),
    ("pyfunc", "cuda", "mlserver-cuda"),
)


def default_catalog() -> tuple[CatalogImage, ...]:
    registry = "ghcr.io/phi3-operator"
    return tuple(
        CatalogImage(flavor=flavor, target=target, image=f"{registry}/{image}:{DEFAULT_RUNTIME_VERSION}")
        for flavor, target, image in DEFAULT_CATALOG_IMAGES
    )


DEFAULT_MONITORING_PEERS: tuple[Mapping[str, Any], ...] = (
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
)


@dataclass(frozen=True)
class OperatorSettings:
    default_tracking_uri: str = "http://mlflow.mlflow.svc:5000"
    resync_interval_s: float = 60.0
    model_refresh_interval_s: float = 60.0
    builder_image: str = "moby/buildkit:v0.34.2-rootless"
    build_args: tuple[tuple[str, str], ...] = ()
    image_catalog: tuple[CatalogImage, ...] = field(default_factory=default_catalog)
    field_manager: str = FIELD_MANAGER
    max_workers: int = 16
    # Where `model.delivery: Auto | ImageVolume` publishes model images (REGISTRY[/PATH]); empty: Auto downloads.
    model_registry: str = ""
    # Registries (host:port) spoken to over plain HTTP, e.g. a cluster-local one; every other is HTTPS.
    plain_http_registries: tuple[str, ...] = ()
    # Who may scrape a model's metrics port where spec.network writes a NetworkPolicy: NetworkPolicy
    # `from` peers. The default is the conventional monitoring namespace.
    monitoring_peers: tuple[Mapping[str, Any], ...] = DEFAULT_MONITORING_PEERS

    @classmethod
    def load(cls, path: str | None = None, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env
        path = path or env.get("PHI3_OPERATOR_CONFIG")
        raw: dict[str, Any] = {}
        if path:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"operator config {path} must be a mapping")
            raw = loaded
        return cls.from_mapping(raw, env)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], env: Mapping[str, str]) -> OperatorSettings:
        defaults = cls()
        catalog = (
            tuple(parse_catalog_entry(entry) for entry in raw["imageCatalog"])
            if raw.get("imageCatalog")
            else defaults.image_catalog
        )
        return cls(
            default_tracking_uri=env.get(
                "PHI3_DEFAULT_TRACKING_URI", raw.get("defaultTrackingUri", defaults.default_tracking_uri)
            ),
            resync_interval_s=float(
                env.get("PHI3_RESYNC_INTERVAL", raw.get("resyncIntervalSeconds", defaults.resync_interval_s))
            ),
            model_refresh_interval_s=float(
                env.get(
                    "PHI3_MODEL_REFRESH_INTERVAL",
                    raw.get("modelRefreshIntervalSeconds", defaults.model_refresh_interval_s),
                )
            ),
            builder_image=raw.get("builderImage", defaults.builder_image),
            build_args=parse_build_args(raw.get("buildArgs") or {}),
            image_catalog=catalog,
            max_workers=int(raw.get("maxWorkers", defaults.max_workers)),
            model_registry=str(env.get("PHI3_MODEL_REGISTRY", raw.get("modelRegistry") or defaults.model_registry)),
            plain_http_registries=tuple(str(r) for r in raw.get("plainHttpRegistries") or ()),
            monitoring_peers=parse_monitoring_peers(raw.get("monitoring", defaults.monitoring_peers)),
        )

    def plain_http(self, image_or_registry: str) -> bool:
        return image_or_registry.split("/", maxsplit=1)[0] in self.plain_http_registries


def parse_monitoring_peers(raw: Any) -> tuple[Mapping[str, Any], ...]:
    """config.monitoring: a list of NetworkPolicy peers, each with a namespaceSelector and/or podSelector."""
    if not isinstance(raw, (list, tuple)):
        raise ValueError("config.monitoring must be a list of NetworkPolicy peers")
    peers = []
    for peer in raw:
        if not isinstance(peer, Mapping) or not peer or set(peer) - {"namespaceSelector", "podSelector"}:
            raise ValueError(f"config.monitoring: {peer!r} must have a namespaceSelector, a podSelector or both")
        peers.append(dict(peer))
    return tuple(peers)


def parse_build_args(raw: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, Mapping):
        raise ValueError("config.buildArgs must be a mapping of build argument to value")
    unknown = sorted(str(name) for name in raw if name not in BUILD_ARGS)
    if unknown:
        raise ValueError(f"config.buildArgs: {', '.join(unknown)} is not one of the build arguments the "
                         f"generated Dockerfile declares ({', '.join(BUILD_ARGS)})")
    return tuple((str(name), str(value)) for name, value in sorted(raw.items()) if value not in (None, ""))


def normalise_package(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def parse_catalog_entry(entry: Mapping[str, Any]) -> CatalogImage:
    packages: dict[str, str] = {}
    for line in entry.get("packages", []):
        name, _, version = str(line).partition("==")
        packages[normalise_package(name)] = version.strip()
    return CatalogImage(
        flavor=str(entry["flavor"]), target=str(entry["target"]), image=str(entry["image"]), packages=packages
    )
