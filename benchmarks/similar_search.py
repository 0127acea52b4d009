"""`featx similar` against the search a user would write in plain numpy, in the same run: a cache of
N rows (the real digits' Lite0 embeddings, each drawn again with noise, and a perceptual hash of its own,
random as distinct pictures' are: the search looks among them for each query's own picture), queried
with Q of its own photos (their stored rows serve, so no model runs and the search alone is timed). Plain numpy holds
every row at once, takes all similarities and sorts each query's; featx reads the cache a chunk at a
time and sorts only about the best 150 rows of a chunk for each query. Both must give the same top k.

    python benchmarks/similar_search.py [--rows 100000] [--queries 1000] [--out benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def noisy_digits_cache(tmp: Path, n_rows: int, rng, *, digits: int | None = None,
                       noise: float = 0.3) -> tuple[Path, Path, Path]:
    """(cache, the folder it follows, the model file): ``n_rows`` rows of the real digits' Lite0 embeddings
    (the first ``digits``, else all 1,797), each drawn again with normal noise of sd ``noise``, with a perceptual hash of its own,
    random as distinct pictures' are, and a small file of its own in the folder (a search names only
    files still there; their size and mtime recorded, so a query's stored row serves)."""
    import featx
    from featx.export import ensure_model_file
    from featx.runtime import read_model_info
    from featx.samples import write_digits_folder
    from featx.store import EmbeddingStore

    model_file = ensure_model_file("efficientnet_lite0")
    source = write_digits_folder(tmp / "digits", size=32, limit=digits)
    featx.embed_folder(source, tmp / "digits.h5", model=model_file)
    base = featx.load_embeddings(tmp / "digits.h5").embeddings
    folder = tmp / "photos"
    folder.mkdir()
    stats = {}
    for row in range(n_rows):
        path = folder / f"{row:08d}.png"
        path.write_bytes(b"stands for a photo")
        st = path.stat()
        stats[row] = (st.st_size, st.st_mtime_ns)
    cache = tmp / "cache.h5"
    with EmbeddingStore(cache, model_file.stem, info=read_model_info(model_file), folder=folder) as store:
        for start in range(0, n_rows, 8192):
            rows = range(start, min(start + 8192, n_rows))
            emb = (base[rng.integers(0, len(base), len(rows))]
                   + rng.normal(0, noise, (len(rows), base.shape[1]))).astype(np.float32)
            store.append([f"{r:08d}.png" for r in rows], emb, [-1] * len(rows),
                         [stats[r][0] for r in rows], [stats[r][1] for r in rows],
                         digests=[""] * len(rows), phashes=rng.integers(1, 2**63, len(rows), dtype=np.uint64))
    return cache, folder, model_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--digits", type=int, default=None, help="embed only this many digits (default: all 1,797)")
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    import featx
    from featx.bench import machine_description, scratch_folder, write_record
    from featx.store import unit_rows

    tmp = scratch_folder("featx-similar-bench-")
    rng = np.random.default_rng(0)
    query_rows = np.sort(rng.choice(args.rows, args.queries, replace=False))
    cache, folder, model_file = noisy_digits_cache(tmp, args.rows, rng, digits=args.digits)
    queries = [folder / f"{r:08d}.png" for r in query_rows]

    t0 = time.perf_counter()
    found = featx.find_similar(queries, cache, k=args.k, model=model_file)
    featx_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    data = featx.load_embeddings(cache)
    E = unit_rows(data.embeddings)
    plain = []
    for start in range(0, len(query_rows), 1024):
        block = query_rows[start:start + 1024]
        sims = E[block] @ E.T
        sims[np.arange(len(block)), block] = -np.inf  # a photo is not its own match
        plain += [np.argsort(-s, kind="stable")[:args.k] for s in sims]
    plain_seconds = time.perf_counter() - t0

    same = np.mean([[key for key, _ in r.matches] == [data.keys[j] for j in top] for r, top in zip(found, plain)])
    record = {
        "benchmark": "similar_search", "machine": machine_description(), "rows": args.rows,
        "queries": args.queries, "k": args.k, "featx_seconds": featx_seconds, "plain_numpy_seconds": plain_seconds,
        "featx_vs_plain": plain_seconds / featx_seconds, "same_top_k": float(same),
        "command": f"python benchmarks/similar_search.py --rows {args.rows} --queries {args.queries} --out {args.out}",
    }
    print("->", write_record(record, args.out, f"similar_search-{args.rows}"))


if __name__ == "__main__":
    main()
