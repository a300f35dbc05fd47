"""Parquet bytes per stored event of a data dir, all files as flushed (run_ingest.sh's
first round), and the same rows under the settings of the writer the ingest issue
measured: the issue gives 19.4 bytes/event for its realistic set with that writer, so
this number says how a generated file compares to that set (benches/README.md, session
36).

    benches/.venv/bin/python benches/storage_bytes.py DATA_DIR   -> one JSON line

That writer's settings (ingest/src/parquet_file.rs from the first commit, 0322dfd, until
574caa0): zstd level 3, statistics, a dictionary on every column but event_id
(DELTA_BYTE_ARRAY) and the timestamps (DELTA_BINARY_PACKED). Each of our files is
rewritten with them by pyarrow, rows, files and row groups as they are. It is an
emulation: pyarrow writes statistics into page headers where arrow-rs writes a page
index, and sets no sorting columns; and the files are laid out as ours flush them
today, not as that server flushed (session 33 ran those settings in arrow-rs on the
`flush` bench's one 400 K-event flush and got 33.89 / 12.84 bytes/event on the default
/ short lines, where this gives 34.69 / 13.01 on a 2 M-event run's files).
`pyarrow_ours_bytes_per_event` rewrites the files with our own settings
(storage/src/parquet_file.rs) as a check that pyarrow writes as arrow-rs does."""
import io
import json
import os
import sys

import pyarrow
import pyarrow.parquet as pq


def written(table, dictionary_off, encodings, level):
    out = io.BytesIO()
    pq.write_table(
        table,
        out,
        compression="zstd",
        compression_level=level,
        write_statistics=True,
        use_dictionary=[c for c in table.column_names if c not in dictionary_off],
        column_encoding=encodings,
    )
    return out.tell()


def main(data_dir):
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    rows = sum(f["rows"] for f in manifest["files"])
    size = issue = ours = 0
    for f in manifest["files"]:
        path = os.path.join(data_dir, f["path"])
        size += os.path.getsize(path)
        table = pq.read_table(path)
        issue += written(
            table,
            ("event_id", "ts", "received_at"),
            {"event_id": "DELTA_BYTE_ARRAY", "ts": "DELTA_BINARY_PACKED", "received_at": "DELTA_BINARY_PACKED"},
            3,
        )
        ours += written(
            table,
            ("event_id", "user_id", "ts"),
            {"event_id": "DELTA_BYTE_ARRAY", "user_id": "DELTA_LENGTH_BYTE_ARRAY", "ts": "DELTA_BINARY_PACKED"},
            1,
        )
    print(json.dumps({
        "stored_events": rows,
        "files": len(manifest["files"]),
        "parquet_bytes": size,
        "bytes_per_event": size / rows,
        "issue_writer_bytes_per_event": issue / rows,
        "pyarrow_ours_bytes_per_event": ours / rows,
        "pyarrow": pyarrow.__version__,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
