"""Anchors for the funnel benchmark: the 4-step, 24 h channel funnel of one campaign
over the same Parquet files, in ClickHouse (chdb: windowFunnel + attribution) and
DuckDB (chained earliest-next-step joins), both grouped by level and channel (the
per-channel breakdown; the attribution is approximate: the earliest first step). Prints one JSON line per engine with the
best of N runs and the per-step counts (for a sanity comparison)."""
import json
import sys
import time

STEPS = ["package", "scan", "view", "draw"]


def chdb_funnel(glob, campaign):
    import chdb

    conds = ", ".join(f"event = '{s}'" for s in STEPS)
    sql = f"""
        SELECT level, count() AS users FROM (
            SELECT user_id,
                   windowFunnel(86400000000, 'strict_once')(toUInt64(toUnixTimestamp64Micro(ts)), {conds}) AS level,
                   argMinIf(channel, ts, event = '{STEPS[0]}') AS channel
            FROM file('{glob}', Parquet)
            WHERE campaign = '{campaign}' AND event IN ({", ".join(f"'{s}'" for s in STEPS)})
            GROUP BY user_id)
        WHERE level > 0 GROUP BY level, channel ORDER BY level, channel FORMAT JSONEachRow"""
    out = chdb.query(sql).bytes().decode()
    levels = {}
    for row in map(json.loads, filter(None, out.splitlines())):
        levels[int(row["level"])] = levels.get(int(row["level"]), 0) + int(row["users"])
    return levels


def duckdb_funnel(glob, campaign):
    import duckdb

    con = duckdb.connect()
    names = ", ".join(f"'{s}'" for s in STEPS)
    sql = f"""
    WITH e AS (SELECT user_id, event, ts, channel FROM read_parquet('{glob}')
               WHERE campaign = '{campaign}' AND event IN ({names})),
    s1 AS (SELECT user_id, ts AS t1, channel FROM e WHERE event = '{STEPS[0]}'),
    s2 AS (SELECT s1.user_id, s1.t1, s1.channel, min(e.ts) AS t2 FROM s1 LEFT JOIN e
           ON e.user_id = s1.user_id AND e.event = '{STEPS[1]}' AND e.ts >= s1.t1 AND e.ts <= s1.t1 + INTERVAL 24 HOUR
           GROUP BY ALL),
    s3 AS (SELECT s2.user_id, s2.t1, s2.channel, s2.t2, min(e.ts) AS t3 FROM s2 LEFT JOIN e
           ON e.user_id = s2.user_id AND e.event = '{STEPS[2]}' AND e.ts >= s2.t2 AND e.ts <= s2.t1 + INTERVAL 24 HOUR
           GROUP BY ALL),
    s4 AS (SELECT s3.user_id, s3.t1, s3.channel, s3.t2, s3.t3, min(e.ts) AS t4 FROM s3 LEFT JOIN e
           ON e.user_id = s3.user_id AND e.event = '{STEPS[3]}' AND e.ts >= s3.t3 AND e.ts <= s3.t1 + INTERVAL 24 HOUR
           GROUP BY ALL),
    lv AS (SELECT user_id, channel, t1,
                  1 + (t2 IS NOT NULL)::INT + (t3 IS NOT NULL)::INT + (t4 IS NOT NULL)::INT AS level FROM s4),
    per_user AS (SELECT user_id, arg_min(channel, (-level, t1)) AS channel, max(level) AS level FROM lv GROUP BY user_id)
    SELECT level, channel, count(*) FROM per_user GROUP BY level, channel ORDER BY level, channel"""
    levels = {}
    for level, _channel, n in con.execute(sql).fetchall():
        levels[int(level)] = levels.get(int(level), 0) + int(n)
    return levels


def main():
    glob, campaign, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3
    for name, fn in [("chdb", chdb_funnel), ("duckdb", duckdb_funnel)]:
        best, levels = None, None
        for _ in range(runs):
            start = time.perf_counter()
            levels = fn(glob, campaign)
            secs = time.perf_counter() - start
            best = secs if best is None else min(best, secs)
        counts = [sum(n for l, n in levels.items() if l >= i) for i in range(1, len(STEPS) + 1)]
        print(json.dumps({"engine": name, "seconds": best, "counts": counts}), flush=True)


if __name__ == "__main__":
    main()
