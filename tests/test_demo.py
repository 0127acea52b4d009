"""The README's main command, `featx demo`, as a user runs it: real weights, sample photos, the digits."""

import csv

import pytest

from featx.cli import main


@pytest.mark.slow
def test_the_demo_classifies_the_photos_trains_a_head_and_marks_the_photos_unlike_its_digits(
        lite0_onnx, tmp_path, monkeypatch, capsys):
    """What the README's first command promises: the coffee photo is an espresso, the china one a palace;
    the digits are embedded once (a second run embeds nothing), the head scores over 0.95 on held-out
    digits, its mistakes are listed and drawn; given the photos, the head names a digit for each, sure of
    it, and every one is marked unlike its training images."""
    monkeypatch.setenv("FEATX_MODELS", str(lite0_onnx.parent))  # the exported default model, not a new export
    folder = tmp_path / "demo"
    assert main(["-q", "demo", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    first = out.split("\n2. ")[0].splitlines()[1:]  # step 1: the photos' ImageNet classes
    lines = {line.split()[0]: line for line in first}
    assert "espresso" in lines["coffee.png"].split("%")[0] and "palace" in lines["china.jpg"].split("%")[0]
    accuracy = float(out.split("logreg: accuracy ")[1].split(",")[0])
    assert accuracy > 0.95
    with open(folder / "digits-mistakes.csv") as f:
        mistakes = list(csv.DictReader(f))
    assert 0 < len(mistakes) <= 360 * (1 - accuracy) + 0.5
    assert (folder / "digits-logreg.mistakes.png").stat().st_size > 10_000
    photos = out.split("4. ")[1].splitlines()[1:]
    assert len(photos) == 6 and all(line.endswith("(unlike the training images: a guess)") for line in photos)
    assert all(float(line.split()[2].rstrip("%")) > 90 for line in photos)  # the head is sure all the same
    assert main(["-q", "demo", "--dir", str(folder)]) == 0
    assert "0 embedded, 1797 already cached" in capsys.readouterr().out
