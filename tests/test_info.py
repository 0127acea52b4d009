"""`featx info`: what a featx file holds, on a cache of real photos embedded with the real default model."""

import csv
import re
import shutil

from PIL import Image

import featx
from featx.cli import main


def test_info_copies_lists_every_picture_stored_more_than_once_with_its_files(photos_dir, lite0_onnx, tmp_path,
                                                                            capsys):
    """The summary counts copies and near copies; --copies names them. A photo, the same file copied
    beside it, and the photo resized and saved again as JPEG in another folder are one picture of three
    files; the other photos are not listed."""
    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    shutil.copy(photos_dir / "coffee.png", folder / "a" / "coffee.png")
    shutil.copy(photos_dir / "coffee.png", folder / "a" / "coffee-again.png")
    with Image.open(photos_dir / "coffee.png") as im:
        im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(folder / "b" / "coffee-small.jpg", quality=90)
    shutil.copy(photos_dir / "china.jpg", folder / "a" / "china.jpg")
    shutil.copy(photos_dir / "astronaut.png", folder / "b" / "astronaut.png")
    (folder / "b" / "broken.jpg").write_bytes((photos_dir / "china.jpg").read_bytes()[:2000])
    cache = tmp_path / "photos.h5"
    featx.embed_folder(folder, cache, model=lite0_onnx, engine="onnx", workers=0)

    said = featx.describe_file(cache, list_copies=True).splitlines()
    start = said.index("  1 picture stored more than once (3 images), each under its first file:")
    assert said[start + 1] == "    a/coffee-again.png"  # the first of its files in the folder's order
    assert said[start + 2] == "      a/coffee.png  (the same bytes)"
    assert said[start + 3].startswith("      b/coffee-small.jpg  (near copy, ") and "of 64 bits apart)" in said[start + 3]
    assert len(said) == start + 4  # china and the astronaut are pictures of their own
    summary = featx.describe_file(cache)
    assert "stored more than once" not in summary and "(--copies names them)" in summary  # only when asked

    assert main(["info", str(cache), "--copies"]) == 0
    assert "      a/coffee.png  (the same bytes)" in capsys.readouterr().out

    # the lists as CSV, for a script that deletes the copies or a spreadsheet: named in the text in their place
    assert main(["info", str(cache), "--copies", "-o", str(tmp_path / "copies.csv")]) == 0
    out = capsys.readouterr().out
    assert f"1 picture stored more than once (3 images)\n    (their files: {tmp_path / 'copies.csv'})" in out
    assert "a/coffee.png" not in out
    with open(tmp_path / "copies.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["picture"], r["key"], r["copy"]) for r in rows] == [
        ("a/coffee-again.png", "a/coffee-again.png", "first"), ("a/coffee-again.png", "a/coffee.png", "same bytes"),
        ("a/coffee-again.png", "b/coffee-small.jpg", "near copy")]
    assert [r["bits_apart"] for r in rows] == ["0", "0", re.search(r"near copy, (\d+) of", said[start + 3])[1]]
    assert {r["model"] for r in rows} == {featx.load_embeddings(cache).model}
    assert main(["info", str(cache), "--failures", "-o", str(tmp_path / "failures.csv")]) == 0
    assert f"(every file and why: {tmp_path / 'failures.csv'})" in capsys.readouterr().out
    with open(tmp_path / "failures.csv", newline="") as f:
        (failure,) = list(csv.DictReader(f))
    assert failure["key"] == "b/broken.jpg" and failure["reason"]
    assert main(["info", str(cache), "-o", str(tmp_path / "what.csv")]) == 2
    assert "-o writes one list as CSV: give it --copies or --failures" in capsys.readouterr().err
    assert not (tmp_path / "what.csv").exists()
    # -o naming the cache itself (a slip of the shell's history) would write a CSV over its embeddings
    assert main(["info", str(cache), "--copies", "-o", str(cache)]) == 2
    assert "is an embedding cache; writing .csv over it would lose its embeddings" in capsys.readouterr().err
    assert featx.describe_file(cache, list_copies=True).splitlines() == said


def test_info_says_when_a_model_file_pads_per_call(lite0_onnx, lite0_backbone, tmp_path):
    """A file an earlier featx exported outside models/ is not refreshed by itself: info says why to
    export it again."""
    old = tmp_path / "lite0-2026-11.onnx"
    featx.export_onnx(lite0_backbone, old, fixed_padding=False)
    assert "worked out at every call" in featx.describe_file(old)
    assert "every call" not in featx.describe_file(lite0_onnx)
    assert featx.describe_file(lite0_onnx).startswith(f"{lite0_onnx}: efficientnet_lite0")



def test_info_knows_a_model_or_a_head_by_its_content_whatever_its_name(digits_cache, lite0_onnx, tmp_path, capsys):
    """--model takes a model file of any name, and a download or a copy may lose its suffix: `featx info`
    refused model.bin and head.bin as "not a featx file". A file that is none of them still is."""
    from featx.heads import LogRegHead, save_head

    data = featx.load_embeddings(digits_cache)
    save_head(LogRegHead(C=1.0).fit(data.embeddings[:200], data.labels[:200]), tmp_path / "head.bin",
              fingerprint=data.fingerprint, backbone="efficientnet_lite0", model=data.model)
    shutil.copy(lite0_onnx, tmp_path / "model.bin")
    assert featx.describe_file(tmp_path / "model.bin") == f"{tmp_path / 'model.bin'}: " + \
        featx.describe_file(lite0_onnx).split(": ", 1)[1]
    assert featx.describe_file(tmp_path / "head.bin").startswith(f"{tmp_path / 'head.bin'}: LogRegHead for 2 classes")
    (tmp_path / "notes.bin").write_text("not a model")
    assert main(["info", str(tmp_path / "notes.bin")]) == 2
    assert "notes.bin: not a featx file" in capsys.readouterr().err


def test_info_copies_sheet_draws_each_picture_stored_more_than_once(photos_dir, lite0_onnx, tmp_path, capsys):
    """`info --copies --sheet copies.png`: what to keep and what to delete, seen: a row of thumbnails per
    picture stored more than once (2.2 x 2.6 inches a tile at 100 dpi), drawn from the files; not drawn
    where there is nothing to draw or the folder is not here, and refused without --copies."""
    import numpy as np

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("coffee.png", "china.jpg", "chelsea.png"):
        shutil.copy(photos_dir / name, folder / name)
    shutil.copy(photos_dir / "coffee.png", folder / "coffee copy.png")
    with Image.open(photos_dir / "china.jpg") as im:
        im.resize((im.width // 3, im.height // 3), Image.LANCZOS).save(folder / "china-small.jpg", quality=80)
    cache = tmp_path / "photos.h5"
    featx.embed_folder(folder, cache, model=lite0_onnx, progress=False)
    sheet = tmp_path / "copies.png"
    assert main(["info", str(cache), "--copies", "--sheet", str(sheet)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"-> {sheet}"
    with Image.open(sheet) as img:  # two pictures, two files each
        assert img.size == (2 * 220, 2 * 260 + 50)
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 1000  # photos, drawn
    assert main(["info", str(cache), "--sheet", str(tmp_path / "x.png")]) == 2
    assert "--sheet draws the --copies list: give it --copies" in capsys.readouterr().err
    sheet.unlink()
    folder.rename(tmp_path / "elsewhere")
    assert "-> " not in featx.describe_file(cache, list_copies=True, sheet=sheet) and not sheet.exists()
