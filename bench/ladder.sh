#!/usr/bin/env bash
# CPU of the default ABR ladder on a 720p30 source: castnode standalone --ladder default (minus
# the same node without a ladder, under the same push) against one ffmpeg process doing the same
# ladder with the same x264 settings, from the same file, in the same run (BENCHMARKS.md,
# "Transcoder ladder"). Ports: RTMP 19550, HTTP 18380, WebRTC 18480. Env: BIN, FIXTURE.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FIX=${FIXTURE:-fixtures/bench-720p.flv}
BIN=${BIN:-target/release/castnode}
[ "$BIN" != target/release/castnode ] || cargo build --release --locked --bin castnode
[ -f "$FIX" ] || bash fixtures/make.sh
cpu() { # PID SECONDS: cores used over the window, after 8 s of warm-up
  sleep 8; local a b; a=$(awk '{print $14+$15}' /proc/$1/stat); sleep $2; b=$(awk '{print $14+$15}' /proc/$1/stat)
  echo "scale=3; ($b-$a)/100/$2" | bc
}
node() { # extra flags
  $BIN standalone --rtmp 127.0.0.1:19550 --http 127.0.0.1:18380 --webrtc-udp 127.0.0.1:18480 "$@" > /tmp/ladderab-node.log 2>&1 &
  local n=$!; sleep 1
  ffmpeg -hide_banner -nostdin -loglevel error -re -stream_loop -1 -i $FIX -c copy -f flv rtmp://127.0.0.1:19550/live/l > /dev/null 2>&1 &
  local p=$!
  echo "castnode $* : $(cpu $n 20) cores"
  kill $p $n; wait $p $n 2>/dev/null
}
ff() {
  local x="keyint=infinite:min-keyint=1:scenecut=0:repeat-headers=1:bframes=0"
  ffmpeg -hide_banner -nostdin -loglevel error -threads 1 -re -stream_loop -1 -i $FIX -filter_threads 1 \
    -filter_complex "[0:v]split=4[v0][v1][v2][v3];[v1]scale=854:480:flags=bilinear[s1];[v2]scale=640:360:flags=bilinear[s2];[v3]scale=426:240:flags=bilinear[s3]" \
    -map "[v0]" -c:v libx264 -threads 1 -preset veryfast -tune zerolatency -profile:v high -force_key_frames source -x264-params "$x:bitrate=2800:vbv-maxrate=2800:vbv-bufsize=2800" -f null /dev/null \
    -map "[s1]" -c:v libx264 -threads 1 -preset veryfast -tune zerolatency -profile:v high -force_key_frames source -x264-params "$x:bitrate=1400:vbv-maxrate=1400:vbv-bufsize=1400" -f null /dev/null \
    -map "[s2]" -c:v libx264 -threads 1 -preset veryfast -tune zerolatency -profile:v main -force_key_frames source -x264-params "$x:bitrate=800:vbv-maxrate=800:vbv-bufsize=800" -f null /dev/null \
    -map "[s3]" -c:v libx264 -threads 1 -preset veryfast -tune zerolatency -profile:v baseline -force_key_frames source -x264-params "$x:bitrate=400:vbv-maxrate=400:vbv-bufsize=400" -f null /dev/null &
  local f=$!
  echo "ffmpeg ladder : $(cpu $f 20) cores"
  kill $f; wait $f 2>/dev/null
}
for i in 1 2; do node --ladder default; node; ff; done
