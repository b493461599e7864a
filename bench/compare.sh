#!/usr/bin/env bash
# Serves N players of one 720p stream (fixtures/bench-720p.flv, ~2.6 Mbit/s) from castnode and
# from nginx-rtmp, one server at a time, and prints castnode-load's reports side by side:
#   1. castnode, RTMP players      2. castnode, HTTP-FLV players      3. nginx-rtmp, RTMP players
#
# Usage: bench/compare.sh N [DURATION]
#   N         players per run
#   DURATION  seconds of each measuring window [default: 30]
# Environment (optional):
#   WARMUP=5 CONNECT_RATE=500 THREADS=1 LAG_LIMIT_MS=150   passed to castnode-load
#   NGINX_WORKERS=1                                         nginx worker_processes
#   OUT=DIR                                                 where reports and logs go [mktemp]
#
# Needs: cargo, ffmpeg (to make the fixture if missing), jq, and
#   apt-get install -y --no-install-recommends nginx libnginx-mod-rtmp
# Ports: castnode RTMP 29350, HTTP 28080; nginx RTMP 29351. The servers are started here and
# stopped (by PID) when the script exits, however it exits.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

N=${1:?usage: bench/compare.sh N [DURATION]}
DUR=${2:-30}
WARMUP=${WARMUP:-5}
CONNECT_RATE=${CONNECT_RATE:-500}
THREADS=${THREADS:-1}
LAG_LIMIT_MS=${LAG_LIMIT_MS:-150}
NGINX_WORKERS=${NGINX_WORKERS:-1}
CN_RTMP=29350
CN_HTTP=28080
NG_RTMP=29351
FIXTURE=fixtures/bench-720p.flv

for tool in cargo jq nginx; do
    command -v "$tool" >/dev/null || { echo "compare.sh: $tool not found" >&2; exit 1; }
done
[ -e /usr/lib/nginx/modules/ngx_rtmp_module.so ] || {
    echo "compare.sh: nginx's RTMP module is missing (apt-get install libnginx-mod-rtmp)" >&2
    exit 1
}

# Every player is a socket in the load tool and one in the server.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((N + 256)) ]; then
    echo "compare.sh: warning: open-files limit $(ulimit -n) is too low for $N players" >&2
fi

[ -e "$FIXTURE" ] || bash fixtures/make.sh
cargo build --release --locked
LOAD=$ROOT/target/release/castnode-load
CASTNODE=$ROOT/target/release/castnode

OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/castnode-compare.XXXXXX")}
mkdir -p "$OUT"
echo "compare.sh: $N players, ${DUR} s windows; reports and logs in $OUT"

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
trap stop_server EXIT
trap 'exit 130' INT TERM

port_busy() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

wait_port() {
    for _ in $(seq 100); do
        port_busy "$1" && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "compare.sh: the server exited" >&2; return 1; }
        sleep 0.1
    done
    echo "compare.sh: nothing listens on port $1" >&2
    return 1
}

start_castnode() { # NAME
    for p in $CN_RTMP $CN_HTTP; do
        if port_busy "$p"; then echo "compare.sh: port $p is in use" >&2; exit 1; fi
    done
    "$CASTNODE" standalone --rtmp "127.0.0.1:$CN_RTMP" --http "127.0.0.1:$CN_HTTP" >"$OUT/$1.server.log" 2>&1 &
    SERVER_PID=$!
    wait_port $CN_RTMP
    wait_port $CN_HTTP
}

start_nginx() { # NAME
    if port_busy $NG_RTMP; then echo "compare.sh: port $NG_RTMP is in use" >&2; exit 1; fi
    local prefix=$OUT/nginx
    mkdir -p "$prefix/logs"
    nginx -p "$prefix" -c "$ROOT/bench/nginx-rtmp.conf" -e "$prefix/logs/error.log" \
        -g "daemon off; worker_processes $NGINX_WORKERS;" >"$OUT/$1.server.log" 2>&1 &
    SERVER_PID=$!
    wait_port $NG_RTMP
}

run_load() { # NAME castnode-load-args...
    local name=$1
    shift
    echo
    echo "== $name"
    "$LOAD" --players "$N" --duration "$DUR" --warmup "$WARMUP" --connect-rate "$CONNECT_RATE" \
        --threads "$THREADS" --lag-limit-ms "$LAG_LIMIT_MS" --fixture "$FIXTURE" \
        --server-pid "$SERVER_PID" --json "$@" >"$OUT/$name.json"
    jq -c '{players, lag_ms: (.lag_ms | {p50, p99, max}), server: (.server | {cpu_cores}), load_tool_cpu_cores}' \
        "$OUT/$name.json"
}

start_castnode castnode-rtmp
run_load castnode-rtmp --protocol rtmp --rtmp-url "rtmp://127.0.0.1:$CN_RTMP/live/bench"
stop_server

start_castnode castnode-flv
run_load castnode-flv --protocol flv --rtmp-url "rtmp://127.0.0.1:$CN_RTMP/live/bench" \
    --flv-url "http://127.0.0.1:$CN_HTTP/live/bench.flv"
stop_server

start_nginx nginx-rtmp
run_load nginx-rtmp --protocol rtmp --rtmp-url "rtmp://127.0.0.1:$NG_RTMP/live/bench"
stop_server

RUNS=(castnode-rtmp castnode-flv nginx-rtmp)
row() { # LABEL JQ-EXPRESSION
    printf '%-30s' "$1"
    for r in "${RUNS[@]}"; do
        printf ' %22s' "$(jq -r "($2) // \"-\" | tostring" "$OUT/$r.json")"
    done
    echo
}
echo
echo "== $N players, ${DUR} s window, ${WARMUP} s warmup, fixture $FIXTURE ($(nproc) CPUs)"
printf '%-30s' ""
for r in "${RUNS[@]}"; do printf ' %22s' "$r"; done
echo
row "players connected" '.players.connected'
row "players keeping up" '.players.keeping_up'
row "players disconnected" '.players.disconnected'
row "players failed" '.players.failed'
row "published kbit/s" '.published_kbps'
row "publisher late max ms" '.publisher_late_max_ms'
row "received kbit/s min/p50/mean" '.received_kbps | "\(.min|round)/\(.p50|round)/\(.mean|round)"'
row "video fps per player" '.video_fps_mean'
row "lag ms p50/p95" '.lag_ms | "\(.p50)/\(.p95)"'
row "lag ms p99/max" '.lag_ms | "\(.p99)/\(.max)"'
row "lag method abs/calibrated" '.lag_ms | "\(.players_absolute)/\(.players_calibrated)"'
row "server CPU cores" '.server.cpu_cores'
row "server CPU us/player/s" '.server.cpu_us_per_player_s'
row "server RSS before/after MiB" '.server | "\(.rss_before_kib/1024|round)/\(.rss_after_kib/1024|round)"'
row "server KiB/player" '.server.kib_per_player'
row "load tool CPU cores" '.load_tool_cpu_cores'
row "machine busy cores (all)" '"\(.machine_cpu_cores) of \(.machine_cpus)"'
row "errors" '[.errors[] | "\(.players)x \(.error)"] | join("; ") | if . == "" then "none" else . end'
