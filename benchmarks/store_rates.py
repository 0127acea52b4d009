"""How fast the HDF5 cache takes rows, against what the GPU target needs (10,000 images/s end to end):
batches of 256 ResNet-50 embeddings (2048-d float32) appended and committed as `featx embed` commits
them (every column written, flushed, then the row count raised), the re-run's `done()` read back, and
every embedding read back with `load_embeddings`.

    python benchmarks/store_rates.py [--batches 200] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from featx.bench import machine_description, scratch_folder, write_record
    from featx.export import ensure_model_file
    from featx.runtime import read_model_info
    from featx.store import EmbeddingStore

    tmp = scratch_folder("featx-store-bench-")
    model_file = ensure_model_file("resnet50", weights="none", models_dir=tmp / "models")  # its 2048-d rows
    info = read_model_info(model_file)
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(args.batch_size, info.embed_dim)).astype(np.float32)
    n = args.batches * args.batch_size
    with EmbeddingStore(tmp / "store.h5", model_file.stem, info=info) as store:
        t0 = time.perf_counter()
        for b in range(args.batches):
            keys = [f"class_{b % 10}/img_{b * args.batch_size + i:08d}.jpg" for i in range(args.batch_size)]
            store.append(keys, embeddings, [b % 10] * args.batch_size, [50_000 + b] * args.batch_size,
                         [1_700_000_000_000_000_000 + b] * args.batch_size,
                         digests=[hashlib.sha256(k.encode()).hexdigest() for k in keys])  # as embed writes them
        append = time.perf_counter() - t0
        t0 = time.perf_counter()
        done = store.done()
        read_done = time.perf_counter() - t0
    assert len(done) == n
    from featx.store import load_embeddings

    t0 = time.perf_counter()
    loaded = load_embeddings(tmp / "store.h5").embeddings
    read_rows = time.perf_counter() - t0
    assert loaded.shape == (n, info.embed_dim)
    write_record({
        "machine": machine_description(), "embed_dim": info.embed_dim, "rows": n, "batch_size": args.batch_size,
        "append_rows_per_s": n / append, "append_ms_per_batch": 1000 * append / args.batches,
        "done_rows_per_s": n / read_done, "load_embeddings_rows_per_s": n / read_rows,
    }, args.out, f"store_rates-{info.embed_dim}d")


if __name__ == "__main__":
    main()
