#!/usr/bin/env bash
# Installs the third-party clients and servers the tests talk to and prints the variables
# the tests read:
#   EDGE_TRITON_PYTHON   a venv with tritonclient[grpc] (scripts/requirements-clients.txt)
#   EDGE_MQTT_PYTHON     the same venv, which also has paho-mqtt (the MQTT 5 client tests)
#   EDGE_TFS_PYTHON      the fixture venv's Python (it has TensorFlow; scripts/fixtures.sh)
#   EDGE_TFS_PYTHONPATH  tensorflow-serving-api 2.21.0 + grpcio, installed --no-deps into a
#                        directory used with that Python
#   EDGE_MLSERVER_PYTHON a venv with Seldon MLServer and onnxruntime, the third-party KServe v2
#                        pool of tests/e2e/mlserver.rs (scripts/requirements-mlserver.txt)
# Cached under ${EDGE_CACHE_DIR:-~/.cache/edge-fleet}; reinstalled when the pins change.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cache="${EDGE_CACHE_DIR:-$HOME/.cache/edge-fleet}"
mkdir -p "$cache"
requirements="$here/requirements-clients.txt"
mlserver_requirements="$here/requirements-mlserver.txt"
tfs_pins="tensorflow-serving-api==2.21.0 grpcio==1.85.3"
stamp_value="$(cat "$requirements" "$mlserver_requirements"; echo "$tfs_pins")"
stamp_hash="$(echo "$stamp_value" | sha256sum | cut -c1-64)"

exec 9>"$cache/clients.lock"
flock 9
venv="$cache/venv-clients"
mlserver="$cache/venv-mlserver"
tfs="$cache/tfs-api"
if [[ "$(cat "$cache/.clients.sha256" 2>/dev/null || true)" != "$stamp_hash" ]] \
    || ! "$venv/bin/python" -c 'import tritonclient.grpc, paho.mqtt.client' >/dev/null 2>&1 \
    || ! "$mlserver/bin/python" -c 'import mlserver, onnxruntime' >/dev/null 2>&1; then
    echo "clients.sh: installing tritonclient into $venv, MLServer into $mlserver and tensorflow-serving-api into $tfs" >&2
    rm -rf "$venv" "$mlserver" "$tfs"
    pip_install() { "$1/bin/python" -m pip install --disable-pip-version-check --no-input -q "${@:2}" >&2; }
    "${EDGE_PYTHON:-python3}" -m venv "$venv" >&2
    pip_install "$venv" -r "$requirements"
    "${EDGE_PYTHON:-python3}" -m venv "$mlserver" >&2
    pip_install "$mlserver" -r "$mlserver_requirements"
    # shellcheck disable=SC2086
    pip_install "$venv" --no-deps --target "$tfs" $tfs_pins
    echo "$stamp_hash" > "$cache/.clients.sha256"
fi
echo "EDGE_TRITON_PYTHON=$venv/bin/python"
echo "EDGE_MQTT_PYTHON=$venv/bin/python"
echo "EDGE_TFS_PYTHON=$cache/venv/bin/python"
echo "EDGE_TFS_PYTHONPATH=$tfs"
echo "EDGE_MLSERVER_PYTHON=$mlserver/bin/python"
