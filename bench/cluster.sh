#!/usr/bin/env bash
# Cluster-link load: starts a castnode origin and a relay on loopback, then castnode-load with
# simulated edges that pull from the relay (see src/bin/castnode-load/cluster.rs), and prints its
# report. The relay's CPU is sampled (--server-pid), its /metrics read, and one reference link
# subscribes every broadcast at the origin to time the relay's hop frame by frame.
#
# Usage: bench/cluster.sh EDGES BROADCASTS FIXTURE [DURATION] [-- castnode-load args…]
#   EDGES       simulated edges (each its own QUIC connection to the relay)
#   BROADCASTS  broadcasts published to the origin; edge k mod EDGES takes broadcast k mod
#               BROADCASTS
#   FIXTURE     FLV file each publisher loops in real time
#   DURATION    seconds of the measuring window [default: 30]
# Environment (optional):
#   WARMUP=5 CONNECT_RATE=200 THREADS=1 LAG_LIMIT_MS=150   passed to castnode-load
#   REFERENCE=1                 0: no reference link (it doubles the origin's sends and what the
#                               tool receives)
#   CARGO_TARGET_DIR                                        where the release build is [target]
#   BIN=DIR            run castnode and castnode-load from DIR, without building (A/B runs)
#   OUT=DIR                                                 where the report and logs go [mktemp]
# Ports: origin RTMP 39350, HTTP 38080, cluster 34443; relay HTTP 38081, cluster 34444. The
# servers are stopped (by PID) when the script exits, however it exits.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EDGES=${1:?usage: bench/cluster.sh EDGES BROADCASTS FIXTURE [DURATION]}
BROADCASTS=${2:?usage: bench/cluster.sh EDGES BROADCASTS FIXTURE [DURATION]}
FIXTURE=${3:?usage: bench/cluster.sh EDGES BROADCASTS FIXTURE [DURATION]}
DUR=${4:-30}
shift $(( $# < 4 ? $# : 4 ))
[ "${1:-}" = "--" ] && shift
WARMUP=${WARMUP:-5}
CONNECT_RATE=${CONNECT_RATE:-200}
THREADS=${THREADS:-1}
LAG_LIMIT_MS=${LAG_LIMIT_MS:-150}
TOKEN=castnode-bench-cluster-token
REFERENCE=${REFERENCE:-1}
BIN=${BIN:-}

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ -z "$BIN" ]; then
    cargo build --release --locked --bins
    BIN=${CARGO_TARGET_DIR:-target}/release
fi
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/castnode-cluster.XXXXXX")}
mkdir -p "$OUT"
echo "cluster.sh: $EDGES edges, $BROADCASTS broadcasts of $FIXTURE, ${DUR} s window; logs in $OUT" >&2

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT

"$BIN/castnode" origin --cluster-token "$TOKEN" --rtmp 127.0.0.1:39350 --http 127.0.0.1:38080 \
    --webrtc-udp 127.0.0.1:0 --cluster 127.0.0.1:34443 >"$OUT/origin.log" 2>&1 &
ORIGIN=$!
PIDS+=("$ORIGIN")
"$BIN/castnode" relay --upstream 127.0.0.1:34443 --cluster-token "$TOKEN" \
    --http 127.0.0.1:38081 --cluster 127.0.0.1:34444 >"$OUT/relay.log" 2>&1 &
RELAY=$!
PIDS+=("$RELAY")
for port in 38080 38081; do
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$port/metrics" >/dev/null && break
        sleep 0.1
    done
done

REF_ARGS=()
[ "$REFERENCE" = 1 ] && REF_ARGS=(--reference 127.0.0.1:34443)
"$BIN/castnode-load" --protocol cluster --rtmp-url rtmp://127.0.0.1:39350/live/bench \
    --fixture "$FIXTURE" --edges "$EDGES" --broadcasts "$BROADCASTS" \
    --relay 127.0.0.1:34444 --relay-metrics http://127.0.0.1:38081/metrics \
    ${REF_ARGS[@]+"${REF_ARGS[@]}"} --cluster-token "$TOKEN" \
    --server-pid "$RELAY" --origin-pid "$ORIGIN" \
    --duration "$DUR" --warmup "$WARMUP" --connect-rate "$CONNECT_RATE" --threads "$THREADS" \
    --lag-limit-ms "$LAG_LIMIT_MS" "$@" | tee "$OUT/report.txt"
