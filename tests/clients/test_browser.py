"""Headless Chromium end to end: scan link -> landing page on another origin with
/sdk.js -> view -> draw; the funnel shows the user at level 3 in channel jd. Also the
SDK's retry with the same event_ids and its sendBeacon on page hide."""

import json
import pathlib
import subprocess
import time

import requests

from conftest import HERE, StaticSite

LANDING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Parcel lottery</title>
<script src="{collector}/sdk.js"></script>
<style>body{{font-family:sans-serif;max-width:30rem;margin:3rem auto}} button{{font-size:1.5rem;padding:.5rem 2rem}}</style>
</head><body>
<h1>Parcel lottery</h1>
<p id="who"></p>
<button id="draw">Draw</button>
<p id="status">loading</p>
<script>
  funnelhouse.init({{ endpoint: "{collector}", campaign: "parcel-lottery" }});
  funnelhouse.track("view", {{ page: "landing" }});
  var params = new URLSearchParams(location.search);
  document.getElementById("who").textContent =
    "Welcome, " + funnelhouse.userId() + " (channel " + params.get("fh_channel") + ")";
  document.getElementById("draw").onclick = function () {{
    funnelhouse.track("draw", {{ prize: "gold" }});
    document.getElementById("status").textContent = "You drew: gold";
  }};
  document.getElementById("status").textContent = "ready";
</script>
</body></html>
"""


def wait_for(check, timeout=10):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value or time.time() > deadline:
            return value
        time.sleep(0.1)


def test_scan_link_landing_page_sdk_and_funnel(start_server, output_dir):
    site = StaticSite({"/favicon.ico": ""})
    try:
        server = start_server(
            '[[campaigns]]\nname = "parcel-lottery"\n'
            f'landing_url = "{site.url}/landing.html"\n'
        )
        site.files["/landing.html"] = LANDING.format(collector=server.url)
        screenshot = pathlib.Path(output_dir, "browser-landing.png")
        run = subprocess.run(
            ["node", str(HERE / "browser.mjs"), server.url, str(screenshot)],
            capture_output=True, text=True, timeout=120, cwd=HERE,
        )
        assert run.returncode == 0, run.stderr + run.stdout
        seen = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        site.close()

    uid = seen["uid"]
    assert seen["landing"].startswith(f"{site.url}/landing.html?fh_uid={uid}&fh_campaign=parcel-lottery&fh_channel=jd")
    assert seen["draw_status"] == 200 and seen["draw_answer"]["accepted"] >= 1, seen
    assert seen["console_errors"] == [], seen
    assert screenshot.stat().st_size > 1000

    funnel = requests.get(server.url + "/v1/funnel", params={
        "campaign": "parcel-lottery", "steps": "scan,view,draw", "breakdown": "channel"}, timeout=30).json()
    jd = [g for g in funnel["groups"] if g["value"] == "jd"]
    assert jd and jd[0]["counts"] == [1, 1, 1], funnel
    assert server.sql(f"SELECT event, channel FROM events WHERE user_id = '{uid}' ORDER BY ts") == [
        ["scan", "jd"], ["view", "jd"], ["draw", "jd"]]

    # The retried batch carried the same event_ids and was stored once.
    first, second = seen["retry_ids"][:2]
    assert first == second and first, seen
    assert server.sql("SELECT count(*), count(DISTINCT event_id) FROM events "
                      "WHERE user_id = 'retry-user' AND event = 'view'") == [[1, 1]]
    # The event tracked just before the page closed went out with sendBeacon.
    assert wait_for(lambda: server.sql(
        "SELECT count(*) FROM events WHERE user_id = 'retry-user' AND event = 'leave'") == [[1]])
