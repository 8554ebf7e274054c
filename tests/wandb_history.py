"""Read back what an offline W&B run logged, from its `run-*.wandb` file (wandb 0.31 ships no reader for it).

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


def run_dirs(wandb_dir):
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")))
