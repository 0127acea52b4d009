"""Memory and time of fitting a logistic-regression head on a cache-sized float32 embedding matrix:
featx's LogRegHead (C given, and C chosen by 5-fold CV) against what a user would write with plain
scikit-learn (StandardScaler + LogisticRegression, and LogisticRegressionCV), each in a fresh process;
and `featx train-head` as a whole on an HDF5 cache of the same rows (reading it, the 80/20 split, the
fit, the report).

    python benchmarks/head_memory.py [--rows 100000] [--out benchmarks/results]

The matrix is float32 (n, 1,280), as load_embeddings gives it: 10 Gaussian classes (synthetic: memory
does not depend on the pictures). "extra" is the process's peak resident memory less what it held once
the matrix was made, in multiples of the matrix's own size; for train-head, less what it held before
the call (after a first call on a small cache, which imports what it uses), so its "extra" includes
the matrix read from the cache (1.0x of it).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

CONTENDERS = ("featx LogRegHead(C=1)", "sklearn StandardScaler + LogisticRegression(C=1)",
              "featx LogRegHead (C by 5-fold CV)", "sklearn StandardScaler + LogisticRegressionCV(5 folds)")
TRAIN_HEAD = "featx train_head on the cache (C=1)"


def embeddings(rows: int, dim: int = 1280) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, dim)).astype(np.float32)
    y = rng.integers(0, 10, rows)
    X = np.empty((rows, dim), np.float32)
    for i in range(0, rows, 4096):  # a slice at a time: no float64 matrix raises the peak before the fit
        X[i:i + 4096] = centres[y[i:i + 4096]] * 0.1 + rng.standard_normal((len(y[i:i + 4096]), dim), dtype=np.float32)
    return X, y


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def write_cache(path: str, rows: int) -> None:
    """The matrix as a featx cache: one model group (a synthetic model's), 10 class folders."""
    from featx.backbones import PreprocessConfig
    from featx.export import ModelInfo
    from featx.store import EmbeddingStore

    X, y = embeddings(rows)
    info = ModelInfo("synthetic", X.shape[1], PreprocessConfig((224, 224), 256, (0.5,) * 3, (0.5,) * 3), None,
                     "none", "0" * 64, "fp32", "0")
    with EmbeddingStore(path, "synthetic", info=info) as store:
        label_of = store.label_index([f"class{c}" for c in range(10)])
        for start in range(0, rows, 4096):
            part = slice(start, start + 4096)
            keys = [f"class{c}/{i}.jpg" for i, c in zip(range(start, rows), y[part])]
            store.append(keys, X[part], [label_of[f"class{c}"] for c in y[part]], [1] * len(keys), [0] * len(keys))


def train_head_on(cache: str) -> dict:
    import tempfile

    import featx

    with tempfile.TemporaryDirectory() as tmp:
        # a first run on 2,000 rows imports what train-head uses (scikit-learn, matplotlib, torch: some
        # 300 MB whatever the cache), so what is measured below grows with the matrix
        write_cache(f"{tmp}/small.h5", 2000)
        featx.train_head(f"{tmp}/small.h5", f"{tmp}/head.safetensors", C=1.0)
    before = current_rss()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = featx.train_head(cache, f"{tmp}/head.safetensors", C=1.0)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    matrix = featx.summarize_cache(cache)[0].rows * 1280 * 4
    return {"seconds": seconds, "matrix_gb": matrix / 1e9, "extra_gb": (peak - before) / 1e9,
            "extra_x_matrix": (peak - before) / matrix, "test_accuracy": report.accuracy}


def one(name: str, rows: int) -> dict:
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.heads import LogRegHead

    X, y = embeddings(rows)
    model = {
        CONTENDERS[0]: lambda: LogRegHead(C=1.0),
        CONTENDERS[1]: lambda: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)),
        CONTENDERS[2]: lambda: LogRegHead(),
        CONTENDERS[3]: lambda: make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=5,
                                                                                    max_iter=2000)),
    }[name]()
    before = current_rss()
    t0 = time.perf_counter()
    model.fit(X, y)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"fit_seconds": seconds, "matrix_gb": X.nbytes / 1e9, "extra_gb": (peak - before) / 1e9,
            "extra_x_matrix": (peak - before) / X.nbytes, "train_accuracy": float(np.mean(model.predict(X) == y))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(train_head_on(args.cache) if args.one == TRAIN_HEAD else one(args.one, args.rows)))
        return

    from featx.bench import machine_description, write_record

    import tempfile

    results = {"machine": machine_description(), "rows": args.rows, "dim": 1280}
    with tempfile.TemporaryDirectory() as tmp:
        cache = f"{tmp}/cache.h5"
        write_cache(cache, args.rows)
        for name in (*CONTENDERS, TRAIN_HEAD):
            out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--one", name, "--cache", cache],
                                 check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
            r = results[name]
            print(f"{name:55s} {r.get('fit_seconds', r.get('seconds')):6.1f} s  extra memory {r['extra_gb']:.2f} GB "
                  f"({r['extra_x_matrix']:.1f}x the {r['matrix_gb']:.2f} GB matrix)")
    write_record(results, args.out, "head_memory-cpu")


if __name__ == "__main__":
    main()
