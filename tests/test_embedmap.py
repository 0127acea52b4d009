"""The embedding map: a picture of a real cache, and a number that says whether its classes separate."""

import h5py
import numpy as np
import pytest
from PIL import Image

import featx


@pytest.mark.slow
def test_digits_map_shows_separate_classes_and_a_shuffled_cache_does_not(digits_cache, tmp_path):
    result = featx.plot_embeddings(digits_cache, tmp_path / "map.png", max_points=600)
    # 1,797 rows sampled to about 600, every digit in its share
    assert 590 <= len(result.keys) <= 610 and result.n_total == 1797 and result.points.shape == (len(result.keys), 2)
    counts = np.bincount(result.labels, minlength=10)
    assert counts.min() >= 55 and counts.max() <= 65
    # Lite0's embeddings of digits: most images sit next to their own class; chance is about 1 in 10
    assert result.neighbour_agreement > 0.8 and abs(result.chance_agreement - 0.1) < 0.01
    assert "nearest neighbour of the same class" in result.text()
    width, height = Image.open(result.png).size
    assert width > 600 and height > 600 and result.png.stat().st_size > 30_000
    # the title (its figure line names the near copies) is wrapped inside the picture, not cut at its edges
    assert result.n_near_copies and len(result.agreement()) > 100
    band = np.asarray(Image.open(result.png).convert("L"))[: height // 12]
    assert band[:, :3].min() > 240 and band[:, -3:].min() > 240

    # the same embeddings with their labels shuffled: the figure falls to chance
    shuffled = tmp_path / "shuffled.h5"
    shuffled.write_bytes(digits_cache.read_bytes())
    with h5py.File(shuffled, "r+") as f:
        (group,) = [g for g in f.values() if "labels" in g]
        group["labels"][...] = np.random.default_rng(0).permutation(group["labels"][...])
    noise = featx.plot_embeddings(shuffled, tmp_path / "noise.png", method="pca", max_points=600)
    assert noise.neighbour_agreement < 0.2 and noise.method == "PCA"


def test_unlabelled_cache_is_drawn_without_a_class_figure(small_digits, tmp_path, lite0_onnx, capsys):
    loose = tmp_path / "loose"
    loose.mkdir()
    for path in sorted(small_digits.rglob("*.png"))[:12]:
        path.rename(loose / f"{path.parent.name}-{path.name}")
    featx.embed_folder(loose, tmp_path / "c.h5", model=lite0_onnx)
    from featx.cli import main

    assert main(["map", str(tmp_path / "c.h5"), "--method", "pca"]) == 0  # the PNG goes next to the cache
    out = capsys.readouterr().out
    assert f"PCA map of 12 embeddings -> {tmp_path / 'c.map.png'}" in out and "nearest neighbour" not in out
    assert (tmp_path / "c.map.png").stat().st_size > 10_000
    with pytest.raises(featx.FeatxError, match=r"rows must increase within 0\.\.11"):
        featx.load_embeddings(tmp_path / "c.h5", rows=[5, 3])
    with pytest.raises(featx.FeatxError, match="expected tsne or pca"):
        featx.plot_embeddings(tmp_path / "c.h5", tmp_path / "x.png", method="umap")


def test_copies_in_a_class_do_not_lift_the_neighbour_figure(small_digits, tmp_path, lite0_onnx):
    """The same photo twice in a class would be its own nearest neighbour: copies count once, so the
    figure is the one the folder gives without them."""
    import shutil

    cache = tmp_path / "c.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    before = featx.plot_embeddings(cache, tmp_path / "before.png", method="pca")
    for path in sorted(small_digits.rglob("*.png")):  # every photo exported twice into its own class
        shutil.copy(path, path.with_name("copy-" + path.name))
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    after = featx.plot_embeddings(cache, tmp_path / "after.png", method="pca")
    assert (after.n_total, len(after.keys), after.n_copies) == (120, 60, 60)
    assert after.neighbour_agreement == before.neighbour_agreement < 1.0
    assert "PCA map of 120 embeddings (60 copies of other images left out)" in after.text()
    # each photo saved again at 40 pixels (other bytes, the same picture): each would be its twin's
    # nearest neighbour (the figure 1.0); a picture's copies are not each other's neighbours
    for path in sorted(small_digits.rglob("[0-9]*.png")):
        Image.open(path).resize((40, 40)).save(path.with_name("resized-" + path.name))
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    resized = featx.plot_embeddings(cache, tmp_path / "resized.png", method="pca")
    assert len(resized.keys) == 120 and resized.n_near_copies >= 120
    assert abs(resized.neighbour_agreement - before.neighbour_agreement) < 0.05
    assert "a picture's copies are not each other's neighbours" in resized.text()
