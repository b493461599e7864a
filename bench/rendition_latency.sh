#!/usr/bin/env bash
# The latency a ladder's rungs add against the source (BENCHMARKS.md, "Added latency of a rung
# against the source"): castnode standalone --ladder default, then origin + transcoder + edge
# read at the edge, each with fixtures/bench-720p.flv pushed by ffmpeg -re, 20 s of reads by
# bench/rendition_latency.py. Ports 19561–19564, 18391–18394, 18491–18494, 18592. Env: BIN, FIXTURE.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FIX=${FIXTURE:-fixtures/bench-720p.flv}
BIN=${BIN:-target/release/castnode}
[ "$BIN" != target/release/castnode ] || cargo build --release --locked --bin castnode
[ -f "$FIX" ] || bash fixtures/make.sh
T=latency-token-0123456789abc
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null; pids=(); }
trap cleanup EXIT
push() { ffmpeg -hide_banner -nostdin -loglevel error -re -stream_loop -1 -i "$FIX" -c copy -f flv "rtmp://127.0.0.1:$1/live/l" > /dev/null 2>&1 & pids+=($!); }
echo "== standalone --ladder default"
$BIN standalone --rtmp 127.0.0.1:19561 --http 127.0.0.1:18391 --webrtc-udp 127.0.0.1:18491 --ladder default > /tmp/rl-standalone.log 2>&1 & pids+=($!)
sleep 1; push 19561; sleep 6
python3 bench/rendition_latency.py http://127.0.0.1:18391/live/l.flv 20 720p 480p 360p 240p
cleanup
echo "== origin + transcoder + edge, read at the edge"
$BIN origin --rtmp 127.0.0.1:19562 --http 127.0.0.1:18392 --webrtc-udp 127.0.0.1:18492 --cluster 127.0.0.1:18592 --cluster-token $T > /tmp/rl-origin.log 2>&1 & pids+=($!)
$BIN transcoder --http 127.0.0.1:18393 --upstream 127.0.0.1:18592 --cluster-token $T --jobs live/l > /tmp/rl-transcoder.log 2>&1 & pids+=($!)
$BIN edge --rtmp 127.0.0.1:19564 --http 127.0.0.1:18394 --webrtc-udp 127.0.0.1:18494 --upstream 127.0.0.1:18592 --cluster-token $T > /tmp/rl-edge.log 2>&1 & pids+=($!)
sleep 1; push 19562; sleep 6
python3 bench/rendition_latency.py http://127.0.0.1:18394/live/l.flv 20 720p 480p 360p 240p
