"""Load for scan links: N GETs of /s/{campaign}/{channel}?uid=... from C keep-alive
connections on loopback; prints requests/s and p50/p99 latency of the 302, then checks
through SQL that every answered scan was stored exactly once.

    python3 benches/scan_load.py URL N C
"""

import http.client
import json
import sys
import threading
import time
import urllib.parse

url, total, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
host = urllib.parse.urlparse(url).netloc
latencies = []
lock = threading.Lock()
channels = ["jd", "tmall", "douyin", "offline"]


def worker(w):
    conn = http.client.HTTPConnection(host, timeout=30)
    mine = []
    for i in range(w, total, conns):
        started = time.perf_counter()
        conn.request("GET", f"/s/parcel-lottery/{channels[i % 4]}?uid=scan-{i}")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 302, resp.status
        mine.append(time.perf_counter() - started)
    with lock:
        latencies.extend(mine)


started = time.perf_counter()
threads = [threading.Thread(target=worker, args=(w,)) for w in range(conns)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.perf_counter() - started
latencies.sort()
q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000
body = json.dumps({"sql": "SELECT count(*), count(DISTINCT user_id) FROM events WHERE event = 'scan'"})
conn = http.client.HTTPConnection(host, timeout=30)
conn.request("POST", "/v1/sql", body, {"Content-Type": "application/json"})
stored = json.loads(conn.getresponse().read())["rows"][0]
print(json.dumps({"scans": total, "connections": conns, "per_second": round(total / elapsed),
                  "p50_ms": round(q(0.5), 2), "p99_ms": round(q(0.99), 2), "stored": stored}))
assert stored == [total, total], f"stored {stored}, answered {total}"
