#!/usr/bin/env python3
"""Added latency of ABR ladder rungs against the source, at the same node (BENCHMARKS.md,
"Rendition latency").

Reads the source and each rung of one broadcast over HTTP-FLV at once, for SECONDS, and stamps
every video tag with its arrival time (this machine's monotonic clock). A rung's frame and the
source's frame with the same timestamp are the same picture: the difference of their arrival
times is what the ladder added (decode, scale, encode, and the rung's extra trip through the
hub). Frames are matched by presentation time (a source with B-frames sends them in decode
order). Two figures per rung: against the arrival of the source's frame (a P-frame of a source
with B-frames arrives frames before its turn to be shown, so this counts the source's reorder
delay too), and against when the source's picture could first be shown (every picture before it
in presentation order arrived), what a viewer switching between the two would see. The first
second of each read (a burst from the start of a group) is left out. Prints p50/p95/max per rung in milliseconds, and the frame interval for scale.

usage: rendition_latency.py BASE_FLV_URL SECONDS RUNG [RUNG ...]
  e.g. rendition_latency.py http://127.0.0.1:18380/live/l.flv 20 720p 480p 360p 240p
"""

import sys
import threading
import time
import urllib.request


def read_flv(url, seconds, out):
    """Appends (presentation time ms, arrival s) of every video frame of `url` to `out` for `seconds`."""
    end = time.monotonic() + seconds
    with urllib.request.urlopen(url, timeout=10) as r:
        buf = b""

        def need(n):
            nonlocal buf
            while len(buf) < n:
                chunk = r.read1(65536)
                if not chunk:
                    raise EOFError
                buf += chunk

        need(13)  # FLV header (9) + PreviousTagSize0 (4)
        buf = buf[13:]
        while time.monotonic() < end:
            need(11)
            kind = buf[0]
            size = int.from_bytes(buf[1:4], "big")
            ts = int.from_bytes(buf[4:7], "big") | (buf[7] << 24)
            need(11 + size + 4)
            arrived = time.monotonic()
            # Video tags that carry a frame (AVC packet type 1), not the sequence header; the
            # tag's timestamp is the decode time, plus the composition offset the picture's.
            if kind == 9 and size > 4 and buf[12] == 1:
                cts = int.from_bytes(buf[13:16], "big", signed=True)
                out.append((ts + cts, arrived))
            buf = buf[11 + size + 4 :]


def percentile(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    base, seconds, rungs = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    reads = {"source": []}
    reads.update({r: [] for r in rungs})
    threads = []
    for name, out in reads.items():
        url = base if name == "source" else f"{base}?rendition={name}"
        t = threading.Thread(target=read_flv, args=(url, seconds, out), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(seconds + 15)
    # The first timestamp seen twice is kept (a repeat would be a bug elsewhere).
    source = {}
    for ts, at in reads["source"]:
        source.setdefault(ts, at)
    stamps = sorted(source)
    interval = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    # When each source picture could be shown: a player shows pictures in presentation order,
    # so not before every picture ahead of it arrived. With B-frames a P-frame arrives two or
    # three frames before its turn; a rung (no B-frames) cannot have it before its turn either.
    ready, latest = {}, float("-inf")
    for ts in stamps:
        latest = max(latest, source[ts])
        ready[ts] = latest
    print(f"source: {len(stamps)} frames, frame interval {interval:.1f} ms")
    for name in rungs:
        # Frames of the first second arrive as a burst from the group's start: left out.
        start = reads[name][0][1] + 1.0 if reads[name] else 0
        common = [(ts, at) for ts, at in reads[name] if ts in source and at >= start]
        if not common:
            print(f"{name}: no frame in common with the source")
            continue
        arrival = [(at - source[ts]) * 1000 for ts, at in common]
        shown = [(at - ready[ts]) * 1000 for ts, at in common]
        print(
            f"{name}: {len(common)} frames; against the source frame's arrival p50 "
            f"{percentile(arrival, 50):.1f} ms, p95 {percentile(arrival, 95):.1f} ms; against "
            f"when the source picture could be shown p50 {percentile(shown, 50):.1f} ms, p95 "
            f"{percentile(shown, 95):.1f} ms, max {max(shown):.1f} ms"
        )

if __name__ == "__main__":
    main()
