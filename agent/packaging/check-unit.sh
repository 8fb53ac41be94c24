#!/usr/bin/env bash
# Checks the systemd unit: `systemd-analyze verify` is clean and `systemd-analyze security
# --offline=true` rates it OK or better (exposure <= 3.0). Usage: check-unit.sh [EDGE_AGENT_BIN]
# (verify needs ExecStart's binary to exist: without an installed /usr/bin/edge-agent the
# unit is checked with ExecStart pointing at EDGE_AGENT_BIN, default the debug build in
# ${CARGO_TARGET_DIR:-target}).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
unit="$here/edge-agent.service"
bin="${1:-/usr/bin/edge-agent}"
if [[ ! -x "$bin" ]]; then
    bin="${CARGO_TARGET_DIR:-$(cd "$here/../.." && pwd -P)/target}/debug/edge-agent"
fi
[[ -x "$bin" ]] || { echo "check-unit.sh: no edge-agent binary at $bin" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sed "s|^ExecStart=/usr/bin/edge-agent|ExecStart=$bin|" "$unit" > "$work/edge-agent.service"

# verify: every warning is a failure (it prints nothing when clean). The User= need not exist.
out="$(systemd-analyze verify "$work/edge-agent.service" 2>&1 || true)"
out="$(grep -v -e 'Failed to resolve user' -e 'Cannot find user' <<<"$out" || true)"
if [[ -n "$out" ]]; then
    echo "systemd-analyze verify:" >&2
    echo "$out" >&2
    exit 1
fi
echo "systemd-analyze verify: clean"

security="$(systemd-analyze security --offline=true "$work/edge-agent.service" 2>&1)"
line="$(grep -E 'Overall exposure level' <<<"$security")"
echo "$line"
score="$(sed -E 's/.*: ([0-9.]+) .*/\1/' <<<"$line")"
if ! awk -v s="$score" 'BEGIN { exit !(s <= 3.0) }'; then
    echo "$security" >&2
    echo "check-unit.sh: exposure $score is above 3.0" >&2
    exit 1
fi
