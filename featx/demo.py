"""The main job end to end on the default model and bundled data: what the README's first command runs."""

from __future__ import annotations

import logging
from pathlib import Path

_logger = logging.getLogger(__name__)


def run_demo(folder: str | Path = "demo", *, device: str = "auto", progress: bool = True) -> dict:
    """Classify sample photos, embed the digits folder into a cache, train a head, plot its confusion matrix,
    list the held-out digits it got wrong, and give the head the photos (marked unlike its training images).

    Everything is written under ``folder``; a second run reuses the cache (only new images are embedded).
    Returns the figures it printed.
    """
    from .backbones import DEFAULT_BACKBONE
    from .errors import check_writable_folder
    from .export import ensure_model_file
    from .heads import train_head
    from .pipeline import classify, embed_folder
    from .predictions import predict
    from .samples import write_digits_folder, write_sample_photos

    folder = Path(folder)
    check_writable_folder(folder, create=True)
    model_file = ensure_model_file(DEFAULT_BACKBONE)
    print(f"1. ImageNet classes of sample photos, through {model_file}:")
    photos = write_sample_photos(folder / "photos")
    for r in classify(photos, model=model_file, top=3, device=device):
        print(f"   {Path(r.path).name:14s} " + "  ".join(f"{name} {p * 100:.1f}%" for name, p in r.top))

    digits = folder / "digits"
    if not digits.exists():
        write_digits_folder(digits, size=64)
    cache = folder / "digits.h5"
    print(f"2. Embedding {digits} (1,797 labelled images, a folder per class) into {cache}:")
    stats = embed_folder(digits, cache, model=model_file, device=device, progress=progress)
    print(f"   {stats.summary()}")

    print("3. Logistic-regression head on the cached embeddings, held-out stratified 20%:")
    report = train_head(cache, folder / "digits-logreg.safetensors", head="logreg",
                        mistakes_csv=folder / "digits-mistakes.csv")
    print("   " + report.text().replace("\n", "\n   "))

    print("4. The digits head given the sample photos, nothing like a digit (its probabilities cannot say so):")
    head = folder / "digits-logreg.safetensors"
    photo_rows = predict(photos, head=head, model=model_file, top=1, device=device)
    for r in photo_rows:
        print(f"   {Path(r.key).name:14s} " + r.line().split("  ", 1)[1])
    return {"accuracy": report.accuracy, "embedded": stats.n_embedded, "cached": stats.n_cached, "files": report.files,
            "photos_unlike_training": sum(bool(r.unlike_training) for r in photo_rows)}
