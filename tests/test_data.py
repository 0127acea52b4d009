"""Bad and unusual images: each is converted, or skipped with a reason; nothing ends a run."""

import io
import os

import numpy as np
import pytest
from PIL import Image

import featx
from featx.backbones import PreprocessConfig
from featx.data import decode_image, load_batch, walk_images, WalkFailure
from featx.errors import ImageError

CFG = PreprocessConfig((32, 32), 36, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")


@pytest.fixture
def coffee(photos_dir):
    return Image.open(photos_dir / "coffee.png").convert("RGB")


def test_truncated_jpeg_is_refused_with_reason(tmp_path, coffee):
    buf = io.BytesIO()
    coffee.save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated|cannot decode"):
        decode_image(path)


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b"hello, I am text\n", "not an image")])
def test_empty_and_text_files_named_jpg(tmp_path, content, reason):
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        decode_image(path)


def _serve_through_a_pipe(path, chunks, *, hold_open=False):
    """A FIFO at ``path`` whose writer sends ``chunks`` one by one (a file still growing: its stat says
    size 0), then closes, or with ``hold_open`` keeps it open until the returned event is set."""
    import threading

    os.mkfifo(path)
    release = threading.Event()

    def write():
        with open(path, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                f.flush()
            if hold_open:
                release.wait(30)

    threading.Thread(target=write, daemon=True).start()
    return release


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_file_longer_than_its_stat_said_is_read_whole(tmp_path, coffee):
    """The decoder sizes its buffer from the stat; bytes that arrive past it (a file still being
    written) are read too, not cut off into a 'truncated' failure, and the digest covers them all."""
    from featx.data import content_digest, read_image_file

    buf = io.BytesIO()
    coffee.save(buf, "PNG")
    data = buf.getvalue()
    _serve_through_a_pipe(tmp_path / "growing.png", [data[:20], data[20:5000], data[5000:]])
    got = read_image_file(tmp_path / "growing.png")
    assert bytes(got) == data and content_digest(got) == content_digest(data)
    np.testing.assert_array_equal(np.asarray(decode_image(bytes(got))), np.asarray(coffee))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_non_image_is_refused_from_its_first_bytes_without_reading_on(tmp_path):
    """A stray video or archive named .jpg is refused from its first 32 bytes: the rest (gigabytes,
    maybe) is never read. The pipe's writer holds it open after those bytes, so reading on would hang."""
    import concurrent.futures as cf

    from featx.data import read_image_file

    release = _serve_through_a_pipe(tmp_path / "movie.jpg", [b"\x00\x00\x00\x18ftypmp42" + bytes(20)],
                                    hold_open=True)
    with cf.ThreadPoolExecutor(1) as pool:
        attempt = pool.submit(read_image_file, tmp_path / "movie.jpg")
        try:
            with pytest.raises(ImageError, match="not an image"):
                attempt.result(timeout=20)
        finally:
            release.set()


def test_pixel_limit_refuses_decompression_bombs(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (4000, 3000)).save(path)  # a few kB on disk, 12 Mpx decoded
    with pytest.raises(ImageError, match="over the limit of 1,000,000"):
        decode_image(path, max_pixels=1_000_000)
    assert decode_image(path).size == (4000, 3000)


def test_decoding_images_shows_another_librarys_warning_once_as_python_does(tmp_path, coffee):
    """featx ignores Pillow's 89-megapixel warning; setting and restoring a filter around each image reset
    Python's record of warnings shown, and a library's once-only warning came back at every image."""
    import warnings

    from featx.data import load_image

    coffee.save(tmp_path / "coffee.jpg")
    cfg = PreprocessConfig((224, 224), 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")  # once per place, as Python shows a UserWarning
        load_image(tmp_path / "coffee.jpg", cfg)
        for _ in range(3):
            warnings.warn("a library's warning", UserWarning)
            load_image(tmp_path / "coffee.jpg", cfg)
    assert [str(w.message) for w in shown] == ["a library's warning"]


def test_max_pixels_is_the_limit_even_above_pillows_own(tmp_path, coffee):
    """Pillow refuses any image over 179 million pixels by itself; a user who raises --max-pixels for a
    panorama gets it embedded, and one under the default limit is refused in featx's words, unless it is
    a JPEG decoded at reduced scale (a 150-megapixel medium-format photo was refused, though it decodes
    at 1/8 of that)."""
    from featx.data import load_image

    pano = coffee.convert("L").resize((15000, 12000), Image.NEAREST)  # 180 million pixels
    pano.save(tmp_path / "pano.jpg", quality=50)
    coffee.convert("L").resize((1500, 1200)).save(tmp_path / "small.jpg", quality=50)
    cfg = PreprocessConfig((224, 224), 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")

    big = load_image(tmp_path / "pano.jpg", cfg, max_pixels=200_000_000)
    assert np.abs(big.astype(int) - load_image(tmp_path / "small.jpg", cfg)).mean() < 2  # the same picture
    # a JPEG that large decodes at 1/8 scale (1875x1500): the limit is on what is decoded, so it is taken;
    # a PNG has no reduced decode, and is refused
    assert np.abs(load_image(tmp_path / "pano.jpg", cfg).astype(int) - big).mean() < 1
    pano.save(tmp_path / "pano.png")
    with pytest.raises(ImageError, match=r"^15000x12000 = 180,000,000 pixels is over the limit of 100,000,000 "
                                         r"\(--max-pixels\)$"):
        load_image(tmp_path / "pano.png", cfg)
    with pytest.raises(ImageError, match=r"^15000x12000 = 180,000,000 pixels is over"):
        decode_image(tmp_path / "pano.jpg")  # at full size, as decode_image gives it without min_size
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's limit is back for everyone else


def test_a_strip_that_resizing_would_blow_up_is_refused_at_once(tmp_path, coffee):
    """60000x3 is 180,000 pixels, far under any limit, but its short side resized to 256 made a
    256x5,120,000 picture: 17 s and 5.5 GB for one file (a 200000x2 strip would want some 20 GB, and
    end the run out of memory at the same file on every resume). Refused in one line; a tall photo is not."""
    import time

    from featx.data import load_image

    cfg = PreprocessConfig((224, 224), 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    coffee.resize((60000, 3)).save(tmp_path / "strip.png")
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"^60000x3 resized to 5120000x256 .* = 1,310,720,000 pixels is over the "
                                         r"limit of 100,000,000 \(--max-pixels\)$"):
        load_image(tmp_path / "strip.png", cfg)
    assert time.perf_counter() - start < 2
    coffee.resize((300, 4000)).save(tmp_path / "tall.png")  # a long screenshot: 256x3413 after resizing
    assert load_image(tmp_path / "tall.png", cfg).shape == (224, 224, 3)


@pytest.mark.parametrize("interpolation,resize,crop", [("bicubic", 256, 224), ("bilinear", 232, 224),
                                                        ("bicubic", 342, 299), ("bilinear", 224, 224)])
def test_resize_and_crop_is_torchvisions_on_photos_of_every_shape(photos_dir, interpolation, resize, crop):
    """featx resizes only the crop's region of a photo; the result is torchvision's Resize + CenterCrop of
    the whole photo but for a few pixels a level or three apart (Pillow takes the region in float32, and
    Pillow 13 may run its two passes in the other order), on landscape, portrait, square, shrunk and
    enlarged photos. Another filter moves pixels by 12 to 25 levels, a crop one pixel off by 40 to 200."""
    import torchvision.transforms as T

    from featx.data import preprocess_image

    cfg = PreprocessConfig((crop, crop), resize, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), interpolation)
    reference = T.Compose([T.Resize(resize, interpolation=getattr(T.InterpolationMode, interpolation.upper())),
                           T.CenterCrop(crop)])
    photos = [Image.open(photos_dir / name).convert("RGB") for name in ("china.jpg", "coffee.png", "chelsea.png")]
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (640, 640), (4000, 3000), (227, 300), (150, 90), (1200, 230), (230, 1200)]
    sizes += [tuple(int(v) for v in rng.integers(80, 1500, size=2)) for _ in range(16)]
    share_apart = []
    for i, size in enumerate(sizes):
        photo = photos[i % len(photos)].resize(size, Image.BILINEAR)
        levels = np.abs(preprocess_image(photo, cfg).astype(int) - np.asarray(reference(photo)).astype(int))
        share_apart.append((levels > 0).mean())
        assert levels.max() <= 4 and share_apart[-1] < 0.2, (size, levels.max(), share_apart[-1])
    assert np.mean(share_apart) < 0.05, share_apart  # 0.015 to 0.02 (one pixel in 50) on these photos


def test_alpha_is_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.save(tmp_path / "a.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    for name in ("a.png", "la.png", "p.png"):
        assert np.asarray(decode_image(tmp_path / name)).min() == 255, name


def test_cmyk_and_grayscale_become_rgb(tmp_path, coffee):
    coffee.convert("CMYK").save(tmp_path / "cmyk.jpg")
    coffee.convert("L").save(tmp_path / "gray.png")
    for name in ("cmyk.jpg", "gray.png"):
        img = decode_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == coffee.size
    gray = np.asarray(decode_image(tmp_path / "gray.png"))
    assert (gray[..., 0] == gray[..., 1]).all()


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.png")
    out = np.asarray(decode_image(tmp_path / "deep.png"))[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert 100 < out.mean() < 155  # clipping at 255 would make nearly every pixel 255


def test_a_float_tiff_is_read_on_its_range_not_clipped_black(tmp_path, coffee):
    """A float greyscale TIFF (microscopy, depth, remote sensing; Pillow's mode F) was clipped to 0..255:
    one in 0..1, as scikit-image and tifffile write them, decoded black (the coffee photo: 'nematode
    2.1%'), one of 16-bit values white. 0..1 is read as in-memory float arrays are, 0..255 as it is, and
    any other range stretched from its lowest to its highest value; NaN counts as 0. So is a 32-bit integer
    TIFF (mode I) beyond 0..65535, which was clipped too."""
    grey = np.asarray(coffee.convert("L"))

    def stretched(values):  # lowest to highest onto 0..255
        values = np.nan_to_num(values.astype(np.float64), nan=0.0)
        return np.rint((values - values.min()) * (255.0 / (values.max() - values.min())))

    with_nan = grey.astype(np.float32) * 16.0 - 1000.0
    with_nan[0, :8] = np.nan
    cases = {"unit": (grey / 255.0, grey), "bytes": (grey, grey), "deep": (grey * 257.0, stretched(grey * 257.0)),
             "signed": (with_nan, stretched(with_nan))}
    for name, (values, expected) in cases.items():
        Image.fromarray(values.astype(np.float32)).save(tmp_path / f"{name}.tif")  # mode F
    counts = grey.astype(np.int32) * 1000 - 5000  # 32-bit integers (mode I), beyond 16 bits: clipped white
    Image.fromarray(counts).save(tmp_path / "counts.tif")
    cases["counts"] = (counts, stretched(counts))
    Image.fromarray(np.full((40, 60), 300.0, np.float32)).save(tmp_path / "flat.tif")  # one value: nothing to stretch
    cases["flat"] = (None, np.zeros((40, 60)))
    for name, (values, expected) in cases.items():
        out = np.asarray(decode_image(tmp_path / f"{name}.tif"))
        assert out.shape == expected.shape + (3,) and (out[..., 0] == out[..., 2]).all(), name
        assert np.abs(out[..., 0].astype(int) - expected).max() <= 1, name


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert decode_image(tmp_path / "rot.jpg").size == (20, 40)


def test_png_named_jpg_is_read_by_content(tmp_path, coffee):
    coffee.save(tmp_path / "really_png.jpg", format="PNG")
    assert decode_image(tmp_path / "really_png.jpg").size == coffee.size


def test_batch_with_every_image_bad_does_not_raise(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(b"nope")
        paths.append(str(p))
    paths.append(str(tmp_path / "vanished.jpg"))
    batch = load_batch(paths, CFG)
    assert batch.images.shape == (0, 32, 32, 3) and batch.ok == []
    assert [i for i, _ in batch.failed] == [0, 1, 2, 3]
    assert "no such file" in batch.failed[3][1]


def test_walk_is_sorted_labelled_and_survives_loops_and_odd_names(tmp_path, coffee):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "sub").mkdir(parents=True)
    coffee.save(tmp_path / "b" / "2.png")
    coffee.save(tmp_path / "a" / "sub" / "1.png")
    coffee.save(tmp_path / "top.png")
    coffee.save(tmp_path / "b" / "saved from chrome.jfif", format="JPEG")  # Windows' name for a JPEG
    (tmp_path / "notes.txt").write_text("not an image")
    coffee.save(tmp_path / "a" / "noext", format="PNG")
    os.symlink(tmp_path / "a", tmp_path / "a" / "sub" / "loop")
    odd = os.fsencode(str(tmp_path / "b")) + b"/caf\xe9.png"  # Latin-1 name: not valid UTF-8
    with open(odd, "wb") as f:
        coffee.save(f, format="PNG")
    items = list(walk_images(tmp_path))
    entries = [i for i in items if not isinstance(i, WalkFailure)]
    loops = [i for i in items if isinstance(i, WalkFailure)]
    assert [e.key for e in entries] == ["a/noext", "a/sub/1.png", "b/2.png", "b/caf\udce9.png",
                                        "b/saved from chrome.jfif", "top.png"]
    assert [e.label for e in entries] == ["a", "a", "b", "b", "b", None]
    assert len(loops) == 1 and "symlink loop" in loops[0].reason
    assert decode_image(entries[3].path).size == coffee.size


def test_the_walk_says_how_many_files_of_other_kinds_it_left_out_and_names_camera_raw(tmp_path, coffee, caplog):
    """A photo folder of .NEF originals beside a few JPEGs embedded the JPEGs alone, without a word."""
    (tmp_path / "trip").mkdir()
    coffee.save(tmp_path / "trip" / "IMG_0001.jpg")
    for name in ("DSC_0001.NEF", "DSC_0002.NEF", "IMG_0003.CR2", "clip.mp4", "IMG_0001.jpg.xmp"):
        (tmp_path / "trip" / name).write_bytes(b"II*\x00" + bytes(100))
    (tmp_path / "README").write_text("not an image, no extension")
    with caplog.at_level("INFO", logger="featx.data"):
        assert [e.key for e in walk_images(tmp_path)] == ["trip/IMG_0001.jpg"]
    said = [r.getMessage() for r in caplog.records if "not images" in r.getMessage()]
    assert said == [f"left out 6 file(s) that are not images featx reads under {tmp_path}: .nef 2, (no extension) 1, "
                    ".cr2 1, .mp4 1, .xmp 1; camera RAW (.cr2, .nef) is not read: embed the JPEGs the camera or an "
                    "editor makes of it"]
    caplog.clear()
    with caplog.at_level("INFO", logger="featx.data"):
        assert len(list(walk_images(tmp_path / "trip"))) == 1
    assert "camera RAW" in caplog.text and "(no extension)" not in caplog.text


def _tiff_cut_in_half(coffee) -> bytes:
    """A TIFF whose copy stopped half-way: Pillow warns "Corrupt EXIF data" as it reads the tags, then
    cannot identify it."""
    buf = io.BytesIO()
    coffee.save(buf, "TIFF", compression="tiff_lzw")
    return buf.getvalue()[:len(buf.getvalue()) // 2]


def test_a_damaged_tiff_is_a_failure_with_its_reason_and_no_stray_pillow_warnings(tmp_path, coffee, lite0_onnx):
    """Pillow's warnings on a damaged file name no file, and came on stderr with the path of Pillow's own
    source line ("PIL/TiffImagePlugin.py:982: UserWarning: Corrupt EXIF data ..."), between the bar and
    featx's own line for the file."""
    import subprocess
    import sys

    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "a_cut.tif").write_bytes(_tiff_cut_in_half(coffee))
    coffee.save(folder / "b_whole.tif")
    r = subprocess.run([sys.executable, "-m", "featx", "embed", str(folder), "-o", str(tmp_path / "c.h5"),
                        "--model", str(lite0_onnx)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 embedded, 0 already cached, 1 failed" in r.stdout + r.stderr
    assert "skipped a_cut.tif: cannot decode: cannot identify image file" in r.stderr
    assert "Warning" not in r.stderr and "EXIF" not in r.stderr, r.stderr


def test_libtiffs_own_messages_name_the_files_reason_and_are_not_printed(tmp_path, coffee, lite0_onnx, capfd):
    """libtiff writes its errors and warnings to stderr itself, from C, naming no file: "ZIPDecode: Decoding
    error at scanline 0, invalid distance too far back", a line per damaged strip, among the bar's lines,
    while the file's failure row said only "decoder error -2". Its words are now the row's, and the
    warnings of a TIFF that decodes (a JPEG-compressed one with damaged markers) are not printed."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for compression in ("tiff_lzw", "tiff_adobe_deflate", "jpeg"):
        buf = io.BytesIO()
        coffee.save(buf, "TIFF", compression=compression)
        data = bytearray(buf.getvalue())
        for at in range(2000, 60000, 97):  # damage through the image data, not the tags before it
            data[at] ^= 0x5A
        (folder / f"{compression}.tif").write_bytes(data)
    capfd.readouterr()
    with pytest.raises(ImageError) as said:
        decode_image(folder / "tiff_adobe_deflate.tif")
    assert str(said.value) == ("cannot decode: decoder error -2 (libtiff: ZIPDecode: Decoding error at scanline 0, "
                               "invalid distance too far back)")
    stats = featx.embed_folder(folder, tmp_path / "c.h5", model=lite0_onnx, workers=2)  # decoded in threads
    assert featx.load_failures(tmp_path / "c.h5") == {
        "tiff_adobe_deflate.tif": str(said.value),
        "tiff_lzw.tif": "cannot decode: decoder error -2 (libtiff: Using code not yet in table)"}
    assert stats.n_embedded == 1 and capfd.readouterr().err == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_and_folder(tmp_path, coffee):
    coffee.save(tmp_path / "locked.png")
    os.chmod(tmp_path / "locked.png", 0)
    (tmp_path / "closed").mkdir()
    os.chmod(tmp_path / "closed", 0)
    with pytest.raises(ImageError, match="permission denied"):
        decode_image(tmp_path / "locked.png")
    failures = [i for i in walk_images(tmp_path) if isinstance(i, WalkFailure)]
    assert failures and "cannot be read" in failures[0].reason


def test_camera_sized_jpeg_decodes_at_reduced_scale_and_embeds_like_a_full_decode(tmp_path, lite0_onnx):
    """A 12-megapixel photo is decoded by libjpeg at 1/4 scale (still twice the resize target), upright
    when EXIF says so, and its embedding agrees with the full-resolution decode's."""
    import featx
    from featx.data import load_image, preprocess_image
    from featx.samples import camera_sized_photo

    photo = camera_sized_photo((4032, 3024))
    photo.save(tmp_path / "photo.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "portrait.jpg", quality=92, exif=exif)
    photo.resize((1000, 750)).save(tmp_path / "small.jpg", quality=92)
    assert decode_image(tmp_path / "photo.jpg", min_size=512).size == (1008, 756)
    assert decode_image(tmp_path / "portrait.jpg", min_size=512).size == (756, 1008)
    assert decode_image(tmp_path / "small.jpg", min_size=512).size == (1000, 750)  # less than twice: full size

    engine = featx.load_model(lite0_onnx, device="cpu", engine="onnx")
    cfg = engine.info.preprocess
    for name in ("photo.jpg", "portrait.jpg"):
        reduced = load_image(tmp_path / name, cfg)
        full = preprocess_image(decode_image(tmp_path / name), cfg)
        a, b = engine.encode(np.stack([reduced, full])).embedding
        assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.999


def test_a_large_jpeg_2000_decodes_at_reduced_resolution_and_embeds_like_a_full_decode(tmp_path, lite0_onnx):
    """JPEG 2000 keeps each halving of the picture in its wavelet levels, which OpenJPEG can leave out as
    libjpeg scales a JPEG: a 2736x2048 photo is decoded at half of each side, its shorter side still four
    times the resize target, and is under a --max-pixels that its full size is over (a 10980-pixel
    Sentinel-2 tile was refused at the default). The wavelet's low-pass filters less well than libjpeg's
    scaling: the embedding's cosine to the full decode's is 0.9989 here (a JPEG's, 0.9998), as far as a
    JPEG re-save at quality 90 moves the sample photos (0.996 to 0.998); at a quarter of each side it was
    0.996, which is why featx stops at four times. A codestream whose component has fewer levels (a COC
    marker) is left no more than it has: OpenJPEG fails the decode ("broken data stream") when asked to
    leave out more."""
    import featx
    from featx.data import load_image, preprocess_image
    from featx.samples import camera_sized_photo

    photo = camera_sized_photo((2736, 2048))
    photo.save(tmp_path / "scan.jp2", quality_mode="rates", quality_layers=[20])
    assert decode_image(tmp_path / "scan.jp2", min_size=512).size == (1368, 1024)
    assert decode_image(tmp_path / "scan.jp2", min_size=512, max_pixels=2_000_000).size == (1368, 1024)
    with pytest.raises(ImageError, match="2736x2048 = 5,603,328 pixels is over the limit of 2,000,000"):
        decode_image(tmp_path / "scan.jp2", max_pixels=2_000_000)
    engine = featx.load_model(lite0_onnx, device="cpu", engine="onnx")
    cfg = engine.info.preprocess
    reduced, full = load_image(tmp_path / "scan.jp2", cfg), preprocess_image(decode_image(tmp_path / "scan.jp2"), cfg)
    a, b = engine.encode(np.stack([reduced, full])).embedding
    assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.998

    photo.resize((1024, 768)).save(tmp_path / "tile.j2k", no_jp2=True)  # a bare codestream: SOC, SIZ, COD …
    data = (tmp_path / "tile.j2k").read_bytes()
    cod = data.index(b"\xff\x52")
    end = cod + 2 + int.from_bytes(data[cod + 2:cod + 4], "big")
    assert data[cod + 9] == 5  # Pillow's 5 wavelet levels
    sp = bytearray(data[cod + 9:end])
    sp[0] = 2  # component 0: 2 levels
    coc = b"\xff\x53" + (4 + len(sp)).to_bytes(2, "big") + b"\x00" + data[cod + 4:cod + 5] + bytes(sp)
    (tmp_path / "fewer.j2k").write_bytes(data[:end] + coc + data[end:])
    assert decode_image(tmp_path / "tile.j2k", min_size=8).size == (32, 24)  # 1/32: all 5 levels
    assert decode_image(tmp_path / "fewer.j2k", min_size=8).size == (256, 192)  # 1/4: not 1/32


@pytest.mark.parametrize("fmt,ext", [("HEIF", ".heic"), ("AVIF", ".avif")])
def test_phone_formats_are_walked_decoded_upright_and_classified(tmp_path, coffee, lite0_onnx, fmt, ext):
    """iPhones save HEIC, Android and web exports AVIF: featx lists them (by name or by content),
    turns a portrait shot upright like the same shot as JPEG, and the real model sees espresso."""
    import pillow_heif

    import featx

    pillow_heif.register_heif_opener()  # to write HEIC here; featx registers it itself to read
    exif = Image.Exif()
    exif[0x0112] = 6
    coffee.save(tmp_path / f"portrait{ext}", format=fmt, exif=exif.tobytes(), quality=90)
    coffee.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    coffee.save(tmp_path / f"coffee{ext}", format=fmt, quality=90)
    coffee.save(tmp_path / "exported_without_extension", format=fmt, quality=90)
    walked = list(walk_images(tmp_path))
    assert {e.key for e in walked} == {f"portrait{ext}", "portrait.jpg", f"coffee{ext}", "exported_without_extension"}
    upright, as_jpeg = decode_image(tmp_path / f"portrait{ext}"), decode_image(tmp_path / "portrait.jpg")
    assert upright.size == as_jpeg.size == (coffee.height, coffee.width)
    assert np.abs(np.asarray(upright, np.float32) - np.asarray(as_jpeg, np.float32)).mean() < 4
    assert decode_image(tmp_path / "exported_without_extension").size == coffee.size
    (tmp_path / f"cut{ext}").write_bytes((tmp_path / f"coffee{ext}").read_bytes()[:400])
    with pytest.raises(ImageError, match=r"^cannot decode: [^<]*$"):  # a reason, without PIL's file-object repr
        decode_image(tmp_path / f"cut{ext}")
    result = featx.classify([tmp_path / f"coffee{ext}"], model=lite0_onnx, top=1)[0]
    assert result.top[0][0] == "espresso"


def test_netpbm_and_jpeg_2000_files_are_walked_and_decoded(tmp_path, coffee, lite0_onnx):
    """Datasets from before PNG was everywhere come as Netpbm (GTSRB's 39,209 traffic signs are .ppm,
    AT&T's faces .pgm), archives and satellite imagery as JPEG 2000: featx left them out of the walk as
    files it does not read. They are walked (by name or content) and decoded as the same picture."""
    import featx

    grey = coffee.convert("L")
    coffee.save(tmp_path / "sign.ppm")
    grey.save(tmp_path / "face.pgm")
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(tmp_path / "deep.pgm")
    (tmp_path / "plain.pbm").write_bytes(b"P1\n# a comment\n3 2\n1 0 1\n0 1 0\n")
    coffee.save(tmp_path / "archive.jp2")
    coffee.save(tmp_path / "tile.j2k", no_jp2=True)  # a bare codestream
    coffee.save(tmp_path / "scan_without_extension", format="JPEG2000")
    (tmp_path / "cut.jp2").write_bytes((tmp_path / "archive.jp2").read_bytes()[:300])
    walked = {e.key for e in walk_images(tmp_path)}
    assert walked == {"sign.ppm", "face.pgm", "deep.pgm", "plain.pbm", "archive.jp2", "tile.j2k",
                      "scan_without_extension", "cut.jp2"}
    for name in ("sign.ppm", "archive.jp2", "tile.j2k", "scan_without_extension"):  # lossless: the same pixels
        assert np.array_equal(np.asarray(decode_image(tmp_path / name)), np.asarray(coffee)), name
    for name in ("face.pgm", "deep.pgm"):
        assert np.array_equal(np.asarray(decode_image(tmp_path / name))[..., 1], np.asarray(grey)), name
    assert np.asarray(decode_image(tmp_path / "plain.pbm"))[..., 0].tolist() == [[0, 255, 0], [255, 0, 255]]
    with pytest.raises(ImageError, match=r"^cannot decode: [^<]*$"):
        decode_image(tmp_path / "cut.jp2")
    results = featx.classify([tmp_path / "sign.ppm", tmp_path / "archive.jp2"], model=lite0_onnx, top=1)
    assert [r.top[0][0] for r in results] == ["espresso", "espresso"]


def test_heic_without_pillow_heif_is_a_recorded_failure_that_says_what_to_install(tmp_path, coffee):
    """pillow-heif is what reads HEIC; where it is missing (a minimal install), a folder of iPhone photos
    must not end the run or fail with a bare 'cannot identify image': each file names the package."""
    import subprocess
    import sys

    import pillow_heif

    pillow_heif.register_heif_opener()
    coffee.save(tmp_path / "phone.heic", format="HEIF", quality=90)
    coffee.save(tmp_path / "camera.jpg", quality=90)
    script = (
        "import sys; sys.modules['pillow_heif'] = None  # as if it were not installed\n"
        "from featx.backbones import PreprocessConfig\n"
        "from featx.data import load_batch\n"
        "cfg = PreprocessConfig((32, 32), 36, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 'bilinear')\n"
        f"batch = load_batch([{str(tmp_path / 'phone.heic')!r}, {str(tmp_path / 'camera.jpg')!r}], cfg)\n"
        "print(batch.ok, batch.failed)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("[1] [(0, 'HEIC/HEIF photo, and pillow-heif is not installed "
                                  "(pip install pillow-heif)')]")


def test_the_progress_bar_counts_the_files_walked_and_a_skipped_one_is_logged_above_it(small_digits, lite0_onnx,
                                                                                        tmp_path):
    import subprocess
    import sys

    (small_digits / "3" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    # left out of the walk, so out of the bar's total too: a NAS's thumbnails, macOS's AppleDouble file
    thumbs = small_digits / "4" / "@eaDir" / "0004.png"
    thumbs.mkdir(parents=True)
    for size in ("S", "M", "XL"):
        Image.new("RGB", (64, 64)).save(thumbs / f"SYNOFILE_THUMB_{size}.jpg")
    (small_digits / "4" / "._0004.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))
    (small_digits / "5" / "again").symlink_to("..")  # a loop: walked once
    run = subprocess.run([sys.executable, "-m", "featx", "embed", str(small_digits), "-o", str(tmp_path / "c.h5"),
                          "--model", str(lite0_onnx), "--engine", "onnx", "--workers", "0"],
                         capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"})  # the bar on
    assert run.returncode == 0, run.stderr[-2000:]
    assert "61/61 [" in run.stderr and "/65 [" not in run.stderr  # 60 digits and the bad file
    # a terminal shows what follows the last carriage return of each line
    shown = [line.split("\r")[-1] for line in run.stderr.split("\n")]
    assert any(line.startswith("skipped 3/cut.png: cannot decode") for line in shown), run.stderr[-2000:]


def test_a_resized_or_reencoded_photo_keeps_its_perceptual_hash_and_another_photo_does_not(tmp_path, photos_dir,
                                                                                           lite0_onnx):
    """The hash the cache keeps of each image, at the model's own input: a photo saved again at half or a
    quarter of its size, or as a JPEG of quality 40, is found as a near copy; the other sample photos
    are not (they differ in far more bits), and a torch tensor (a GPU-decoded batch) hashes as numpy."""
    import torch

    from featx.data import NEAR_COPY_BITS, perceptual_hashes
    from featx.runtime import read_model_info
    from featx.store import near_copy_pairs

    cfg = read_model_info(lite0_onnx).preprocess
    originals = sorted(photos_dir.iterdir())
    copies = []
    for path in originals:
        img = Image.open(path).convert("RGB")
        for scale in (2, 4):
            copies.append(tmp_path / f"{path.stem}-1of{scale}.png")
            img.resize((img.width // scale, img.height // scale), Image.LANCZOS).save(copies[-1])
        copies.append(tmp_path / f"{path.stem}-q40.jpg")
        img.save(copies[-1], quality=40)
    decoded = load_batch([str(p) for p in originals + copies], cfg)
    assert decoded.ok == list(range(len(originals) + len(copies)))
    hashes = decoded.phashes
    assert np.array_equal(perceptual_hashes(torch.from_numpy(decoded.images)), hashes)
    n = len(originals)
    bits = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    of = np.repeat(np.arange(n), 3)  # the original of each copy
    assert (bits[n + np.arange(len(copies)), of] <= NEAR_COPY_BITS).all(), bits[n:, :n]
    apart = bits[:n, :n][~np.eye(n, dtype=bool)]
    assert apart.min() > 3 * NEAR_COPY_BITS, bits[:n, :n]
    pictures = np.concatenate([np.arange(n), of])
    found = near_copy_pairs(hashes)
    assert {tuple(p) for p in found} == {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                                         if pictures[i] == pictures[j]}
    assert load_batch([str(originals[0])], cfg, with_digests=False).phashes is None  # classify stores nothing


def test_near_copy_pairs_are_exactly_those_a_comparison_of_every_pair_finds():
    """The banded search (each candidate pair made once) against comparing every pair: hashes with near
    copies planted 0 to 6 bits away, exact repeats, unknown hashes (0, never matched), within one set
    and between two."""
    import itertools

    from featx.data import NEAR_COPY_BITS
    from featx.store import near_copy_pairs

    rng = np.random.default_rng(0)
    for _ in range(5):
        base = rng.integers(0, 2**64 - 1, 150, dtype=np.uint64, endpoint=True)
        near = base.copy()
        for k in range(len(near)):
            for bit in rng.choice(64, rng.integers(0, 7), replace=False):
                near[k] ^= np.uint64(1) << np.uint64(bit)
        hashes = np.concatenate([base, near, np.zeros(5, np.uint64), base[:10]])
        rng.shuffle(hashes)

        def close(x, y):
            return bool(x) and bool(y) and bin(int(x) ^ int(y)).count("1") <= NEAR_COPY_BITS

        within = [(i, j) for i, j in itertools.combinations(range(len(hashes)), 2) if close(hashes[i], hashes[j])]
        assert [tuple(p) for p in near_copy_pairs(hashes)] == within
        assert len(within) > 100  # the planted copies within 4 bits, and the repeats
        left, right = hashes[:120], hashes[120:]
        between = [(i, j) for i in range(len(left)) for j in range(len(right)) if close(left[i], right[j])]
        assert [tuple(p) for p in near_copy_pairs(left, right)] == between
