"""Resize + centre crop: featx's (the crop's region only, Pillow's ``resize(box=...)``) against plain
torchvision's Resize + CenterCrop of the whole photo, on the same decoded photos, in one process.

    python benchmarks/preprocess.py [--n-jpegs 400] [--out benchmarks/results/cpu]

The photos are ``featx.samples.write_jpeg_folder``'s 500x375 JPEGs, decoded once, and the same photos
turned to portrait (Pillow may run its two passes in the other order on a portrait crop). Two
settings: EfficientNet-Lite0's (the default model: bicubic, 256 -> 224) and ResNet-50's (bilinear,
232 -> 224). For each: images/s of both, their ratio, how far the pixels are apart (share of pixels that
differ, the largest difference in levels); for the default model also the cosine of the embeddings
of both. Then the whole file, ``load_image`` (read, decode, resize, crop) against a PIL decode and
torchvision's transforms.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _rates(fns, items, repeats: int = 5) -> list[tuple[float, np.ndarray]]:
    """For each of ``fns``: the median images/s of ``repeats`` passes over ``items``, the functions taking
    turns pass by pass (this host's timings wander by 10 % and more over a minute), and its outputs."""
    rates, outputs = [[] for _ in fns], [None] * len(fns)
    for fn in fns:
        fn(items[0])  # warm up
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            out = [fn(x) for x in items]
            rates[i].append(len(items) / (time.perf_counter() - start))
            outputs[i] = out
    return [(float(np.median(r)), np.stack(out)) for r, out in zip(rates, outputs)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-jpegs", type=int, default=400)
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    import torchvision.transforms as T
    from PIL import Image

    import featx
    from featx.backbones import PreprocessConfig
    from featx.bench import bench_workspace, machine_description, write_record
    from featx.data import decode_image, load_image, preprocess_image

    _, model_file, folder = bench_workspace("featx-preprocess-", n_jpegs=args.n_jpegs)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    photos = [decode_image(p) for p in paths]
    photos += [p.transpose(Image.Transpose.ROTATE_90) for p in photos]  # the same, as portraits
    engine = featx.load_model(model_file, device="cpu", engine="onnx")
    settings = {"efficientnet_lite0": engine.info.preprocess,
                "resnet50": PreprocessConfig((224, 224), 232, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                             "bilinear")}
    record = {"machine": machine_description(), "photos": len(photos), "jpeg_size": "500x375 and 375x500"}
    for name, cfg in settings.items():
        torchvision = T.Compose([T.Resize(cfg.resize_size, interpolation=T.InterpolationMode(cfg.interpolation)),
                                 T.CenterCrop(cfg.input_size)])
        (ours, ours_images), (theirs, their_images) = _rates(
            [lambda p: preprocess_image(p, cfg), lambda p: np.asarray(torchvision(p))], photos)
        levels = np.abs(ours_images.astype(np.int16) - their_images.astype(np.int16))
        record[f"{name}_featx_resize_crop_per_s"] = ours
        record[f"{name}_torchvision_resize_crop_per_s"] = theirs
        record[f"{name}_resize_crop_speedup"] = ours / theirs
        record[f"{name}_share_of_pixels_apart"] = float((levels > 0).mean())
        record[f"{name}_largest_share_in_one_photo"] = float((levels > 0).mean(axis=(1, 2, 3)).max())
        record[f"{name}_most_levels_apart"] = int(levels.max())
        if cfg == engine.info.preprocess:
            a, b = engine.encode(ours_images).embedding, engine.encode(their_images).embedding
            cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            record[f"{name}_embedding_cosine_min"] = float(cosine.min())
            record[f"{name}_embedding_cosine_mean"] = float(cosine.mean())
        # the whole file: featx's load_image against a PIL decode and torchvision's transforms
        (ours_file, _), (theirs_file, _) = _rates(
            [lambda p: load_image(p, cfg), lambda p: np.asarray(torchvision(Image.open(p).convert("RGB")))], paths)
        record[f"{name}_featx_load_image_per_s"] = ours_file
        record[f"{name}_pil_torchvision_load_per_s"] = theirs_file
        record[f"{name}_load_speedup"] = ours_file / theirs_file
    write_record(record, args.out, "preprocess-cpu", plot_rates=True)


if __name__ == "__main__":
    main()
