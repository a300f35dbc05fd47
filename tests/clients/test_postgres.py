"""psql and psycopg on the Postgres wire: the same numbers as /v1/sql (a window_funnel
query included), the catalog queries of psql's \\d, writes refused, the session SETs
clients send accepted, and with read tokens a wrong password refused."""

import os
import subprocess
import time

import psycopg
import pytest
import requests

FUNNEL_SQL = (
    "SELECT channel, level, count(*) AS users FROM ("
    " SELECT user_id, channel, window_funnel(86400, ts, event = 'scan', event = 'view', event = 'draw') AS level"
    " FROM events WHERE campaign = 'parcel-lottery' GROUP BY user_id, channel) t"
    " GROUP BY channel, level ORDER BY channel, level"
)


def seed(server):
    """A few users per channel reaching different depths."""
    events = []
    for i in range(12):
        channel = ["jd", "tmall", "douyin"][i % 3]
        depth = i % 4
        for step, name in enumerate(["scan", "view", "draw"][:depth]):
            events.append({
                "event_id": f"pg-{i}-{step}", "event": name, "user_id": f"u{i}",
                "campaign": "parcel-lottery", "channel": channel,
                "ts": f"2026-11-11T10:0{step}:00Z", "properties": {"n": i},
            })
    r = requests.post(server.url + "/v1/events", json=events, timeout=30)
    assert r.status_code == 200 and r.json()["accepted"] == len(events), r.text


