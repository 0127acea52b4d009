"""Near copies by perceptual hash: how far a resized or re-encoded photo's hash moves, how close distinct
images come, what keeping near copies on one side of train-head's split changes, and what it costs.

    python benchmarks/near_copies.py [--out benchmarks/results/cpu]

Recorded, at the default model's input (EfficientNet-Lite0, 224x224):
- ``edits``: bits between each of 21 real photos (scikit-learn's and scikit-image's) and the same photo
  resized to 1/2 .. 1/6 (Lanczos), saved as JPEG at quality 95 .. 15, as WebP 50, and resized to 1/3 and
  saved at JPEG 50; a histogram, and the share within ``featx.data.NEAR_COPY_BITS``;
- ``edit_cosines``: the cosine of the same edits' embeddings with the original's (min, median, max per
  edit), beside ``distinct_photos_max_cosine``, each photo's highest to another photo: whether a cosine
  threshold could find near copies (``featx similar --min-similarity``) as the hash does;
- ``distinct_photos_min_bits``: for each photo, the fewest bits to another one;
- ``digits``: pairs of scikit-learn's 1,797 digits within the bound (distinct samples, near-identical at
  8x8 pixels), and the share of them in one class;
- ``split``: 600 digits, each also saved at 40 pixels beside itself (new bytes, the same picture), under
  their own classes and under random ones: train-head's held-out accuracy with each picture's copies
  kept on one side, against the same head split image by image;
- ``cost``: hashing (ms an image, numpy, batches of 8) and finding pairs among random hashes.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np


def photos() -> dict:
    import skimage.data
    from PIL import Image

    from featx.samples import sample_photos

    out = dict(sample_photos())
    for name in ("camera", "moon", "horse", "coins", "page", "text", "brick", "grass", "gravel", "logo",
                 "hubble_deep_field", "immunohistochemistry", "retina", "cell", "clock"):
        a = getattr(skimage.data, name)()
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.dtype != np.uint8:
            a = (255 * (a - a.min()) / (np.ptp(a) + 1e-9)).astype(np.uint8)
        out[name] = Image.fromarray(a).convert("RGB")
    return out


def edits(img) -> dict:
    from PIL import Image

    def saved(im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    out = {f"resize 1/{s}": saved(img.resize((img.width // s, img.height // s), Image.LANCZOS), "PNG")
           for s in (2, 3, 4, 6)}
    out |= {f"jpeg {q}": saved(img, "JPEG", quality=q) for q in (95, 75, 50, 30, 15)}
    out["webp 50"] = saved(img, "WEBP", quality=50)
    out["resize 1/3 + jpeg 50"] = saved(img.resize((img.width // 3, img.height // 3), Image.BILINEAR), "JPEG",
                                        quality=50)
    return out


def split_scores(tmp: Path, model_file: Path, *, random_labels: bool) -> dict:
    """Held-out accuracy of one logistic-regression head, copies kept together (train-head) and apart."""
    import shutil

    from PIL import Image

    import featx
    from featx.heads import make_head, stratified_split
    from featx.samples import write_digits_folder

    source = write_digits_folder(tmp / "source", size=32, limit=600)
    folder = tmp / ("random" if random_labels else "classes")
    rng = np.random.default_rng(0)
    for path in sorted(source.rglob("*.png")):
        label = folder / ("ab"[rng.integers(2)] if random_labels else path.parent.name)
        label.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, label / path.name)
        Image.open(path).resize((40, 40), Image.BILINEAR).save(label / f"{path.stem}-40px.png")
    cache = tmp / f"{folder.name}.h5"
    featx.embed_folder(folder, cache, model=model_file, device="cpu")
    report = featx.train_head(cache, tmp / f"{folder.name}.safetensors", C=1.0)
    data = featx.load_embeddings(cache)
    y = np.array(data.class_names)[data.labels]
    train, test = stratified_split(y, 0.2, 0)
    apart = make_head("logreg", C=1.0).fit(data.embeddings[train], y[train]).score(data.embeddings[test], y[test])
    return {"n_images": len(y), "n_near_copies": report.n_near_copies,
            "held_out_accuracy_copies_together": report.accuracy, "held_out_accuracy_copies_apart": float(apart)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    import featx
    from featx.bench import machine_description, scratch_folder, write_record
    from featx.data import NEAR_COPY_BITS, load_image, perceptual_hashes
    from featx.runtime import read_model_info
    from featx.store import near_copy_pairs

    tmp = scratch_folder("featx-near-copies-bench-")
    model_file = featx.ensure_model_file(featx.DEFAULT_BACKBONE, models_dir=tmp / "models")
    cfg = read_model_info(model_file).preprocess

    engine = featx.load_model(model_file, device="cpu", engine="onnx")

    def phash_and_embedding(data: bytes) -> tuple[int, np.ndarray]:
        pixels = load_image(data, cfg)[None]
        embedding = engine.encode(pixels).embedding[0]
        return int(perceptual_hashes(pixels)[0]), embedding / np.linalg.norm(embedding)

    bits, per_edit, cosines, originals, original_embeddings = [], {}, {}, [], []
    for name, img in photos().items():
        buf = io.BytesIO()
        img.save(buf, "PNG")
        original, embedding = phash_and_embedding(buf.getvalue())
        originals.append(original)
        original_embeddings.append(embedding)
        for edit, data in edits(img).items():
            edit_hash, edit_embedding = phash_and_embedding(data)
            d = int(np.bitwise_count(np.uint64(original) ^ np.uint64(edit_hash)))
            bits.append(d)
            per_edit.setdefault(edit, []).append(d)
            cosines.setdefault(edit, []).append(float(embedding @ edit_embedding))
    hashes = np.array(originals, dtype=np.uint64)
    apart = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) + np.eye(len(hashes), dtype=np.uint8) * 64
    E = np.stack(original_embeddings)
    photo_cosines = E @ E.T - 2 * np.eye(len(E))

    from sklearn.datasets import load_digits

    from featx.samples import write_digits_folder

    digits = load_digits()
    folder = write_digits_folder(tmp / "digits", size=32)
    decoded = [load_image((folder / str(t) / f"{i:04d}.png").read_bytes(), cfg) for i, t in enumerate(digits.target)]
    digit_hashes = perceptual_hashes(np.stack(decoded))
    pairs = near_copy_pairs(digit_hashes)

    batch = np.stack(decoded[:8])
    t0 = time.perf_counter()
    for _ in range(200):
        perceptual_hashes(batch)
    hash_ms = (time.perf_counter() - t0) / (200 * len(batch)) * 1000
    rng = np.random.default_rng(0)
    pair_seconds = {}
    for n in (100_000, 1_000_000):
        random = rng.integers(1, 2**63, n, dtype=np.uint64)
        t0 = time.perf_counter()
        near_copy_pairs(random)
        pair_seconds[str(n)] = time.perf_counter() - t0

    write_record({
        "machine": machine_description(),
        "command": "python benchmarks/near_copies.py",
        "near_copy_bits": NEAR_COPY_BITS,
        "edits": {"n": len(bits), "bits_histogram": np.bincount(bits).tolist(),
                  "share_within_bound": float(np.mean(np.array(bits) <= NEAR_COPY_BITS)),
                  "max_bits_per_edit": {k: max(v) for k, v in per_edit.items()}},
        "distinct_photos_min_bits": sorted(apart.min(axis=1).tolist()),
        "edit_cosines": {k: {"min": min(v), "median": float(np.median(v)), "max": max(v)} for k, v in cosines.items()},
        "distinct_photos_max_cosine": sorted(photo_cosines.max(axis=1).tolist(), reverse=True),
        "digits": {"n": len(digit_hashes), "pairs_within_bound": len(pairs),
                   "images_in_a_pair": len(np.unique(pairs)),
                   "pairs_in_one_class": float(np.mean(digits.target[pairs[:, 0]] == digits.target[pairs[:, 1]]))
                   if len(pairs) else None},
        "split": {"own_classes": split_scores(tmp, model_file, random_labels=False),
                  "random_classes": split_scores(tmp, model_file, random_labels=True)},
        "cost": {"hash_ms_per_image": hash_ms, "pairs_seconds_random_hashes": pair_seconds},
    }, args.out, "near_copies-cpu")


if __name__ == "__main__":
    main()
