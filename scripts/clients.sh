#!/usr/bin/env bash
# Installs the third-party gRPC clients used by the pool conformance tests and prints the two
# variables the tests read:
#   EDGE_TRITON_PYTHON   a venv with tritonclient[grpc] (scripts/requirements-clients.txt)
#   EDGE_MQTT_PYTHON     the same venv, which also has paho-mqtt (the MQTT 5 client tests)
#   EDGE_TFS_PYTHON      the fixture venv's Python (it has TensorFlow; scripts/fixtures.sh)
#   EDGE_TFS_PYTHONPATH  tensorflow-serving-api 2.21.0 + grpcio, installed --no-deps into a
#                        directory used with that Python
# Cached under ${EDGE_CACHE_DIR:-~/.cache/edge-fleet}; reinstalled when the pins change.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cache="${EDGE_CACHE_DIR:-$HOME/.cache/edge-fleet}"
mkdir -p "$cache"
requirements="$here/requirements-clients.txt"
tfs_pins="tensorflow-serving-api==2.21.0 grpcio==1.85.3"
stamp_value="$(cat "$requirements"; echo "$tfs_pins")"
stamp_hash="$(echo "$stamp_value" | sha256sum | cut -c1-64)"

exec 9>"$cache/clients.lock"
flock 9
venv="$cache/venv-clients"
tfs="$cache/tfs-api"
if [[ "$(cat "$cache/.clients.sha256" 2>/dev/null || true)" != "$stamp_hash" ]] \
    || ! "$venv/bin/python" -c 'import tritonclient.grpc, paho.mqtt.client' >/dev/null 2>&1; then
    echo "clients.sh: installing tritonclient into $venv and tensorflow-serving-api into $tfs" >&2
    rm -rf "$venv" "$tfs"
    "${EDGE_PYTHON:-python3}" -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$requirements" >&2
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q --no-deps --target "$tfs" $tfs_pins >&2
    echo "$stamp_hash" > "$cache/.clients.sha256"
fi
echo "EDGE_TRITON_PYTHON=$venv/bin/python"
echo "EDGE_MQTT_PYTHON=$venv/bin/python"
echo "EDGE_TFS_PYTHON=$cache/venv/bin/python"
echo "EDGE_TFS_PYTHONPATH=$tfs"
