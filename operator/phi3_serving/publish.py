"""`phi3-operator publish`: a model version as an OCI image in a registry, pushed once.

Kubernetes mounts such an image read-only as an image volume (`volumes[].image`, GA in 1.36), so the
node's image store is the model cache: a second replica on the node, a restarted pod and a rollback
to a version the node still holds start without downloading anything.

The image is one uncompressed tar layer holding the MLflow model folder (`MLmodel` at its root), under
an index for linux/amd64 and linux/arm64 (containerd matches a plain manifest's platform; both entries
share the layer). The layer is written deterministically (sorted names, zero times and owners), so the
same model always gives the same digests and the registry stores its bytes once, whatever the tag.

The tag names the model version; publishing a tag the registry already holds downloads nothing.
The registry API is the OCI distribution spec's: HEAD, monolithic blob upload, manifest PUT, with
anonymous, Basic or Bearer-token auth from a Docker config.json. Nothing here prints a credential.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
PLATFORMS = ("amd64", "arm64")
MODEL_URI_ANNOTATION = "ai.phi3.model-uri"
CHUNK = 1 << 20
IGNORED_FILES = (".phi3-fetched.json",)


class PublishError(Exception):
    """Publishing failed; `stage` says whether the model could not be fetched or the registry refused."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage  # "fetch" | "registry"


@dataclass(frozen=True)
class ImageName:
    registry: str  # host[:port]
    repository: str
    tag: str

    @classmethod
    def parse(cls, reference: str) -> ImageName:
        """REGISTRY/REPO:TAG; the registry part is required (a model has no Docker Hub default)."""
        head, _, tag = reference.rpartition(":")
        if not head or "/" in tag:
            raise ValueError(f"{reference!r} must be REGISTRY/REPOSITORY:TAG")
        registry, _, repository = head.partition("/")
        if not repository or not ("." in registry or ":" in registry or registry == "localhost"):
            raise ValueError(f"{reference!r} must start with a registry host, e.g. registry.example.com/models:v1")
        return cls(registry, repository, tag)

    def pinned(self, digest: str) -> str:
        return f"{self.registry}/{self.repository}@{digest}"

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class PublishResult:
    image: str  # REGISTRY/REPO@sha256:...
    size_bytes: int  # the model's bytes (the layer)
    reused: bool  # the tag was there already: nothing was downloaded or pushed

    def as_json(self) -> str:
        return json.dumps({"image": self.image, "sizeBytes": self.size_bytes, "reused": self.reused})


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.name not in IGNORED_FILES:
            yield path


class _HashingWriter:
    """A write-only file that hashes what passes through it."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target, self.sha, self.size = target, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()


def write_layer(folder: Path, out: Path) -> Blob:
    """A reproducible tar of `folder`'s content: same files and bytes, same digest."""
    with out.open("wb") as raw:
        writer = _HashingWriter(raw)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for path in _files(folder):
                info = tarfile.TarInfo(path.relative_to(folder).as_posix())
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if path.is_dir():
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    continue
                info.size = path.stat().st_size
                info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                with path.open("rb") as data:
                    tar.addfile(info, data)
    return Blob(f"sha256:{writer.sha.hexdigest()}", writer.size, LAYER_TYPE)


def _json_blob(document: Mapping[str, Any], media_type: str) -> tuple[bytes, Blob]:
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return data, Blob(f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), media_type)


def image_documents(layer: Blob, model_uri: str) -> tuple[list[tuple[bytes, Blob]], list[tuple[bytes, Blob]],
                                                         tuple[bytes, Blob]]:
    """(configs, manifests, index) for one layer: one config and manifest per platform, one index."""
    configs, manifests = [], []
    for arch in PLATFORMS:
        config = _json_blob({"architecture": arch, "os": "linux",
                             "config": {"Labels": {MODEL_URI_ANNOTATION: model_uri}},
                             "rootfs": {"type": "layers", "diff_ids": [layer.digest]}}, CONFIG_TYPE)
        configs.append(config)
        manifests.append(_json_blob({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config[1].descriptor(),
            "layers": [layer.descriptor()], "annotations": {MODEL_URI_ANNOTATION: model_uri},
        }, MANIFEST_TYPE))
    index = _json_blob({
        "schemaVersion": 2, "mediaType": INDEX_TYPE,
        "manifests": [{**blob.descriptor(), "platform": {"architecture": arch, "os": "linux"}}
                      for arch, (_, blob) in zip(PLATFORMS, manifests, strict=True)],
        "annotations": {MODEL_URI_ANNOTATION: model_uri},
    }, INDEX_TYPE)
    return configs, manifests, index


def docker_credentials(registry: str, env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) for `registry` from $DOCKER_CONFIG/config.json (a dockerconfigjson Secret)."""
    env = os.environ if env is None else env
    path = Path(env.get("DOCKER_CONFIG", str(Path.home() / ".docker"))) / "config.json"
    try:
        auths = json.loads(path.read_text()).get("auths", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    for key, entry in auths.items():
        host = urllib.parse.urlparse(key if "//" in key else f"//{key}").netloc
        if host != registry:
            continue
        if entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
        if entry.get("username"):
            return str(entry["username"]), str(entry.get("password", ""))
    return None


class RegistryClient:
    """The few distribution-spec calls publishing needs."""

    def __init__(self, name: ImageName, *, plain_http: bool = False, credentials: tuple[str, str] | None = None,
                 timeout_s: float = 300.0) -> None:
        self.name = name
        self.base = f"{'http' if plain_http else 'https'}://{name.registry}/v2/{name.repository}"
        self.credentials = credentials
        self.timeout_s = timeout_s
        self._authorization: str | None = None

    def _request(self, method: str, url: str, *, body: bytes | IO[bytes] | None = None,
                 headers: Mapping[str, str] | None = None, retry_auth: bool = True) -> Any:
        request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
        if self._authorization:
            request.add_header("Authorization", self._authorization)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            if error.code == 401 and retry_auth and self._authenticate(error.headers.get("WWW-Authenticate", "")):
                if hasattr(body, "seek"):
                    body.seek(0)  # type: ignore[union-attr]
                return self._request(method, url, body=body, headers=headers, retry_auth=False)
            raise

    def _authenticate(self, challenge: str) -> bool:
        scheme, _, params = challenge.partition(" ")
        if self.credentials is None and scheme.lower() != "bearer":
            return False
        basic = ""
        if self.credentials is not None:
            basic = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        if scheme.lower() == "basic":
            self._authorization = basic
            return True
        fields = dict(part.split("=", 1) for part in _split_challenge(params))
        realm = fields.pop("realm", "").strip('"')
        query = {key: value.strip('"') for key, value in fields.items() if key in ("service", "scope")}
        query.setdefault("scope", f"repository:{self.name.repository}:pull,push")
        token_request = urllib.request.Request(f"{realm}?{urllib.parse.urlencode(query)}")
        if basic:
            token_request.add_header("Authorization", basic)
        with urllib.request.urlopen(token_request, timeout=self.timeout_s) as answer:
            token = json.load(answer)
        self._authorization = f"Bearer {token.get('token') or token.get('access_token')}"
        return True

    def manifest(self, reference: str, media_type: str) -> dict[str, Any]:
        with self._request("GET", f"{self.base}/manifests/{reference}", headers={"Accept": media_type}) as answer:
            document: dict[str, Any] = json.load(answer)
        return document

    def manifest_digest(self, reference: str) -> str | None:
        accept = ", ".join((INDEX_TYPE, MANIFEST_TYPE))
        try:
            with self._request("HEAD", f"{self.base}/manifests/{reference}", headers={"Accept": accept}) as answer:
                return str(answer.headers.get("Docker-Content-Digest") or "") or None
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def has_blob(self, digest: str) -> bool:
        try:
            with self._request("HEAD", f"{self.base}/blobs/{digest}"):
                return True
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return False
            raise

    def push_blob(self, blob: Blob, body: bytes | IO[bytes]) -> None:
        if self.has_blob(blob.digest):
            return  # the same bytes under another tag: stored once
        with self._request("POST", f"{self.base}/blobs/uploads/", body=b"") as answer:
            location = urllib.parse.urljoin(self.base, answer.headers["Location"])
        separator = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)}
        with self._request("PUT", f"{location}{separator}digest={blob.digest}", body=body, headers=headers):
            pass

    def push_manifest(self, reference: str, data: bytes, media_type: str) -> None:
        with self._request("PUT", f"{self.base}/manifests/{reference}", body=data,
                           headers={"Content-Type": media_type}):
            pass


def _split_challenge(params: str) -> list[str]:
    """`realm="a,b",service="x"` split on the commas outside quotes."""
    parts, current, quoted = [], "", False
    for char in params:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append(current.strip())
            current = ""
            continue
        current += char
    return [part for part in [*parts, current.strip()] if "=" in part]


def publish_model(
    model_uri: str, image: str, *, plain_http: bool = False, workdir: Path | None = None
) -> PublishResult:
    """Push `model_uri` as `image` (REGISTRY/REPO:TAG) unless the tag exists; returns the pinned reference."""
    name = ImageName.parse(image)
    client = RegistryClient(name, plain_http=plain_http, credentials=docker_credentials(name.registry))
    try:
        existing = client.manifest_digest(name.tag)
    except (urllib.error.URLError, OSError) as error:
        raise PublishError("registry", f"cannot reach {name.registry}: {_why(error)}") from error
    if existing:
        return PublishResult(name.pinned(existing), _existing_size(client, existing), reused=True)

    from phi3_serving.fetch import fetch_model

    scratch = Path(tempfile.mkdtemp(prefix="phi3-publish-", dir=workdir))
    try:
        try:
            fetched = fetch_model(model_uri, scratch / "model")
        except Exception as error:  # MLflow's and the artifact store's errors: all mean "cannot fetch"
            raise PublishError("fetch", f"cannot fetch {model_uri}: {_why(error)}") from error
        layer = write_layer(fetched.dest, scratch / "layer.tar")
        shutil.rmtree(fetched.dest)
        configs, manifests, index = image_documents(layer, model_uri)
        try:
            with (scratch / "layer.tar").open("rb") as data:
                client.push_blob(layer, data)
            for body, blob in configs:
                client.push_blob(blob, body)
            for body, blob in manifests:
                client.push_manifest(blob.digest, body, MANIFEST_TYPE)
            client.push_manifest(name.tag, index[0], INDEX_TYPE)
        except (urllib.error.URLError, OSError) as error:
            where = f"{name.registry}/{name.repository}"
            raise PublishError("registry", f"cannot push to {where}: {_why(error)}") from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return PublishResult(name.pinned(index[1].digest), layer.size, reused=False)


def _existing_size(client: RegistryClient, digest: str) -> int:
    """The layer size of a published image, read from its manifests (small documents)."""
    try:
        first = client.manifest(digest, INDEX_TYPE)["manifests"][0]["digest"]
        return int(client.manifest(first, MANIFEST_TYPE)["layers"][0]["size"])
    except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError):
        return 0


def _why(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    message = getattr(error, "message", None) or str(error)
    return str(message).splitlines()[0] if message else type(error).__name__
