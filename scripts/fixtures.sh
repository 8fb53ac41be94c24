#!/usr/bin/env bash
# Build (or reuse) the seeded Inception V3 test fixtures and print their directory.
#
# The fixtures are large generated models (seeded weights, NOT a real classifier), so they
# live in a cache outside git:
#   ${EDGE_CACHE_DIR:-$HOME/.cache/edge-fleet}/venv            Python venv (pinned tools)
#   ${EDGE_CACHE_DIR:-$HOME/.cache/edge-fleet}/fixtures/<key>  one fixture set per key
# key = sha256 of scripts/fixtures.py, scripts/requirements-fixtures.txt and the input
# photos, truncated to 16 hex digits. A fixture dir appears only by an atomic rename of a
# finished build, so an interrupted run never leaves a half fixture dir; a cached run prints
# the path without starting Python.
#
# stdout: exactly one line, the absolute fixture directory. Everything else goes to stderr.
#
# Environment:
#   EDGE_CACHE_DIR   cache root (default $HOME/.cache/edge-fleet)
#   EDGE_SHARED_DIR  folder holding models/coffee.jpg and models/camera.jpg
#                    (default: the shared/ folder beside the repository)
#   EDGE_PYTHON      interpreter used to create the venv (default python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
repo="$(dirname "$here")"
script="$here/fixtures.py"
requirements="$here/requirements-fixtures.txt"
shared="${EDGE_SHARED_DIR:-$(dirname "$repo")/shared}"
photos="$shared/models"

die() {
    echo "fixtures.sh: $*" >&2
    exit 1
}

for photo in coffee.jpg camera.jpg; do
    [[ -f "$photos/$photo" ]] || die "missing $photos/$photo (set EDGE_SHARED_DIR)"
done

cache="${EDGE_CACHE_DIR:-$HOME/.cache/edge-fleet}"
mkdir -p "$cache/fixtures"
cache="$(cd "$cache" && pwd -P)"

key="$(cat "$script" "$requirements" "$photos/coffee.jpg" "$photos/camera.jpg" \
    | sha256sum | cut -c1-16)"
final="$cache/fixtures/$key"

# Fast path: a finished fixture dir (it only ever appears complete).
if [[ -f "$final/fixtures.json" ]]; then
    echo "$final"
    exit 0
fi

# Slow path, one builder at a time (parallel test processes may all ask at once).
exec 9>"$cache/fixtures.lock"
if ! flock -n 9; then
    echo "fixtures.sh: another build holds $cache/fixtures.lock, waiting" >&2
    flock 9
fi
if [[ -f "$final/fixtures.json" ]]; then
    echo "$final"
    exit 0
fi

# Python venv, reinstalled only when the requirements change.
venv="$cache/venv"
python="$venv/bin/python"
stamp="$venv/.requirements.sha256"
req_hash="$(sha256sum "$requirements" | cut -c1-64)"
if ! "$python" -c '' >/dev/null 2>&1; then
    echo "fixtures.sh: creating venv $venv" >&2
    rm -rf "$venv"
    "${EDGE_PYTHON:-python3}" -m venv "$venv" >&2
fi
if [[ "$(cat "$stamp" 2>/dev/null || true)" != "$req_hash" ]]; then
    echo "fixtures.sh: installing $requirements into $venv" >&2
    "$python" -m pip install --disable-pip-version-check --no-input -q \
        -r "$requirements" >&2
    echo "$req_hash" >"$stamp"
fi

# Build into a temp dir beside the final one, then rename it into place.
rm -rf "$cache/fixtures/.tmp-"* "$final"
tmp="$(mktemp -d "$cache/fixtures/.tmp-$key.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fixtures.sh: building fixtures $key (a few minutes)" >&2
start=$SECONDS
TF_CPP_MIN_LOG_LEVEL=2 PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1 \
    "$python" "$script" --photos-dir "$photos" "$tmp" >&2
[[ -f "$tmp/fixtures.json" ]] || die "fixtures.py finished without writing fixtures.json"
chmod -R a+rX "$tmp"
mv -T "$tmp" "$final"
trap - EXIT
echo "fixtures.sh: built $final in $((SECONDS - start))s" >&2
echo "$final"
