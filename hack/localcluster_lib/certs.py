"""The cluster's PKI (openssl) and kubeconfigs."""

from __future__ import annotations

import json
from pathlib import Path

from .config import APISERVER_PORT, BRIDGE_ADDRESS, HOST, NODE_NAME, STATE_DIR, real_node_enabled, run, write_if_changed


def openssl(*args: str) -> None:
    run(["openssl", *args])


def make_pki(pki: Path) -> None:
    if (pki / "kube-proxy.crt").is_file():
        return
    pki.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"), "-subj", "/CN=phi3-localcluster-ca")

    def leaf(name: str, subject: str, extensions: str) -> None:
        ext = pki / f"{name}.ext"
        ext.write_text(extensions)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki / f"{name}.key"),
                "-out", str(pki / f"{name}.csr"), "-subj", subject)
        openssl("x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.crt"),
                "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "3650",
                "-out", str(pki / f"{name}.crt"), "-extfile", str(ext))

    leaf("apiserver", "/CN=kube-apiserver",
         f"subjectAltName=IP:127.0.0.1,IP:{BRIDGE_ADDRESS},IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
         "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
         "extendedKeyUsage=serverAuth\n")
    leaf("admin", "/O=system:masters/CN=localcluster-admin", "extendedKeyUsage=clientAuth\n")
    # The node's own identities: the Node authorizer and NodeRestriction admit the kubelet by
    # its system:node:<name> certificate; kube-proxy gets the built-in system:node-proxier role.
    leaf("kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}", "extendedKeyUsage=clientAuth\n")
    leaf("kube-proxy", "/CN=system:kube-proxy", "extendedKeyUsage=clientAuth\n")
    openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def kubeconfig_path() -> Path:
    return STATE_DIR / "kubeconfig"


def api_host() -> str:
    """Pods reach the API server through the `kubernetes` Service, so with a real node it binds to the bridge."""
    return BRIDGE_ADDRESS if real_node_enabled() else HOST


def write_kubeconfig(pki: Path, path: Path | None = None, user: str = "admin") -> None:
    write_if_changed(
        path or kubeconfig_path(),
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "phi3-local", "cluster": {
                    "server": f"https://{api_host()}:{APISERVER_PORT}",
                    "certificate-authority": str(pki / "ca.crt")}}],
                "users": [{"name": "admin", "user": {
                    "client-certificate": str(pki / f"{user}.crt"),
                    "client-key": str(pki / f"{user}.key")}}],
                "contexts": [{"name": "phi3-local", "context": {"cluster": "phi3-local", "user": "admin"}}],
                "current-context": "phi3-local",
            },
            indent=2,
        )
    )
