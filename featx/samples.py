"""Real photos that install with featx's dependencies (scikit-learn and scikit-image samples).

Used as the bundled demo data, as the check images of an export, and by tests and benchmarks.
Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def sample_photos() -> dict[str, Image.Image]:
    """name -> RGB photo: china and flower (scikit-learn), coffee, chelsea, astronaut, rocket (scikit-image)."""
    import importlib.util

    import skimage.data

    # located, not imported: importing scikit-learn took 2 s of a CPU calibration's first 10
    folder = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0]) / "datasets" / "images"
    photos = {name: Image.open(folder / f"{name}.jpg").convert("RGB") for name in ("china", "flower")}
    for name in ("coffee", "chelsea", "astronaut", "rocket"):
        photos[name] = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    return photos


def write_sample_photos(folder: str | Path) -> list[Path]:
    """Write the sample photos into ``folder`` (JPEGs as they ship, the others as PNG); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, img in sample_photos().items():
        path = folder / (f"{name}.jpg" if name in ("china", "flower") else f"{name}.png")
        img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)
        paths.append(path)
    return paths


def camera_sized_photo(size: tuple[int, int] = (4032, 3024), seed: int = 0) -> Image.Image:
    """A (w, h) RGB picture with real detail in every pixel, like a phone camera's: a mosaic of the
    sample photos, scikit-image's larger pictures (retina, Hubble deep field, stereo motorcycle) and
    its grass, gravel and brick textures, each tile cut at native resolution (nothing is upscaled)."""
    import numpy as np
    import skimage.data

    pictures = [np.asarray(p) for p in sample_photos().values()]
    for name in ("retina", "hubble_deep_field", "stereo_motorcycle"):
        picture = getattr(skimage.data, name)()
        pictures.append(np.asarray(picture[0] if isinstance(picture, tuple) else picture))  # stereo: the left view
    pictures += [np.repeat(getattr(skimage.data, name)()[..., None], 3, axis=2) for name in ("grass", "gravel", "brick")]
    rng = np.random.default_rng(seed)
    w, h = size
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    y = 0
    while y < h:
        x, row_h = 0, int(rng.integers(250, 500))
        while x < w:
            src = pictures[int(rng.integers(len(pictures)))]
            th, tw = min(row_h, src.shape[0], h - y), min(int(rng.integers(250, 600)), src.shape[1], w - x)
            sy, sx = int(rng.integers(0, src.shape[0] - th + 1)), int(rng.integers(0, src.shape[1] - tw + 1))
            canvas[y:y + th, x:x + tw] = src[sy:sy + th, sx:sx + tw]
            x += tw
        y += row_h
    return Image.fromarray(canvas)


def write_digits_folder(folder: str | Path, *, size: int = 64, limit: int | None = None) -> Path:
    """scikit-learn's 1,797 labelled digits as a class-per-folder tree of PNGs (``folder/3/0042.png``).

    The 8x8 images (values 0..16) are scaled to ``size`` pixels, white digit on black.
    """
    import numpy as np
    import sklearn.datasets

    folder = Path(folder)
    digits = sklearn.datasets.load_digits()
    n = len(digits.images) if limit is None else min(limit, len(digits.images))
    for i in range(n):
        label = int(digits.target[i])
        pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR)
        out = folder / str(label) / f"{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out)
    return folder


def write_jpeg_folder(folder: str | Path, n: int, *, size: tuple[int, int] = (500, 375), quality: int = 90,
                      classes: int = 4, seed: int = 0, processes: int | None = None) -> Path:
    """``n`` realistic JPEGs (random crops of the sample photos, ``size`` pixels, given quality) in ``classes`` folders."""
    import concurrent.futures as cf
    import os

    folder = Path(folder)
    processes = processes or os.cpu_count() or 1
    step = max(1, -(-n // processes))
    jobs = [(folder, start, min(n, start + step), size, quality, classes, seed) for start in range(0, n, step)]
    if len(jobs) == 1:
        _write_jpegs(*jobs[0])
    else:
        with cf.ProcessPoolExecutor(len(jobs)) as pool:
            list(pool.map(_write_jpegs, *zip(*jobs)))
    return folder


def _write_jpegs(folder: Path, start: int, stop: int, size, quality: int, classes: int, seed: int) -> None:
    import numpy as np

    photos = list(sample_photos().values())
    for i in range(start, stop):
        crop = random_crop(photos[i % len(photos)], np.random.default_rng([seed, i]), size)
        out = folder / f"class_{i % classes}" / f"img_{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        crop.save(out, quality=quality)


def random_crop(photo: Image.Image, rng, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A ``size`` (w, h) crop of ``photo`` enlarged 1 to 1.6 times (at least to ``size``), mirrored half
    the time: another view of the same picture, as a folder of photos of one subject holds."""
    w, h = size
    scale = rng.uniform(1.0, 1.6)
    big = photo.resize((int(max(w, photo.width) * scale), int(max(h, photo.height) * scale)), Image.BILINEAR)
    x = int(rng.integers(0, big.width - w + 1))
    y = int(rng.integers(0, big.height - h + 1))
    crop = big.crop((x, y, x + w, y + h))
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop
