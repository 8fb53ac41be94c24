#!/usr/bin/env bash
# Paired comparison of two builds of edge-convert on one bundle, for machines whose speed
# drifts (shared VMs: Inception V3 at 1 thread swings 1.5x within minutes): the two binaries
# run `edge-convert profile` one right after the other, which goes first alternating, and the
# result is the median of the per-pair ratios B/A (whole model and per operator kind), not a
# ratio of medians taken minutes apart.
#
#   scripts/ab-profile.sh OLD/edge-convert NEW/edge-convert BUNDLE [PAIRS] [-- PROFILE ARGS...]
#
# Extra arguments after `--` go to both profiles (e.g. `--setting EDGE_KERNELS=gemm`, `--threads 2`).
set -euo pipefail

if [[ $# -lt 3 ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
a=$1 b=$2 bundle=$3
pairs=${4:-16}
shift $(( $# >= 4 ? 4 : 3 ))
[[ ${1:-} == -- ]] && shift
for bin in "$a" "$b"; do
    [[ -x $bin ]] || { echo "ab-profile: $bin is not an executable" >&2; exit 2; }
done
[[ -f $bundle ]] || { echo "ab-profile: no bundle at $bundle" >&2; exit 2; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for i in $(seq 1 "$pairs"); do
    if (( i % 2 )); then order=(a b); else order=(b a); fi
    for side in "${order[@]}"; do
        bin=$a; [[ $side == b ]] && bin=$b
        "$bin" profile "$bundle" -q --runs 5 --json --top 1000 "$@" > "$out/$side-$i.json"
    done
done

python3 - "$out" "$pairs" <<'PY'
import collections, json, statistics, sys

out, pairs = sys.argv[1], int(sys.argv[2])

def kind(node):
    info = node["info"]
    for word, name in (("Winograd", "Winograd"), ("shifted", "shifted products"), ("im2col", "im2col")):
        if word in info:
            return f"{node['op']} ({name})"
    return node["op"]

whole, kinds = [], collections.defaultdict(list)
for i in range(1, pairs + 1):
    a, b = (json.load(open(f"{out}/{side}-{i}.json"))["profile"] for side in "ab")
    whole.append(b["total_ms"] / a["total_ms"])
    ka, kb = collections.Counter(), collections.Counter()
    for n in a["nodes"]:
        ka[kind(n)] += n["ms"]
    for n in b["nodes"]:
        kb[kind(n)] += n["ms"]
    for k, ms in ka.items():
        if ms > 0.2 and k in kb:
            kinds[k].append(kb[k] / ms)

whole.sort()
q = lambda f: whole[min(len(whole) - 1, int(f * len(whole)))]
print(f"{pairs} pairs: B/A whole model median {statistics.median(whole):.3f} "
      f"(quartiles {q(0.25):.3f} {q(0.75):.3f})")
for k, r in sorted(kinds.items()):
    print(f"  {k:<32} {statistics.median(r):.3f}")
PY
