"""The live dashboard in headless Chromium against a server with known data: the numbers
shown equal the API's, Chinese and English channel names render, the bottleneck and
alerts are shown, and a poll after new events shows them. Screenshots are saved."""

import datetime
import json
import pathlib
import subprocess
import time

import requests

from conftest import HERE

STEPS = ["scan", "view", "draw"]


def iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def events(prefix, channel, n, depth, minutes_ago):
    now = datetime.datetime.now(datetime.timezone.utc)
    out = []
    for u in range(n):
        for i, step in enumerate(STEPS[:depth]):
            out.append({"event_id": f"{prefix}-{u}-{step}", "event": step, "user_id": f"{prefix}-{u}",
                        "campaign": "parcel-lottery", "channel": channel,
                        "ts": iso(now - datetime.timedelta(minutes=minutes_ago) + datetime.timedelta(seconds=i))})
    return out


def config():
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"""
[[campaigns]]
name = "parcel-lottery"
start = "{iso(now - datetime.timedelta(days=1))}"
end = "{iso(now + datetime.timedelta(days=1))}"
[campaigns.funnel]
steps = ["scan", "view", "draw"]
window = "1h"
[campaigns.targets.jd]
scan = 20
view = 10
draw = 5
[campaigns.targets."京东"]
scan = 10
view = 5
draw = 3
[[campaigns.alerts]]
step = "view"
min_step_conversion = 0.5
over = "1h"
min_users = 3
"""


def post(server, evs):
    r = requests.post(server.url + "/v1/events", json=evs, timeout=30)
    assert r.status_code == 200 and not r.json()["rejected"], r.text


def test_dashboard_shows_the_api_numbers_and_refreshes(start_server, output_dir):
    server = start_server(config())
    # jd: 10 scan, 8 view, 4 draw. 京东: 6 scan, 2 view (view is its bottleneck and it fires).
    post(server, events("j", "jd", 4, 3, 20) + events("j2", "jd", 4, 2, 20) + events("j3", "jd", 2, 1, 20))
    post(server, events("k", "京东", 2, 2, 20) + events("k2", "京东", 4, 1, 20))
    # The evaluator runs every 10 s: wait for it to see the 京东 view rate.
    deadline = time.time() + 30
    while not requests.get(server.url + "/v1/campaigns/parcel-lottery/alerts", timeout=30).json()["alerts"]:
        assert time.time() < deadline, "no alert fired"
        time.sleep(0.5)
    api = requests.get(server.url + "/v1/campaigns/parcel-lottery/funnel", timeout=30).json()

    shot = pathlib.Path(output_dir, "dashboard.png")
    proc = subprocess.Popen(["node", str(HERE / "dashboard.mjs"), server.url + "/", str(shot), "19"],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    post(server, events("late", "tmall", 3, 1, 5))
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err + out
    seen = json.loads(out.strip().splitlines()[-1])
    before, after = seen["before"], seen["after"]
    assert seen["errors"] == [], seen["errors"]

    # Every number the page showed is the API's, in every card.
    groups = [("", api["total"])] + [(g["value"], g) for g in api["groups"]]
    assert sorted(before["groups"]) == sorted(v for v, _ in groups)
    for value, g in groups:
        shown = before["groups"][value]
        for i, step in enumerate(STEPS):
            assert shown[step]["count"] == f"{g['counts'][i]:,}", (value, step, shown)
            if i > 0:
                assert shown[step]["rate"] == f"{g['step_conversion'][i] * 100:.1f}%", (value, step)
                assert shown[step]["pending"] == f"{g['pending'][i]:,}", (value, step)
            target = g["targets"][i]
            assert shown[step]["target"] == ("–" if target is None else f"{target:,}"), (value, step)
        assert before["bottleneck"].get(value) == STEPS[g["bottleneck"]], (value, before["bottleneck"])
    assert any("京东" in a and "view" in a for a in before["alerts"]), before["alerts"]

    # The next poll shows the new tmall users.
    assert after["groups"][""]["scan"]["count"] == "19"
    assert after["groups"]["tmall"]["scan"]["count"] == "3"
    assert after["as_of"] > before["as_of"]
    assert shot.stat().st_size > 10_000
