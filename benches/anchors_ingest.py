"""Anchors for the ingest benchmark: NDJSON -> zstd Parquet with DuckDB and ClickHouse
(chdb) on the same file, timed in the same run. Prints one JSON line per engine."""
import json
import os
import sys
import time


def count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def duckdb_convert(src, dst):
    import duckdb

    con = duckdb.connect()
    con.execute(
        f"COPY (SELECT * FROM read_json('{src}', format='newline_delimited')) "
        f"TO '{dst}' (FORMAT parquet, COMPRESSION zstd)"
    )


def chdb_convert(src, dst):
    import chdb

    chdb.query(
        f"INSERT INTO FUNCTION file('{dst}', 'Parquet') "
        f"SELECT * FROM file('{src}', 'JSONEachRow') "
        f"SETTINGS output_format_parquet_compression_method='zstd', engine_file_truncate_on_insert=1"
    )


def main():
    src, out_dir = sys.argv[1], sys.argv[2]
    events = count_lines(src)
    for name, fn in [("duckdb", duckdb_convert), ("chdb", chdb_convert)]:
        dst = os.path.join(out_dir, f"anchor-{name}.parquet")
        if os.path.exists(dst):
            os.remove(dst)
        start = time.perf_counter()
        fn(src, dst)
        secs = time.perf_counter() - start
        print(json.dumps({
            "engine": name, "events": events, "seconds": secs,
            "events_per_sec": events / secs, "parquet_bytes": os.path.getsize(dst),
            "bytes_per_event": os.path.getsize(dst) / events,
        }), flush=True)


if __name__ == "__main__":
    main()
