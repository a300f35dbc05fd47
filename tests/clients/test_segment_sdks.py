"""segment-analytics-python and rudder-sdk-python, unchanged, pointed at Funnelhouse:
track/page/identify with and without gzip, read back through SQL with the mapped
fields, and a batch the SDK retries after a lost answer stored once."""

import http.server
import json
import threading
import urllib.request

import pytest
import rudderstack.analytics.client as rudder
import segment.analytics.client as segment

CONFIG = '[auth]\nwrite_keys = ["wk_test"]\n'


def sdk_client(sdk, host, gzip, **kwargs):
    cls = segment.Client if sdk == "segment" else rudder.Client
    return cls(write_key="wk_test", host=host, gzip=gzip, **kwargs)


def rows_of(server, user_id):
    rows = server.sql(
        "SELECT event, campaign, channel, properties FROM events "
        f"WHERE user_id = '{user_id}' ORDER BY event"
    )
    return [(e, c, ch, json.loads(p) if p else None) for e, c, ch, p in rows]


@pytest.mark.parametrize("sdk", ["segment", "rudder"])
@pytest.mark.parametrize("gzip", [False, True])
def test_track_page_identify_are_stored_with_the_mapped_fields(start_server, sdk, gzip):
    server = start_server(CONFIG)
    client = sdk_client(sdk, server.url, gzip, sync_mode=True)
    user = f"{sdk}-{'gz' if gzip else 'plain'}"
    client.track(user_id=user, event="scan", properties={"campaign": "parcel-lottery", "channel": "jd", "card": "A3"})
    client.page(user_id=user, name="Landing", properties={"campaign": "parcel-lottery"},
                context={"campaign": {"source": "tmall"}})
    client.track(user_id=user, event="Lottery Drawn", properties={"campaign": "parcel-lottery", "prize": 5})
    client.identify(user_id=user, traits={"plan": "vip"})
    client.flush()

    assert rows_of(server, user) == [
        ("$identify", "", "", {"plan": "vip"}),
        ("Lottery Drawn", "parcel-lottery", "", {"campaign": "parcel-lottery", "prize": 5}),
        ("scan", "parcel-lottery", "jd", {"campaign": "parcel-lottery", "channel": "jd", "card": "A3"}),
        ("view", "parcel-lottery", "tmall", {"name": "Landing", "campaign": "parcel-lottery"}),
    ]


class LostAnswerProxy:
    """Forwards every POST to the server, but answers the first one with a 503 as if
    the answer had been lost: the SDK retries a batch the server already stored."""

    def __init__(self, target):
        self.posts = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                req = urllib.request.Request(target + self.path, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=30) as resp:
                    status, answer = resp.status, resp.read()
                proxy.posts += 1
                if proxy.posts == 1:
                    status, answer = 503, b'{"error": "answer lost"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.mark.parametrize("sdk", ["segment", "rudder"])
def test_a_retried_batch_is_stored_once(start_server, sdk):
    server = start_server(CONFIG)
    proxy = LostAnswerProxy(server.url)
    client = sdk_client(sdk, proxy.url, True, max_retries=5)
    user = f"retry-{sdk}"
    for i in range(5):
        client.track(user_id=user, event="scan", properties={"campaign": "parcel-lottery", "i": i})
    client.flush()
    client.join()
    proxy.httpd.shutdown()

    assert proxy.posts >= 2, "the SDK should have retried the batch"
    assert server.sql(f"SELECT count(*), count(DISTINCT event_id) FROM events WHERE user_id = '{user}'") == [[5, 5]]


def test_a_wrong_write_key_is_refused(start_server):
    server = start_server(CONFIG)
    errors = []
    client = segment.Client(write_key="wk_wrong", host=server.url, sync_mode=True,
                            on_error=lambda e, batch: errors.append(e))
    with pytest.raises(Exception) as refused:
        client.track(user_id="intruder", event="scan")
    assert "401" in str(refused.value) or getattr(refused.value, "status", None) == 401
    assert server.sql("SELECT count(*) FROM events WHERE user_id = 'intruder'") == [[0]]
