"""Dashboards polling a live campaign funnel while events arrive.

    python3 benches/poll_load.py URL SERVER_PID CAMPAIGN SECONDS

Phase 1: ~1,000 events/s (10 requests/s of 100 events: new users walking the campaign's
steps, ts = now) for SECONDS, no pollers. Phase 2: the same ingest plus 20 dashboards,
each GETting /v1/campaigns/CAMPAIGN/funnel every 2 s (staggered), for SECONDS. Prints one
JSON line per phase: ingest ack p50/p99, poll p50/p99/max, and the server's RSS; then a
check that the live answer's counts equal a scan's (a `to` far in the future makes the
same question one the live funnel does not keep).
"""

import http.client
import json
import sys
import threading
import time
import urllib.parse

url, pid, campaign, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
host = urllib.parse.urlparse(url).netloc
STEPS = ["package", "scan", "view", "draw"]
CHANNELS = ["jd", "tmall", "douyin", "offline"]


def rss_mb():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024


def q(xs, p):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1000, 2) if xs else None


def iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%06dZ" % int((t % 1) * 1e6)


def ingest(stop, acks, tag):
    conn = http.client.HTTPConnection(host, timeout=30)
    n, tick = 0, time.perf_counter()
    while not stop.is_set():
        now = time.time()
        events = []
        for i in range(100):
            user, step = (n + i) // 4, (n + i) % 4
            events.append({"event_id": f"{tag}-{n + i}", "event": STEPS[step],
                           "user_id": f"{tag}-u{user}", "campaign": campaign,
                           "channel": CHANNELS[user % 4], "ts": iso(now + step * 1e-3)})
        n += 100
        body = "\n".join(json.dumps(e) for e in events)
        started = time.perf_counter()
        conn.request("POST", "/v1/events", body, {"Content-Type": "application/x-ndjson"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        acks.append(time.perf_counter() - started)
        tick += 0.1
        time.sleep(max(0.0, tick - time.perf_counter()))


def dashboard(stop, polls, offset):
    conn = http.client.HTTPConnection(host, timeout=60)
    time.sleep(offset)
    tick = time.perf_counter()
    while not stop.is_set():
        started = time.perf_counter()
        conn.request("GET", f"/v1/campaigns/{campaign}/funnel?_={time.time()}")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        polls.append(time.perf_counter() - started)
        tick += 2.0
        time.sleep(max(0.0, tick - time.perf_counter()))


def phase(name, dashboards):
    stop, acks, polls = threading.Event(), [], []
    threads = [threading.Thread(target=ingest, args=(stop, acks, f"{name}-{time.time():.0f}"))]
    threads += [threading.Thread(target=dashboard, args=(stop, polls, d * 2.0 / max(dashboards, 1)))
                for d in range(dashboards)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    print(json.dumps({"phase": name, "dashboards": dashboards, "seconds": seconds,
                      "events": len(acks) * 100, "ack_p50_ms": q(acks, 0.5), "ack_p99_ms": q(acks, 0.99),
                      "polls": len(polls), "poll_p50_ms": q(polls, 0.5), "poll_p99_ms": q(polls, 0.99),
                      "poll_max_ms": q(polls, 1.0), "rss_mb": rss_mb()}), flush=True)


def get(path, body=None):
    conn = http.client.HTTPConnection(host, timeout=600)
    started = time.perf_counter()
    conn.request("POST" if body else "GET", path, json.dumps(body) if body else None,
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    assert resp.status == 200, out
    return out, time.perf_counter() - started


phase("without pollers", 0)
phase("with 20 pollers", 20)
time.sleep(1.5)
live, live_s = get(f"/v1/campaigns/{campaign}/funnel")
info, _ = get("/v1/campaigns")
c = next(c for c in info["campaigns"] if c["name"] == campaign)
scan, scan_s = get("/v1/funnel", {"campaign": campaign, "steps": c["steps"], "window": c["window"],
                                  "to": "2100-01-01T00:00:00Z", "breakdown": "channel"})
print(json.dumps({"check": "live counts == scan counts",
                  "equal": live["total"]["counts"] == scan["total"]["counts"]
                  and all(g["counts"] == h["counts"] for g, h in zip(live["groups"], scan["groups"])),
                  "counts": live["total"]["counts"], "live_ms": round(live_s * 1000, 1),
                  "scan_ms": round(scan_s * 1000, 1)}), flush=True)
