"""Images unlike a head's training images: what `featx predict` marks, against a low top probability.

    python benchmarks/unlike_training.py [--out benchmarks/results/cpu]

A logistic-regression head (train-head's, C by cross-validation) is fit on 80% of scikit-learn's 1,797
digits (64 px, white on black, through the default model), then given:
- ``held-out digits``: the other 20%, as the head will mostly meet;
- the same held-out digits changed as a new source would change them: ``black on white`` (inverted),
  ``turned 90°``, ``small in a large frame`` (24 px in the middle of 104), ``blurred`` (down to 8 px and up);
- ``photos``: 120 crops of the scikit-learn and scikit-image sample photos (500x375 JPEGs).

Then a head of six photo classes (60 crops of each sample photo: china, flower, coffee, chelsea,
astronaut, rocket; 80% trained), given the held-out crops and 10 crops of each of nine other
scikit-image pictures (camera, horse, coins, page, brick, grass, hubble_deep_field, immunohistochemistry,
retina): ``photo_classes``.

For each set: the share featx marks unlike the training images (cosine to the nearest class mean under
what 99% of the training images reach, each left out of its class's mean), the share a check on the
head's own confidence marks (top probability under the cut-off that marks as many held-out digits as
featx does), the mean top probability, and the accuracy on the images marked and on the rest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def changed_digits(images: list, kind: str) -> list:
    from PIL import Image, ImageFilter, ImageOps

    if kind == "black on white":
        return [ImageOps.invert(im) for im in images]
    if kind == "turned 90°":
        return [im.rotate(90) for im in images]
    if kind == "small in a large frame":
        return [ImageOps.expand(im.resize((24, 24), Image.LANCZOS), 40) for im in images]
    if kind == "blurred":
        return [im.resize((8, 8), Image.BILINEAR).resize(im.size, Image.BILINEAR).filter(ImageFilter.BLUR)
                for im in images]
    raise ValueError(kind)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()

    from PIL import Image

    import featx
    from featx.bench import machine_description, scratch_folder, write_record
    from featx.heads import TYPICAL_SHARE, stratified_split
    from featx.samples import write_digits_folder, write_jpeg_folder

    tmp = scratch_folder("featx-unlike-bench-")
    model = featx.ensure_model_file(featx.DEFAULT_BACKBONE, models_dir=tmp / "models")
    folder = write_digits_folder(tmp / "digits")
    featx.embed_folder(folder, tmp / "digits.h5", model=model, progress=True)
    data = featx.load_embeddings(tmp / "digits.h5")
    classes = np.array(data.class_names)[data.labels]
    train, test = stratified_split(classes, 0.2, 0)
    head = featx.LogRegHead().fit(data.embeddings[train], classes[train])

    held_out = [Image.open(folder / key).convert("RGB") for key in np.array(data.keys)[test]]
    truth = classes[test]
    sets = {"held-out digits": (data.embeddings[test], truth)}
    for kind in ("black on white", "turned 90°", "small in a large frame", "blurred"):
        sets[kind] = (featx.embed_images(changed_digits(held_out, kind), model=model), truth)
    photos = write_jpeg_folder(tmp / "photos", 120)
    sets["photos"] = (featx.embed_images(sorted(photos.rglob("*.jpg")), model=model), None)

    top_of = {name: head.predict_proba(X).max(axis=1) for name, (X, _) in sets.items()}
    marked_held_out = head.unlike_training(sets["held-out digits"][0])
    # the confidence cut-off that marks as many held-out digits as featx does: the same false alarms
    confidence_cut = float(np.quantile(top_of["held-out digits"], marked_held_out.mean()))
    record: dict = {"machine": machine_description(), "model": featx.DEFAULT_BACKBONE, "n_train": len(train),
                    "typical_share": TYPICAL_SHARE, "typical_cosine": head.typical_cosine_,
                    "confidence_cut": confidence_cut, "sets": {}}
    for name, (X, labels) in sets.items():
        marked = head.unlike_training(X)
        entry = {"n": len(X), "marked_by_featx": float(marked.mean()),
                 "marked_by_low_confidence": float(np.mean(top_of[name] < confidence_cut)),
                 "mean_top_probability": float(top_of[name].mean()),
                 "class_mean_cosine_median": float(np.median(head.class_mean_cosine(X)))}
        if labels is not None:
            right = head.predict(X) == labels
            entry["accuracy"] = float(right.mean())
            entry["accuracy_marked"] = float(right[marked].mean()) if marked.any() else None
            entry["accuracy_not_marked"] = float(right[~marked].mean()) if (~marked).any() else None
        record["sets"][name] = entry
    record["photo_classes"] = photo_classes(model)
    write_record(record, args.out, "unlike_training-digits")
    plot(record, Path(args.out) / "unlike_training-digits.png")


OTHER_PICTURES = ("camera", "horse", "coins", "page", "brick", "grass", "hubble_deep_field", "immunohistochemistry",
                  "retina")


def photo_classes(model) -> dict:
    """A head whose classes are six photos (crops of each), given held-out crops and other pictures."""
    import skimage.data
    from PIL import Image

    import featx
    from featx.heads import stratified_split
    from featx.samples import random_crop, sample_photos

    rng = np.random.default_rng(0)
    names, crops = [], []
    for name, photo in sample_photos().items():
        crops += [random_crop(photo, rng) for _ in range(60)]
        names += [name] * 60
    X, names = featx.embed_images(crops, model=model), np.array(names)
    train, test = stratified_split(names, 0.2, 0)
    head = featx.LogRegHead().fit(X[train], names[train])
    out = {"n_train": len(train), "typical_cosine": head.typical_cosine_,
           "held_out": {"n": len(test), "marked_by_featx": float(head.unlike_training(X[test]).mean()),
                        "accuracy": float(np.mean(head.predict(X[test]) == names[test])),
                        "mean_top_probability": float(head.predict_proba(X[test]).max(axis=1).mean())},
           "other_pictures": {}}
    for name in OTHER_PICTURES:
        a = getattr(skimage.data, name)()
        picture = Image.fromarray(a.astype(np.uint8) * 255 if a.dtype == bool else a).convert("RGB")
        E = featx.embed_images([random_crop(picture, rng) for _ in range(10)], model=model)
        out["other_pictures"][name] = {"n": len(E), "marked_by_featx": float(head.unlike_training(E).mean()),
                                       "mean_top_probability": float(head.predict_proba(E).max(axis=1).mean()),
                                       "class_mean_cosine_median": float(np.median(head.class_mean_cosine(E)))}
    return out


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["sets"])
    x = np.arange(len(names))
    fig, (ax, right) = plt.subplots(1, 2, figsize=(15, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for offset, key, label in ((-0.2, "marked_by_featx", "featx: unlike the training images"),
                               (0.2, "marked_by_low_confidence", "top probability under the same false-alarm cut")):
        values = [record["sets"][n][key] * 100 for n in names]
        bars = ax.bar(x + offset, values, 0.4, label=label)
        ax.bar_label(bars, fmt="%.0f%%", fontsize=8)
    ax.set_xticks(x, [f"{n}\n(accuracy {record['sets'][n]['accuracy']:.2f})" if "accuracy" in record["sets"][n]
                      else n for n in names], fontsize=8)
    ax.set_ylabel("% of the images marked")
    ax.set_ylim(0, 110)
    ax.set_title(f"A digits head ({record['n_train']} digits, {record['model']}) given other images", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    photos = record["photo_classes"]
    rows = {"held-out crops": photos["held_out"], **photos["other_pictures"]}
    bars = right.bar(np.arange(len(rows)), [r["marked_by_featx"] * 100 for r in rows.values()], 0.6,
                     color="tab:blue")
    right.bar_label(bars, labels=[f"{r['mean_top_probability']:.2f}" for r in rows.values()], fontsize=7)
    right.set_xticks(np.arange(len(rows)), [n.replace("_", " ") for n in rows], rotation=40, ha="right", fontsize=8)
    right.set_ylim(0, 110)
    right.set_title(f"A head of six photos ({photos['n_train']} crops) given other pictures\n"
                    "(% marked unlike; above each bar the mean top probability)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
