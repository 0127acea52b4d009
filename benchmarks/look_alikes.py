"""`featx similar --groups`: how alike edited copies of a photo are, and what grouping a cache costs
against the grouping a user would write in plain numpy and scipy, in the same run.

    python benchmarks/look_alikes.py [--rows 20000] [--min-similarity 0.85] [--out benchmarks/results/cpu]

Recorded:
- ``edit_cosines``: 21 real photos (scikit-learn's and scikit-image's, as benchmarks/near_copies.py) and
  edits of each that a perceptual hash does not call the same picture (cropped by 10, 20 and 30 % of
  its width, 40 % brighter, turned 8 degrees, mirrored): each edit's cosine to its photo (min, median,
  max; Lite0), and ``distinct_photos_max_cosine``: the highest between two of the photos. What
  ``featx.search.LOOK_ALIKE_COSINE`` is chosen from. ``digits_pairs_alike_share``: the share of pairs
  of scikit-learn's digits (8x8 pixels, drawn at 32) at that cosine or more: to an ImageNet model most are.
- ``grouping``: a cache of ``--rows`` rows (the digits' Lite0 embeddings drawn again with noise, each a
  picture of its own: benchmarks/similar_search.py's, with less noise, so that draws of one digit are
  alike) grouped by ``featx.look_alike_groups`` (reads the
  cache, a block of similarities at a time) and by plain numpy (every similarity at once, np.triu,
  scipy's connected_components): seconds each, and whether the groups are the same.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def edit_cosines(model_file: Path) -> dict:
    from PIL import Image, ImageEnhance

    from featx.data import preprocess_image
    from featx.runtime import load_model
    from featx.store import unit_rows
    from near_copies import photos

    def edits(img) -> dict:
        w, h = img.size
        out = {f"crop {p} %": img.crop((w * p // 100, h * p // 200, w, h)) for p in (10, 20, 30)}
        out["40 % brighter"] = ImageEnhance.Brightness(img).enhance(1.4)
        out["turned 8 degrees"] = img.rotate(8)
        out["mirrored"] = img.transpose(Image.FLIP_LEFT_RIGHT)
        return out

    engine = load_model(model_file, device="cpu", engine="onnx")

    def embed(images) -> np.ndarray:
        return unit_rows(engine.encode(np.stack([preprocess_image(im, engine.info.preprocess)
                                                 for im in images])).embedding)

    originals = photos()
    E = embed(originals.values())
    distinct = E @ E.T
    np.fill_diagonal(distinct, -1)
    per_edit: dict[str, list[float]] = {}
    for e, img in zip(E, originals.values()):
        edited = edits(img)
        for name, cosine in zip(edited, embed(edited.values()) @ e):
            per_edit.setdefault(name, []).append(float(cosine))
    return {"photos": len(originals),
            "edit_cosines": {name: {"min": min(c), "median": float(np.median(c)), "max": max(c)}
                             for name, c in per_edit.items()},
            "distinct_photos_max_cosine": float(distinct.max())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--min-similarity", type=float, default=None, help="default: featx's LOOK_ALIKE_COSINE")
    parser.add_argument("--digits", type=int, default=None, help="embed only this many digits (default: all 1,797)")
    parser.add_argument("--noise", type=float, default=0.15,
                        help="sd of the noise on each row (two draws of one digit then at cosine 0.88 on average)")
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    import featx
    from featx.bench import machine_description, scratch_folder, write_record
    from featx.runtime import resolve_device
    from featx.search import LOOK_ALIKE_COSINE
    from featx.store import unit_rows
    from similar_search import noisy_digits_cache

    threshold = LOOK_ALIKE_COSINE if args.min_similarity is None else args.min_similarity
    tmp = scratch_folder("featx-look-alikes-bench-")
    cache, _, model_file = noisy_digits_cache(tmp, args.rows, np.random.default_rng(0), digits=args.digits,
                                            noise=args.noise)
    record = {"benchmark": "look_alikes", "machine": machine_description(), "min_similarity": threshold,
              **edit_cosines(model_file)}
    digits = unit_rows(featx.load_embeddings(tmp / "digits.h5").embeddings)  # the real ones, without noise
    record["digits_pairs_alike_share"] = float(np.triu(digits @ digits.T >= threshold, k=1).sum()
                                               / (len(digits) * (len(digits) - 1) / 2))

    t0 = time.perf_counter()
    groups = featx.look_alike_groups(cache, min_similarity=threshold)
    featx_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    data = featx.load_embeddings(cache)
    E = unit_rows(data.embeddings)
    i, j = np.nonzero(np.triu(E @ E.T, k=1) >= threshold)
    n = len(E)
    component = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)[1]
    plain = [members for members in np.split(np.argsort(component, kind="stable"),
                                             np.flatnonzero(np.diff(np.sort(component))) + 1) if len(members) > 1]
    plain_seconds = time.perf_counter() - t0

    same = (sorted(sorted(key for key, _ in g.pictures) for g in groups)
            == sorted(sorted(data.keys[m] for m in members) for members in plain))
    record["grouping"] = {
        "rows": args.rows, "pairs_alike": int(len(i)), "groups": len(groups),
        "pictures_in_groups": sum(len(g.pictures) for g in groups), "largest_group": max(
            (len(g.pictures) for g in groups), default=0),
        "featx_device": resolve_device("auto"), "featx_seconds": featx_seconds, "plain_numpy_seconds": plain_seconds,
        "featx_vs_plain": plain_seconds / featx_seconds, "same_groups": same}
    record["command"] = f"python benchmarks/look_alikes.py --rows {args.rows} --noise {args.noise} --out {args.out}"
    print("->", write_record(record, args.out, f"look_alikes-{args.rows}"))


if __name__ == "__main__":
    main()
