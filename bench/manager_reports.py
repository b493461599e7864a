#!/usr/bin/env python3
"""Simulated nodes reporting to a `castnode manager`, and what it costs the manager.

Registers N nodes over HTTP (10 regions; every tenth an origin; each reports 20 broadcasts),
then sends each node's load report once per second, spread evenly over the second, from a few
threads: as UDP heartbeats signed with the cluster token (`--udp`, what nodes do), or as HTTP
PUTs on keep-alive connections. Over the measuring window it reads the manager's CPU time from
/proc/PID/stat and prints: reports per second achieved, report latency p50/p99, and the manager's
CPU in cores. Run a release `castnode manager` first (see BENCHMARKS.md).

    python3 bench/manager_reports.py --port 25090 --token TOKEN --pid PID --nodes 1000
"""

import argparse
import hashlib
import hmac
import http.client
import json
import os
import socket
import struct
import threading
import time


def proc_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def node_info(i):
    host = f"10.0.{i // 250}.{i % 250}"
    return {
        "id": f"node-{i}",
        "role": "origin" if i % 10 == 0 else "edge",
        "region": f"r{i % 10}",
        "addresses": {
            "rtmp": f"rtmp://{host}:1935",
            "http": f"http://{host}:8080",
            "cluster": f"{host}:4443",
        },
        "capacity": 1_000_000,
    }


def load_report(i, broadcasts=20):
    return json.dumps(
        {
            "cpu": 0.5,
            "memory": 100 << 20,
            "bandwidth_in": 1e6,
            "bandwidth_out": 5e7,
            "connections": 200,
            "viewers": 200,
            "broadcasts": [
                {"name": f"live/{(i + b) % 200}", "viewers": 10, "publishing": i % 10 == 0}
                for b in range(broadcasts)
            ],
        }
    ).encode()


def heartbeat(token, node, seq, body, answer):
    """A UDP heartbeat datagram (src/manager/heartbeat.rs)."""
    nid = node.encode()
    msg = b"CNH1" + bytes([4 if answer else 1]) + struct.pack(">Q", seq) + bytes([len(nid)]) + nid + body
    return msg + hmac.new(token.encode(), msg, hashlib.sha256).digest()


def udp_worker(args, nodes, stop, lat, counts, errors):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", args.port))
    sock.settimeout(0.05)
    bodies = {i: load_report(i, args.broadcasts) for i in nodes}
    sent = 0
    for i in paced(nodes, stop):
        seq = time.time_ns() // 1000
        answer = sent % 10 == 0
        sent += 1
        t = time.monotonic()
        sock.send(heartbeat(args.token, f"node-{i}", seq, bodies[i], answer))
        if answer:
            try:
                sock.recv(512)
                lat.append(time.monotonic() - t)
            except OSError as e:
                errors.append(str(e))
        counts[0] += 1


def paced(nodes, stop):
    """Yields the nodes in turn, spread evenly so each comes once a second, until `stop`."""
    step = 1.0 / len(nodes)
    nxt = time.monotonic()
    while not stop.is_set():
        for i in nodes:
            now = time.monotonic()
            if nxt > now:
                time.sleep(nxt - now)
            nxt += step
            if stop.is_set():
                return
            yield i


def worker(args, nodes, stop, lat, counts, errors):
    conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=5)
    headers = {"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"}
    bodies = {i: load_report(i, args.broadcasts) for i in nodes}
    for i in paced(nodes, stop):
        t = time.monotonic()
        try:
            if args.healthz:
                conn.request("GET", "/healthz")
            else:
                conn.request("PUT", f"/api/v1/nodes/node-{i}/load", bodies[i], headers)
            r = conn.getresponse()
            r.read()
            if r.status not in (200, 204):
                errors.append(r.status)
        except Exception as e:  # noqa: BLE001 - any failure counts, then reconnect
            errors.append(str(e))
            conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=5)
            continue
        lat.append(time.monotonic() - t)
        counts[0] += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token", required=True, help="the cluster token")
    ap.add_argument("--pid", type=int, required=True, help="the manager's process id")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--broadcasts", type=int, default=20, help="broadcasts in each report")
    ap.add_argument(
        "--udp",
        action="store_true",
        help="report as UDP heartbeats, as nodes do (every tenth asks for an answer; latency is of those)",
    )
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument(
        "--healthz",
        action="store_true",
        help="send GET /healthz at the same rate instead (the HTTP floor, for comparison)",
    )
    args = ap.parse_args()

    conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=5)
    headers = {"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"}
    for i in range(args.nodes):
        conn.request("POST", "/api/v1/nodes", json.dumps(node_info(i)).encode(), headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 204, r.status

    stop = threading.Event()
    lat, counts, errors = [], [0], []
    threads = []
    for t in range(args.threads):
        mine = list(range(t, args.nodes, args.threads))
        target = udp_worker if args.udp else worker
        th = threading.Thread(target=target, args=(args, mine, stop, lat, counts, errors))
        th.start()
        threads.append(th)
    time.sleep(args.warmup)
    lat.clear()
    c0, t0, cpu0 = counts[0], time.monotonic(), proc_ticks(args.pid)
    time.sleep(args.duration)
    c1, t1, cpu1 = counts[0], time.monotonic(), proc_ticks(args.pid)
    stop.set()
    for th in threads:
        th.join()
    window = t1 - t0
    hz = os.sysconf("SC_CLK_TCK")
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "transport": "udp" if args.udp else ("http /healthz" if args.healthz else "http"),
                "window_s": round(window, 1),
                "reports_per_s": round((c1 - c0) / window, 1),
                "latency_ms": {"p50": round(pct(0.5), 2), "p99": round(pct(0.99), 2)},
                "manager_cpu_cores": round((cpu1 - cpu0) / hz / window, 4),
                "errors": len(errors),
                "first_errors": [str(e) for e in errors[:3]],
            }
        )
    )


if __name__ == "__main__":
    main()
