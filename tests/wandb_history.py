"""Read back what an offline W&B run logged -- history, summary, config, run record, artifacts -- from its
`run-*.wandb` file (wandb 0.31 ships no reader for it, and writes no wandb-summary.json offline).

The file is a 7-byte header, then 32 KiB blocks of LevelDB-style records: 4-byte CRC, 2-byte little-endian
length, 1-byte type (1 full, 2 first, 3 middle, 4 last). Each assembled record is a `Record` protobuf.
"""

import glob
import json
import os
import struct

from wandb.proto import wandb_internal_pb2

HEADER, BLOCK = 7, 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    data = open(path, "rb").read()
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        block_left = BLOCK - (pos % BLOCK)
        if block_left < 7:  # the rest of a block too small for a record header is padding
            pos += block_left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(run_dir):
    """[{key: value}] rows of the run's history, in logging order (`_step` holds the step)."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def _records_of(run_dir, kind):
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    return [getattr(r, kind) for r in records(path) if r.WhichOneof("record_type") == kind]


def _merge(items, into):
    """Apply `update` items ({key or nested_key path: JSON value}) to a nested dict."""
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = into
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return into


def summary(run_dir):
    """The run's summary as the page shows it (every update applied in order): {key: value}; a key with
    define_metric summaries holds {"max": ..., "last": ...}."""
    merged = {}
    for record in _records_of(run_dir, "summary"):
        _merge(record.update, merged)
    return merged


def config(run_dir):
    """The run's config: the values given at init and every later update, {key: value}."""
    merged = {}
    for record in _records_of(run_dir, "run"):
        _merge(record.config.update, merged)
    for record in _records_of(run_dir, "config"):
        _merge(record.update, merged)
    return merged


def run_record(run_dir):
    """The run record: display_name, run_group, job_type, tags, ..."""
    return _records_of(run_dir, "run")[0]


def artifacts(run_dir):
    """The artifacts the run logged (name, type, metadata, manifest entries)."""
    return _records_of(run_dir, "artifact")


def run_dirs(wandb_dir):
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")))
