"""How fast the HDF5 cache takes rows, against what the GPU target needs (10,000 images/s end to end):
batches of 256 ResNet-50 embeddings (2048-d float32) appended and committed as `featx embed` commits
them (every column written, flushed, then the row count raised), the re-run's `done()` read back, and
every embedding read back with `load_embeddings` (the first read, and the median of --reads); each with
the Fletcher-32 checksums featx writes and, in the same run, without them (a cache as featx wrote it
before it kept checksums), to see what checking them costs: the two caches are read in turn.

    python benchmarks/store_rates.py [--batches 200] [--out benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--reads", type=int, default=5, help="reads of each cache, in turn (the median is kept)")
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    from featx.bench import machine_description, scratch_folder, write_record
    from featx.export import ensure_model_file
    from featx.runtime import read_model_info
    from featx import store

    tmp = scratch_folder("featx-store-bench-")
    model_file = ensure_model_file("resnet50", weights="none", models_dir=tmp / "models")  # its 2048-d rows
    info = read_model_info(model_file)
    record = {"machine": machine_description(), "embed_dim": info.embed_dim, "rows": args.batches * args.batch_size,
              "batch_size": args.batch_size}
    caches = {True: tmp / "checksummed.h5", False: tmp / "unchecked.h5"}
    for checksums, path in caches.items():
        store._CHECKSUMMED = {"fletcher32": True} if checksums else {}  # featx's datasets are made with it
        rates = _write(path, model_file.stem, info, args.batches, args.batch_size)
        record.update({_named(name, checksums): rate for name, rate in rates.items()})
    os.sync()  # the disk's write-back of 400 MB done before any read is timed
    loads: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.reads):  # in turn, so that neither file is read only while the disk is busy
        for checksums, path in caches.items():
            t0 = time.perf_counter()
            assert store.load_embeddings(path).embeddings.shape == (record["rows"], info.embed_dim)
            loads[checksums].append(time.perf_counter() - t0)
    for checksums, seconds in loads.items():
        record[_named("load_embeddings_first_rows_per_s", checksums)] = record["rows"] / seconds[0]
        record[_named("load_embeddings_rows_per_s", checksums)] = record["rows"] / statistics.median(seconds)
    for name in ("append_rows_per_s", "load_embeddings_rows_per_s"):
        record[f"{name[:-len('_per_s')]}_ratio_with_checksums"] = record[name] / record[_named(name, False)]
    write_record(record, args.out, f"store_rates-{info.embed_dim}d")


def _named(name: str, checksums: bool) -> str:
    return name if checksums else f"{name}_without_checksums"


def _write(path, model: str, info, batches: int, batch_size: int) -> dict[str, float]:
    from featx.store import EmbeddingStore

    embeddings = np.random.default_rng(0).normal(size=(batch_size, info.embed_dim)).astype(np.float32)
    with EmbeddingStore(path, model, info=info) as written:
        t0 = time.perf_counter()
        for b in range(batches):
            keys = [f"class_{b % 10}/img_{b * batch_size + i:08d}.jpg" for i in range(batch_size)]
            written.append(keys, embeddings, [b % 10] * batch_size, [50_000 + b] * batch_size,
                           [1_700_000_000_000_000_000 + b] * batch_size,
                           digests=[hashlib.sha256(k.encode()).hexdigest() for k in keys])  # as embed writes them
        append = time.perf_counter() - t0
        t0 = time.perf_counter()
        done = written.done()
        read_done = time.perf_counter() - t0
    assert len(done) == batches * batch_size
    return {"append_rows_per_s": batches * batch_size / append, "append_ms_per_batch": 1000 * append / batches,
            "done_rows_per_s": batches * batch_size / read_done}


if __name__ == "__main__":
    main()
