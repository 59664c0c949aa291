#!/bin/sh
# Runs one `buildctl` command against a buildkitd started for it alone, then stops that buildkitd:
# a build Job needs no long-lived daemon. buildkitd's flags come from $BUILDKITD_FLAGS; as a
# non-root user it runs inside rootlesskit's user namespace.
#   buildctl-daemonless.sh build --frontend dockerfile.v0 --local context=. ...
set -eu

state=$(mktemp -d "${TMPDIR:-/tmp}/buildkitd.XXXXXX")
if [ "$(id -u)" = 0 ]; then
    address="unix:///run/buildkit/buildkitd.sock"
    wrapper=""
else
    address="unix://${XDG_RUNTIME_DIR:?XDG_RUNTIME_DIR must name a writable folder}/buildkit/buildkitd.sock"
    wrapper="rootlesskit"
fi

# shellcheck disable=SC2086  # BUILDKITD_FLAGS is a list of flags
$wrapper buildkitd ${BUILDKITD_FLAGS:-} --addr="$address" >"$state/buildkitd.log" 2>&1 &
daemon=$!
trap 'kill "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; rm -rf "$state"' EXIT

# Wait for the daemon's socket to answer (up to about 60 s), or say why it never did.
attempt=0
until buildctl --addr="$address" debug workers >/dev/null 2>&1; do
    if ! kill -0 "$daemon" 2>/dev/null || [ "$attempt" -ge 300 ]; then
        echo "buildctl-daemonless.sh: buildkitd did not start (address $address); its log:" >&2
        cat "$state/buildkitd.log" >&2
        exit 1
    fi
    attempt=$((attempt + 1))
    sleep 0.2
done

status=0
buildctl --addr="$address" "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "buildctl-daemonless.sh: buildctl exited $status; buildkitd's log (last 40 lines):" >&2
    tail -n 40 "$state/buildkitd.log" >&2
fi
exit "$status"
