"""Shared fixtures for the real-client tests: the funnelhouse binary started on
loopback (HTTP and Postgres wire on free ports, data in a temporary dir), a landing
page served from another origin, and helpers to read back through /v1/sql.

The binary comes from $FUNNELHOUSE_BIN (scripts/test.sh sets it after cargo build).
"""

import http.server
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import pytest
import requests

HERE = pathlib.Path(__file__).parent
OUTPUT = pathlib.Path(os.environ.get("FUNNELHOUSE_TEST_OUTPUT", HERE / "output"))
BIN = os.environ.get("FUNNELHOUSE_BIN", "")


class Server:
    """`funnelhouse serve` on 127.0.0.1:0 with the given config text."""

    def __init__(self, config_text=""):
        if not BIN or not os.path.exists(BIN):
            raise RuntimeError("set FUNNELHOUSE_BIN to the built funnelhouse binary (scripts/test.sh does)")
        self.dir = tempfile.mkdtemp(prefix="fh-clients-")
        config = pathlib.Path(self.dir, "funnelhouse.toml")
        config.write_text(config_text)
        self.log_path = pathlib.Path(self.dir, "server.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FUNNELHOUSE_")}
        env["FUNNELHOUSE_LOG"] = "info"
        self.proc = subprocess.Popen(
            [BIN, "serve", "--config", str(config), "--data-dir", str(pathlib.Path(self.dir, "data")),
             "--http-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"), env=env,
        )
        http_addr = self._wait_for(r"listening on http://(\S+)")
        pg_addr = self._wait_for(r"postgres wire on (\S+)")
        self.url = "http://" + http_addr
        self.pg_host, self.pg_port = pg_addr.rsplit(":", 1)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server not ready:\n" + self.log())

    def _wait_for(self, pattern):
        deadline = time.time() + 30
        while time.time() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"no line matching {pattern!r} in the server log:\n{self.log()}")

    def log(self):
        return self.log_path.read_text(errors="replace")

    def sql(self, query, token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = requests.post(self.url + "/v1/sql", json={"sql": query}, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["rows"]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def start_server():
    """Start servers with a config text; all are stopped when the test ends."""
    started = []

    def start(config_text=""):
        server = Server(config_text)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class StaticSite:
    """Files served by Python's http.server on 127.0.0.1:0: another origin than the collector."""

    def __init__(self, files):
        self.files = files
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                body = site.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def output_dir():
    OUTPUT.mkdir(parents=True, exist_ok=True)
    return OUTPUT
