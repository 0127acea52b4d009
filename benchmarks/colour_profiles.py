"""Photos saved in a wide-gamut colour space (an iPhone's Display P3, a camera's Adobe RGB, Lightroom's ProPhoto):
how far featx's embeddings move because featx, as torchvision's and timm's own pipelines do, reads the pixel
values as they are stored and does not apply the ICC profile embedded in the file.

    python benchmarks/colour_profiles.py [--out benchmarks/results/cpu]

Each of the sample photos (scikit-learn's and scikit-image's, sRGB) is saved as a JPEG (quality 95) in each
colour space, with that space's ICC profile embedded (a matrix/TRC profile this script writes from the space's
published primaries, white point and tone curve): the file a phone, a camera or an editor writes of the same
scene. Recorded, with EfficientNet-Lite0 (the default model):
- ``as_featx_reads``: each such file as featx decodes it (profile not applied), against the sRGB photo saved
  the same way: cosine of the embeddings (min, median, max), and the photos whose top ImageNet class changed;
- ``colour_managed``: the same files converted to sRGB through their profile first (Pillow's ImageCms,
  LittleCMS): the embedding cosine to the sRGB photo's, which checks the profiles and the simulation (it
  should come back to about 1), and the conversion's time per photo at the decoded size;
- ``jpeg_reencode``: for scale, the sRGB photo saved again at JPEG quality 90 and 75 against quality 95.
"""

from __future__ import annotations

import argparse
import io
import struct
import time

import numpy as np

D65 = (0.3127, 0.3290)
D50 = (0.3457, 0.3585)
# name: (red, green, blue primaries as CIE xy, white point, tone curve: "srgb" or a gamma)
SPACES = {
    "Display P3": (((0.680, 0.320), (0.265, 0.690), (0.150, 0.060)), D65, "srgb"),
    "Adobe RGB (1998)": (((0.640, 0.330), (0.210, 0.710), (0.150, 0.060)), D65, 563 / 256),
    "ProPhoto RGB": (((0.7347, 0.2653), (0.1596, 0.8404), (0.0366, 0.0001)), D50, 1.8),
}
SRGB = (((0.640, 0.330), (0.300, 0.600), (0.150, 0.060)), D65, "srgb")
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


def xyz(xy) -> np.ndarray:
    return np.array([xy[0] / xy[1], 1.0, (1 - xy[0] - xy[1]) / xy[1]])


def to_xyz_d50(primaries, white) -> np.ndarray:
    """The space's linear RGB -> XYZ matrix, adapted to D50 (Bradford), as an ICC profile's colorants are."""
    p = np.stack([xyz(c) for c in primaries], axis=1)
    matrix = p * np.linalg.solve(p, xyz(white))
    cone = BRADFORD @ xyz(D50) / (BRADFORD @ xyz(white))
    return np.linalg.inv(BRADFORD) @ np.diag(cone) @ BRADFORD @ matrix


def decoded(values: np.ndarray, curve) -> np.ndarray:
    v = values / 255.0
    if curve == "srgb":
        return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    return v ** curve


def encoded(linear: np.ndarray, curve) -> np.ndarray:
    v = np.clip(linear, 0.0, 1.0)
    v = np.where(v <= 0.0031308, 12.92 * v, 1.055 * v ** (1 / 2.4) - 0.055) if curve == "srgb" else v ** (1 / curve)
    return np.round(255 * v).astype(np.uint8)