def psql(server, sql, password=None, check=True):
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    return subprocess.run(
        ["psql", "-h", server.pg_host, "-p", server.pg_port, "-U", "analyst", "-d", "funnelhouse",
         "-X", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1", "-c", sql],
        env=env, capture_output=True, text=True, timeout=60, check=check,
    )


def conninfo(server, password=None):
    info = f"host={server.pg_host} port={server.pg_port} dbname=funnelhouse user=analyst"
    return info + (f" password={password}" if password else "")


def http_rows(server, sql):
    return [[str(v) for v in row] for row in server.sql(sql)]


def test_psql_gets_the_same_numbers_as_http(start_server):
    server = start_server()
    seed(server)
    for sql in ["SELECT count(*), count(DISTINCT user_id) FROM events",
                "SELECT channel, count(*) FROM events GROUP BY channel ORDER BY channel",
                FUNNEL_SQL]:
        out = psql(server, sql).stdout.strip().splitlines()
        assert [line.split("|") for line in out] == http_rows(server, sql), sql


def test_psql_describe_lists_the_events_table(start_server):
    server = start_server()
    seed(server)
    tables = psql(server, r"\dt").stdout
    assert "events" in tables, tables
    columns = psql(server, r"\d events").stdout
    for column in ["event_id", "user_id", "channel", "ts", "properties"]:
        assert column in columns, columns


def test_psycopg_queries_window_funnel_and_types(start_server):
    server = start_server()
    seed(server)
    with psycopg.connect(conninfo(server)) as conn:
        rows = conn.execute(FUNNEL_SQL).fetchall()
        assert [[str(v) for v in r] for r in rows] == http_rows(server, FUNNEL_SQL)
        # A parameterised query goes through the extended protocol.
        n = conn.execute("SELECT count(*) FROM events WHERE channel = %s", ["jd"]).fetchone()[0]
        assert str(n) == http_rows(server, "SELECT count(*) FROM events WHERE channel = 'jd'")[0][0]
        ts = conn.execute("SELECT min(ts) FROM events").fetchone()[0]
        assert ts.tzinfo is not None and ts.isoformat().startswith("2026-11-11T10:00:00")
        # What drivers send on connect is accepted and changes nothing.
        conn.execute("SET application_name = 'dashboards'")
        conn.execute("SET extra_float_digits = 3")
        conn.execute("SET datafusion.execution.target_partitions = 1")


@pytest.mark.parametrize("statement", [
    "CREATE TABLE t (a int)",
    "INSERT INTO events (event_id) VALUES ('x')",
    "DROP TABLE events",
    "COPY events TO '/tmp/events.csv'",
    "SELECT * INTO events_copy FROM events",
])
def test_writes_are_refused_with_a_postgres_error(start_server, statement):
    server = start_server()
    with psycopg.connect(conninfo(server), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(statement)
        assert "read-only" in str(refused.value)
        assert refused.value.sqlstate == "25006"
        # The connection is still usable afterwards.
        assert conn.execute("SELECT 1").fetchone()[0] == 1
    failed = psql(server, statement, check=False)
    assert failed.returncode != 0 and "read-only" in failed.stderr


def test_with_read_tokens_the_password_must_be_one(start_server):
    server = start_server('[auth]\nread_tokens = ["rt_one", "rt_two"]\n')
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(conninfo(server, "wrong")).close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(conninfo(server)).close()
    with psycopg.connect(conninfo(server, "rt_two")) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    refused = psql(server, "SELECT 1", password="wrong", check=False)
    assert refused.returncode != 0 and "password" in refused.stderr.lower(), refused.stderr
    assert psql(server, "SELECT 1", password="rt_one").stdout.strip() == "1"


@pytest.mark.timeout(90)
def test_the_query_timeout_holds_while_the_query_runs_and_rows_stream(start_server):
    """[query] timeout covers the whole query on the wire, not only its planning: an
    endless aggregate and an endless row stream (single-row mode) both end with an error
    naming the timeout, and the connection stays usable."""
    server = start_server('[query]\ntimeout = "1s"\nmax_result_rows = 1000000000000\n')
    with psycopg.connect(conninfo(server), autocommit=True) as conn:
        for sql in ["SELECT count(*) FROM generate_series(1, 1000000000000)",
                    "SELECT * FROM generate_series(1, 1000000000000)"]:
            started = time.time()
            with pytest.raises(psycopg.Error) as stopped:
                for _ in conn.cursor().stream(sql):
                    pass
            assert "query.timeout" in str(stopped.value)
            assert time.time() - started < 15
        assert conn.execute("SELECT 1").fetchone()[0] == 1
    started = time.time()
    failed = psql(server, "SELECT count(*) FROM generate_series(1, 1000000000000)", check=False)
    assert failed.returncode != 0 and "query.timeout" in failed.stderr, failed.stderr
    assert time.time() - started < 15


@pytest.mark.timeout(90)
def test_results_past_max_result_rows_are_refused_on_the_wire(start_server):
    """pgwire gathers an extended-protocol result in memory before sending it, so a result
    past [query] max_result_rows ends in an error naming the limit instead of growing the
    server; one of exactly max_result_rows rows is whole."""
    server = start_server("[query]\nmax_result_rows = 1000\n")
    with psycopg.connect(conninfo(server), autocommit=True) as conn:
        rows = conn.execute("SELECT * FROM generate_series(1, 1000)").fetchall()
        assert len(rows) == 1000
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("SELECT * FROM generate_series(1, 1000000000000)")
        assert "query.max_result_rows (1000)" in str(refused.value)
        assert conn.execute("SELECT count(*) FROM generate_series(1, 100000)").fetchone()[0] == 100000
    failed = psql(server, "SELECT * FROM generate_series(1, 5000)", check=False)
    assert failed.returncode != 0 and "max_result_rows" in failed.stderr, failed.stderr


# What DBeaver (through the PostgreSQL JDBC driver) and Grafana's PostgreSQL data source
# send when they connect and list tables and columns.
CLIENT_CATALOG_QUERIES = [
    "SET extra_float_digits = 3",
    "SET application_name = 'PostgreSQL JDBC Driver'",
    "SELECT current_schema(),session_user",
    "SELECT n.oid,n.*,d.description FROM pg_catalog.pg_namespace n LEFT OUTER JOIN pg_catalog.pg_description d "
    "ON d.objoid=n.oid AND d.objsubid=0 AND d.classoid='pg_namespace'::regclass ORDER BY nspname",
    "SHOW search_path",
    "SELECT version()",
    "SELECT * FROM pg_catalog.pg_settings where name='standard_conforming_strings'",
    "SELECT quote_ident(table_name) AS \"table\" FROM information_schema.tables "
    "WHERE quote_ident(table_schema) NOT IN ('information_schema', 'pg_catalog') ORDER BY 1",
    "SELECT quote_ident(column_name) AS \"column\", data_type AS \"type\" FROM information_schema.columns "
    "WHERE quote_ident(table_name) = 'events'",
]


def test_catalog_queries_of_dbeaver_and_grafana_work(start_server):
    server = start_server()
    seed(server)
    with psycopg.connect(conninfo(server), autocommit=True) as conn:
        answers = {}
        for query in CLIENT_CATALOG_QUERIES:
            cur = conn.execute(query)
            answers[query] = cur.fetchall() if cur.description else None
    tables = [r[0] for r in answers[CLIENT_CATALOG_QUERIES[7]]]
    assert "events" in tables, tables
    columns = dict(answers[CLIENT_CATALOG_QUERIES[8]])
    assert set(columns) >= {"event_id", "event", "user_id", "campaign", "channel", "ts", "properties"}, columns


FUNNEL_TABLE_SQL = (
    "SELECT value, step, users FROM funnel('parcel-lottery', 'scan,view,draw', '24h', 'channel')"
    " ORDER BY value NULLS FIRST, step"
)


def test_the_funnel_table_function_gives_v1_funnel_numbers_on_the_wire(start_server):
    server = start_server()
    seed(server)
    report = requests.get(server.url + "/v1/funnel", timeout=30, params={
        "campaign": "parcel-lottery", "steps": "scan,view,draw", "window": "24h",
        "breakdown": "channel"}).json()
    # The total first (value NULL, which psql -A prints empty), then each channel.
    expected = [["", str(s), str(n)] for s, n in enumerate(report["total"]["counts"])]
    for g in sorted(report["groups"], key=lambda g: g["value"]):
        expected += [[g["value"], str(s), str(n)] for s, n in enumerate(g["counts"])]
    out = psql(server, FUNNEL_TABLE_SQL).stdout.strip().splitlines()
    assert [line.split("|") for line in out] == expected
    with psycopg.connect(conninfo(server)) as conn:
        rows = conn.execute(FUNNEL_TABLE_SQL).fetchall()
        assert [["" if v is None else str(v) for v in r] for r in rows] == expected
        plan = conn.execute("EXPLAIN SELECT * FROM funnel('parcel-lottery', 'scan,view', '24h')")
        text = "\n".join(str(r[-1]) for r in plan.fetchall())
        assert "FunnelFoldExec" in text and "FunnelMergeExec" in text, text
