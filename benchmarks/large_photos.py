"""Camera-sized photos: reduced-scale JPEG decode (featx's CPU path) against a full decode, same files; HEIC.

    python benchmarks/large_photos.py [--n 24] [--size 4032x3024] [--out benchmarks/results/cpu]

The photos are ``featx.samples.camera_sized_photo`` mosaics: real pictures and textures cut at their
native resolution, so every pixel carries real detail rather than upscaled blur. For each file: decode + preprocess time with ``featx.data.load_image``
(libjpeg's DCT scaling down to at least twice the resize target) and with a full decode followed by
the same preprocessing, in one process; then the EfficientNet-Lite0 embeddings of both (cosine) and
the mean pixel difference of the preprocessed images. Then the same photos as HEIC (what iPhones
save; HEVC has no reduced-scale decode), decoded through featx's path, and their embeddings against
the JPEGs'. Then as JPEG 2000 (lossy, 20:1): featx's path (OpenJPEG leaving out the finest wavelet
levels, both sides kept at least four times the resize target) against a full decode of the same files.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--size", default="4032x3024")
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    import featx
    from featx.bench import bench_workspace, machine_description, write_record
    from featx.data import decode_image, load_image, preprocess_image
    from featx.samples import camera_sized_photo

    size = tuple(int(v) for v in args.size.split("x"))
    tmp, model_file, _ = bench_workspace("featx-large-photos-")
    folder = Path(tempfile.mkdtemp(dir=tmp))
    paths = []
    for i in range(args.n):
        path = folder / f"photo_{i:03d}.jpg"
        camera_sized_photo(size, seed=i).save(path, quality=92)
        paths.append(str(path))

    engine = featx.load_model(model_file, device="cpu", engine="onnx")
    cfg = engine.info.preprocess
    load_image(paths[0], cfg)  # warm the page cache and the decoders
    timings = {}
    for name, fn in (("full_decode", lambda p: preprocess_image(decode_image(p), cfg)),
                     ("reduced_scale_decode", lambda p: load_image(p, cfg))):
        t0 = time.perf_counter()
        images = np.stack([fn(p) for p in paths])
        timings[name] = (len(paths) / (time.perf_counter() - t0), images)
    import pillow_heif

    pillow_heif.register_heif_opener()  # to write them; featx registers it itself to read
    heic_paths = [p[:-4] + ".heic" for p in paths]
    for jpeg, heic in zip(paths, heic_paths):
        decode_image(jpeg).save(heic, quality=85)
    load_image(heic_paths[0], cfg)
    t0 = time.perf_counter()
    heic = np.stack([load_image(p, cfg) for p in heic_paths])
    timings["heic_decode"] = (len(paths) / (time.perf_counter() - t0), heic)

    jp2_paths = [p[:-4] + ".jp2" for p in paths]
    for jpeg, jp2 in zip(paths, jp2_paths):
        decode_image(jpeg).save(jp2, quality_mode="rates", quality_layers=[20])
    load_image(jp2_paths[0], cfg)
    for name, fn in (("jp2_full_decode", lambda p: preprocess_image(decode_image(p), cfg)),
                     ("jp2_reduced_decode", lambda p: load_image(p, cfg))):
        t0 = time.perf_counter()
        images = np.stack([fn(p) for p in jp2_paths])
        timings[name] = (len(paths) / (time.perf_counter() - t0), images)

    def cosine(x, y):
        a, b = engine.encode(x).embedding, engine.encode(y).embedding
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    full, reduced = timings["full_decode"][1], timings["reduced_scale_decode"][1]
    cosine_reduced, cosine_heic = cosine(full, reduced), cosine(full, heic)
    cosine_jp2 = cosine(timings["jp2_full_decode"][1], timings["jp2_reduced_decode"][1])
    record = {
        "machine": machine_description(),
        "photos": args.n,
        "size": args.size,
        "full_decode_images_per_s": timings["full_decode"][0],
        "reduced_scale_decode_images_per_s": timings["reduced_scale_decode"][0],
        "speedup": timings["reduced_scale_decode"][0] / timings["full_decode"][0],
        "embedding_cosine_min": float(cosine_reduced.min()),
        "embedding_cosine_mean": float(cosine_reduced.mean()),
        "pixel_mean_abs_diff": float(np.abs(full.astype(np.float32) - reduced).mean()),
        "heic_decode_images_per_s": timings["heic_decode"][0],
        "heic_vs_jpeg_embedding_cosine_min": float(cosine_heic.min()),
        "jp2_full_decode_images_per_s": timings["jp2_full_decode"][0],
        "jp2_reduced_decode_images_per_s": timings["jp2_reduced_decode"][0],
        "jp2_speedup": timings["jp2_reduced_decode"][0] / timings["jp2_full_decode"][0],
        "jp2_embedding_cosine_min": float(cosine_jp2.min()),
        "jp2_embedding_cosine_mean": float(cosine_jp2.mean()),
    }
    write_record(record, args.out, f"large_photos-{args.size}")


if __name__ == "__main__":
    main()
