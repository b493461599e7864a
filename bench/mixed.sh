#!/usr/bin/env bash
# N RTMP players and N HTTP-FLV players of castnode at once: two castnode-load processes against
# one server, each publishing its own copy of fixtures/bench-720p.flv (so two publishers), and
# prints both reports. The server's CPU in each report is the whole server's, for 2×N players.
#
# Usage: bench/mixed.sh N [DURATION]
# Environment (optional): WARMUP=8 CONNECT_RATE=500 OUT=DIR
# Ports: RTMP 29350, HTTP 28080. The server is stopped (by PID) when the script exits.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${1:?usage: bench/mixed.sh N [DURATION]}
DUR=${2:-30}
WARMUP=${WARMUP:-8}
CONNECT_RATE=${CONNECT_RATE:-500}
FIXTURE=fixtures/bench-720p.flv
command -v jq >/dev/null || { echo "mixed.sh: jq not found" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ -e "$FIXTURE" ] || bash fixtures/make.sh
cargo build --release --locked
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/castnode-mixed.XXXXXX")}
mkdir -p "$OUT"
echo "mixed.sh: $N RTMP + $N HTTP-FLV players, ${DUR} s window; reports in $OUT"

./target/release/castnode standalone --rtmp 127.0.0.1:29350 --http 127.0.0.1:28080 >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    [ -n "$(ss -Hltn 'sport = :28080' 2>/dev/null)" ] && break
    sleep 0.1
done

load() { # PROTOCOL KEY extra-args...
    local proto=$1 key=$2
    shift 2
    ./target/release/castnode-load --players "$N" --duration "$DUR" --warmup "$WARMUP" \
        --connect-rate "$CONNECT_RATE" --threads 1 --fixture "$FIXTURE" --server-pid "$SERVER_PID" \
        --json --protocol "$proto" --rtmp-url "rtmp://127.0.0.1:29350/live/$key" "$@" \
        >"$OUT/$proto.json" 2>"$OUT/$proto.log"
}
load rtmp a &
A=$!
load flv b --flv-url http://127.0.0.1:28080/live/b.flv &
B=$!
wait "$A" "$B"
for p in rtmp flv; do
    echo "$p: $(jq -c '{keeping_up: .players.keeping_up, connected: .players.connected, lag_ms: (.lag_ms | {p50, p99, max}), received_kbps_min: .received_kbps.min, server_cpu_cores: .server.cpu_cores, server_rss_kib: (.server | [.rss_before_kib, .rss_after_kib]), load_tool_cpu_cores, machine_busy: .machine_cpu_cores}' "$OUT/$p.json")"
done
