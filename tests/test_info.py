"""`featx info`: what a featx file holds, on a cache of real photos embedded with the real default model."""

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