def icc_profile(name: str, primaries, white, curve) -> bytes:
    """An ICC v2 display profile (matrix and tone curves), the kind a camera or an editor embeds."""
    def s15(values) -> bytes:
        return b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    def padded(data: bytes) -> bytes:
        return data + b"\0" * (-len(data) % 4)

    desc = name.encode("ascii") + b"\0"
    tags = {b"desc": b"desc\0\0\0\0" + struct.pack(">I", len(desc)) + desc + b"\0" * 79,
            b"cprt": b"text\0\0\0\0" + b"no copyright, use freely\0",
            b"wtpt": b"XYZ \0\0\0\0" + s15(xyz(D50) * [1, 1, 1])}
    matrix = to_xyz_d50(primaries, white)
    for i, channel in enumerate(b"rgb"):
        tags[bytes([channel]) + b"XYZ"] = b"XYZ \0\0\0\0" + s15(matrix[:, i])
        if curve == "srgb":  # parametric curve type 3: the sRGB formula
            trc = b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + s15([2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045])
        else:
            trc = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(curve * 256))
        tags[bytes([channel]) + b"TRC"] = trc
    offset = 128 + 4 + 12 * len(tags)
    table, body = [], b""
    for signature, data in tags.items():
        table.append(signature + struct.pack(">II", offset + len(body), len(data)))
        body += padded(data)
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"\0\0\0\0" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
              + s15(xyz(D50) * [1, 1, 1]) + b"\0" * 4)
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + b"".join(table) + body


def in_space(srgb_pixels: np.ndarray, space) -> np.ndarray:
    """The same scene's pixel values in ``space``: what a file saved in that colour space holds."""
    primaries, white, curve = space
    to_space = np.linalg.inv(to_xyz_d50(primaries, white)) @ to_xyz_d50(*SRGB[:2])
    return encoded(decoded(srgb_pixels.astype(np.float64), SRGB[2]) @ to_space.T, curve)


def jpeg(pixels: np.ndarray, quality: int = 95, icc: bytes | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, **({"icc_profile": icc} if icc else {}))
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    from PIL import ImageCms

    import featx
    from featx.bench import bench_workspace, machine_description, write_record
    from featx.data import decode_floor, decode_image, load_image, preprocess_image
    from featx.runtime import read_model_info
    from featx.samples import sample_photos

    _, model_file, _ = bench_workspace("featx-colour-profiles-bench-")
    info = read_model_info(model_file)
    cfg = info.preprocess
    engine = featx.load_model(model_file, device="cpu", engine="onnx")

    def embed(files: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        out = engine.encode(np.stack([load_image(f, cfg) for f in files]))
        e = out.embedding / np.linalg.norm(out.embedding, axis=1, keepdims=True)
        return e, out.logits.argmax(axis=1)

    def cosines(a: np.ndarray, b: np.ndarray) -> dict:
        c = (a * b).sum(axis=1)
        return {"min": float(c.min()), "median": float(np.median(c)), "max": float(c.max())}

    photos = {name: np.asarray(img) for name, img in sample_photos().items()}
    names = list(photos)
    srgb_files = [jpeg(p) for p in photos.values()]
    reference, reference_top = embed(srgb_files)
    srgb = ImageCms.createProfile("sRGB")
    record = {"machine": machine_description(), "command": "python benchmarks/colour_profiles.py",
              "model": info.backbone, "photos": names,
              "jpeg_reencode": {f"quality {q}": cosines(embed([jpeg(p, q) for p in photos.values()])[0], reference)
                                for q in (90, 75)},
              "as_featx_reads": {}, "colour_managed": {}}
    for space_name, space in SPACES.items():
        icc = icc_profile(space_name, *space)
        files = [jpeg(in_space(p, space), icc=icc) for p in photos.values()]
        as_read, top = embed(files)
        changed = [f"{names[i]}: {info.class_names[reference_top[i]]} -> {info.class_names[top[i]]}"
                   for i in np.flatnonzero(top != reference_top)]
        record["as_featx_reads"][space_name] = {**cosines(as_read, reference), "top_class_changed": changed}
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        transform = ImageCms.buildTransform(profile, srgb, "RGB", "RGB")
        converted, seconds = [], 0.0
        for f in files:
            img = decode_image(f, min_size=decode_floor(cfg))  # featx's decode, at the size it decodes to
            t0 = time.perf_counter()
            img = ImageCms.applyTransform(img, transform)
            seconds += time.perf_counter() - t0
            converted.append(preprocess_image(img, cfg))
        out = engine.encode(np.stack(converted)).embedding
        record["colour_managed"][space_name] = {
            **cosines(out / np.linalg.norm(out, axis=1, keepdims=True), reference),
            "ms_per_photo": 1000 * seconds / len(files)}
    write_record(record, args.out, "colour_profiles-cpu")


if __name__ == "__main__":
    main()
