"""hack/localcluster as a package: a real single-machine Kubernetes cluster on 127.0.0.1.

`hack/localcluster` (the executable) puts hack/ on sys.path and runs `cli.main`; `cli` holds the usage text.
The modules import only downward: `config` (versions, ports, paths, cache keys; `log`, `die`, `run`), then
`build`, `certs`, `processes`, then `nodes` (the kwok nodes), `realnode` (kubelet, containerd, kube-proxy,
CoreDNS, the registry) and `addons` (one module per add-on built only when asked for), then `cli`.

Stdlib only: it must run before the project's virtualenv exists.
"""
