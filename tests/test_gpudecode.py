"""The GPU decode path's host-side logic, run on the CPU (TorchCodec's or torchvision's libjpeg-turbo in
place of nvJPEG): which files go to nvJPEG, fallbacks and failures, EXIF rotation, and the stage that
shares batches with CPU decoders."""

import concurrent.futures as cf
import hashlib
import io
import multiprocessing

import numpy as np
import pytest
from PIL import Image

from featx.data import FileEntry, load_batch, load_image
from featx.gpudecode import JPEG_LIBRARIES, GpuDecoder, available_jpeg_libraries, nvjpeg_pixels

AVAILABLE = available_jpeg_libraries()

# both decode libraries that also run on the CPU, wherever they load: TorchCodec is preferred,
# torchvision (its image decoders deprecated since 0.29, hence the warning filter) is the fallback;
# nvImageCodec decodes on a GPU only (tests/test_gpu.py)
LIBRARIES = [pytest.param(lib, marks=[pytest.mark.skipif(lib not in AVAILABLE, reason=f"{lib} does not load here"),
                                      pytest.mark.filterwarnings("ignore:.*deprecated since torchvision")])
             for lib in JPEG_LIBRARIES if lib != "nvimgcodec"]


@pytest.fixture
def coffee(photos_dir):
    return Image.open(photos_dir / "coffee.png").convert("RGB")


def _jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "JPEG"), **kw)
    return buf.getvalue()


def test_only_files_nvjpeg_decodes_as_they_are_go_to_it(coffee):
    rotated, upright = Image.Exif(), Image.Exif()
    rotated[0x0112] = 6
    upright[0x0112], upright[0x010F] = 1, "camera"
    cases = {
        "baseline": (_jpeg(coffee), True),
        "grey": (_jpeg(coffee.convert("L")), True),
        "progressive": (_jpeg(coffee, progressive=True), True),
        "optimised, 4:4:4": (_jpeg(coffee, optimize=True, subsampling=0), True),
        "upright EXIF": (_jpeg(coffee, exif=upright.tobytes()), True),
        "EXIF rotated": (_jpeg(coffee, exif=rotated.tobytes()), False),  # unless the decoder turns it upright
        "CMYK": (_jpeg(coffee.convert("CMYK")), False),
        "PNG": (_jpeg(coffee, format="PNG"), False),
        "header cut short": (_jpeg(coffee)[:40], False),
        "cut in its compressed data": (_jpeg(coffee)[:-2000], False),  # an interrupted copy or download
        "data after the end marker": (_jpeg(coffee) + b"\x00trailer" * 100, True),  # phones append some
        "empty": (b"", False),
    }
    pixels = coffee.width * coffee.height
    assert {name: nvjpeg_pixels(data, 10**8) for name, (data, _) in cases.items()} == \
        {name: pixels if want else 0 for name, (_, want) in cases.items()}
    assert not nvjpeg_pixels(cases["baseline"][0], max_pixels=pixels - 1)
    # a decoder that applies the EXIF orientation takes rotated files, but no orientation outside 1-8
    assert nvjpeg_pixels(cases["EXIF rotated"][0], 10**8, rotates=True) == pixels
    rotated[0x0112] = 9
    assert not nvjpeg_pixels(_jpeg(coffee, exif=rotated.tobytes()), 10**8, rotates=True)
    assert not nvjpeg_pixels(cases["CMYK"][0], 10**8, rotates=True)
    # a strip would be resized to gigapixels on the GPU: the CPU path refuses it with its reason
    assert not nvjpeg_pixels(_jpeg(coffee.resize((6500, 100))), 10**8)
    assert nvjpeg_pixels(_jpeg(coffee.resize((6400, 100))), 10**8) == 640_000


def _mixed_folder(tmp_path, coffee, n_jpegs: int):
    from featx.samples import write_jpeg_folder

    root = write_jpeg_folder(tmp_path / "jpegs", n_jpegs, processes=1)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    odd = tmp_path / "odd"
    odd.mkdir()
    coffee.convert("CMYK").save(odd / "cmyk.jpg")
    coffee.convert("L").save(odd / "grey.jpg")  # nvJPEG's: one channel in, RGB out like the rest
    coffee.save(odd / "png.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    coffee.save(odd / "rotated.jpg", exif=exif)
    (odd / "corrupt.jpg").write_bytes(_jpeg(coffee)[:300])  # cut short: no end marker, so the CPU path says why
    (odd / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    extra = [str(odd / n) for n in ("cmyk.jpg", "grey.jpg", "png.png", "rotated.jpg", "corrupt.jpg", "garbage.jpg")]
    return paths, extra + [str(odd / "missing.jpg")]


@pytest.mark.skipif(not {"torchcodec", "torchvision"} <= set(AVAILABLE), reason="needs both JPEG decode libraries")
def test_the_environment_picks_the_jpeg_library(monkeypatch, lite0_backbone):
    def decoder(**kw):
        made = GpuDecoder(lite0_backbone.preprocess, device="cpu", **kw)
        made.close()
        return made

    assert decoder().library == "torchcodec"  # preferred
    monkeypatch.setenv("FEATX_JPEG_LIBRARY", "torchvision")  # to compare them end to end, say
    assert decoder().library == "torchvision" and not decoder().rotates
    assert decoder(library="torchcodec").library == "torchcodec"  # an explicit choice wins
    monkeypatch.setenv("FEATX_JPEG_LIBRARY", "nvjpeg")
    with pytest.raises(ValueError, match="unknown JPEG decode library 'nvjpeg'"):
        decoder()
    # nvImageCodec only when named, and only where it decodes on a GPU: elsewhere it says why
    monkeypatch.delenv("FEATX_JPEG_LIBRARY")
    if "nvimgcodec" not in AVAILABLE:
        with pytest.raises(ImportError, match="nvImageCodec does not decode JPEGs on the GPU here: "):
            decoder(library="nvimgcodec")


@pytest.mark.parametrize("library", LIBRARIES)
def test_decoder_matches_the_cpu_path_and_records_what_it_cannot_decode(tmp_path, coffee, lite0_backbone, library):
    cfg = lite0_backbone.preprocess
    jpegs, odd = _mixed_folder(tmp_path, coffee, 12)
    paths = jpegs[:6] + odd + jpegs[6:]
    decoder = GpuDecoder(cfg, device="cpu", library=library)
    try:
        decoded = decoder.decode(paths)
    finally:
        decoder.close()
    images, ok, failed = decoded.images, decoded.ok, decoded.failed
    assert decoded.decoded_by == "gpu"  # nvJPEG's place in the pipeline, here with libjpeg-turbo
    reference = load_batch(paths, cfg)
    assert ok == reference.ok and [i for i, _ in failed] == [i for i, _ in reference.failed]
    assert "no such file" in dict(failed)[paths.index(odd[-1])]
    # what the cache records of each file embedded: the SHA-256 of its bytes, from the bytes already read
    assert decoded.digests == reference.digests == [hashlib.sha256(open(paths[i], "rb").read()).hexdigest() for i in ok]
    # and each image's perceptual hash, reduced where the decoder's tensor lies: the CPU path's, to near-copy bits
    from featx.data import NEAR_COPY_BITS

    assert (np.bitwise_count(decoded.phashes ^ reference.phashes) <= NEAR_COPY_BITS).all()
    got = images.numpy().astype(np.float32)
    assert got.shape == (len(ok), *cfg.input_size, 3)
    assert np.abs(got - reference.images).mean() < 1.0  # libjpeg-turbo either way; torch resizes, PIL resizes
    fallbacks = ["cmyk.jpg", "png.png"] + (["rotated.jpg"] if library == "torchvision" else [])
    for name in fallbacks:  # decoded with PIL: identical
        row = ok.index(next(i for i, p in enumerate(paths) if p.endswith(name)))
        assert np.array_equal(images[row].numpy(), load_image(paths[ok[row]], cfg))


@pytest.mark.parametrize("crop_mode", ["squash", "border"])
def test_the_decoders_resize_follows_timms_crop_modes_as_the_cpu_path_does(tmp_path, lite0_backbone, crop_mode):
    """The GPU path's resize (run here on the CPU) for a timm model evaluated on the whole photo: squashed,
    or fitted and padded with the mean colour, as load_image gives it (torch resizes, PIL resizes)."""
    import dataclasses

    from featx.samples import write_jpeg_folder

    cfg = dataclasses.replace(lite0_backbone.preprocess, crop_mode=crop_mode)
    root = write_jpeg_folder(tmp_path / "jpegs", 4, processes=1)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    decoder = GpuDecoder(cfg, device="cpu", library=next(iter(AVAILABLE)))
    try:
        decoded = decoder.decode(paths)
    finally:
        decoder.close()
    assert decoded.decoded_by == "gpu" and decoded.ok == list(range(len(paths)))
    reference = np.stack([load_image(p, cfg) for p in paths]).astype(np.float32)
    assert np.abs(decoded.images.numpy().astype(np.float32) - reference).mean() < 1.0
    if crop_mode == "border":  # 500x375 photos fitted into Lite0's 256: 192 rows, 16 of the mean colour above and below
        assert cfg.resized_size(500, 375) == (256, 192)
        assert (decoded.images[:, :16].numpy() == 128).all() and (decoded.images[:, -16:].numpy() == 128).all()
        assert (decoded.images[:, 16].numpy() != 128).any()


@pytest.mark.skipif("torchcodec" not in AVAILABLE, reason="TorchCodec does not load here")
def test_torchcodec_turns_every_exif_orientation_upright_like_the_cpu_path(tmp_path, lite0_backbone):
    """Phone photos carry their rotation in EXIF; with TorchCodec they stay on nvJPEG and must come out
    the way the CPU path (PIL's exif_transpose) shows them. A portrait crop of the photo, so a wrong
    rotation or mirror changes the pixels."""
    cfg = lite0_backbone.preprocess
    from featx.samples import sample_photos

    photo = sample_photos()["china"].crop((100, 0, 400, 427))
    paths = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        paths.append(str(tmp_path / f"orientation{orientation}.jpg"))
        photo.save(paths[-1], exif=exif, quality=95)
    decoder = GpuDecoder(cfg, device="cpu", library="torchcodec")
    try:
        assert all(pixels for _, pixels, _ in decoder.read(paths).result())  # none left to the CPU fallback
        decoded = decoder.decode(paths)
    finally:
        decoder.close()
    assert decoded.ok == list(range(8))
    reference = load_batch(paths, cfg).images.astype(np.float32)
    got = decoded.images.numpy().astype(np.float32)
    errors = np.abs(got - reference).mean(axis=(1, 2, 3))
    assert errors.max() < 1.0, errors
    # and the eight really differ, so the check above could fail
    assert min(np.abs(reference[0] - reference[k]).mean() for k in range(1, 8)) > 5


def test_decode_stage_shares_batches_with_cpu_workers_and_loses_none(tmp_path, coffee, lite0_backbone):
    """Every batch comes out once, whichever decoder took it, with the same files ok and failed."""
    from featx.pipeline import _gpu_decode_ahead

    cfg = lite0_backbone.preprocess
    jpegs, odd = _mixed_folder(tmp_path, coffee, 58)
    paths = jpegs + odd
    entries = [FileEntry(key=p, path=p, label=None, size=0, mtime_ns=0) for p in paths]
    batches = [entries[i:i + 8] for i in range(0, len(entries), 8)]
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        out = list(_gpu_decode_ahead(iter(batches), cfg, device="cpu", max_pixels=10**8, depth=1,
                                     cpu_pool=pool, cpu_workers=2))
    assert sorted(tuple(e.key for e in b) for b, _ in out) == sorted(tuple(e.key for e in b) for b in batches)
    assert {d.decoded_by for _, d in out} == {"gpu", "cpu"}
    for batch, decoded in out:
        reference = load_batch([e.path for e in batch], cfg)
        assert decoded.ok == reference.ok
        assert [i for i, _ in decoded.failed] == [i for i, _ in reference.failed]
        assert decoded.digests == reference.digests
        if decoded.ok:  # a batch may hold only the missing file
            assert np.abs(decoded.images.numpy().astype(np.float32) - reference.images).mean() < 1.0


def test_a_killed_cpu_decode_worker_ends_the_decode_stage_with_one_line(tmp_path, coffee, lite0_backbone):
    """The OOM killer may take one of the decode processes beside nvJPEG: the run ends with a FeatxError saying
    so and how to resume, not the process pool's traceback."""
    import os
    import signal
    import time

    from featx.errors import FeatxError
    from featx.pipeline import _gpu_decode_ahead, decode_pool

    jpegs, _ = _mixed_folder(tmp_path, coffee, 24)
    entries = [FileEntry(key=p, path=p, label=None, size=0, mtime_ns=0) for p in jpegs]
    batches = [entries[i:i + 4] for i in range(0, len(entries), 4)]
    pool = decode_pool(1)
    try:
        os.kill(pool.submit(os.getpid).result(timeout=120), signal.SIGKILL)
        time.sleep(1.0)  # the pool's manager thread notices
        with pytest.raises(FeatxError, match="^a decode worker process died .* run the same command again to resume$"):
            list(_gpu_decode_ahead(iter(batches), lite0_backbone.preprocess, device="cpu", max_pixels=10**8, depth=1,
                                   cpu_pool=pool, cpu_workers=1))
    finally:
        pool.shutdown(wait=False)


def test_camera_photos_decode_in_bounded_calls_with_the_same_pixels(tmp_path, lite0_backbone):
    """A batch of camera-sized photos is split into nvJPEG calls of bounded size (a whole batch at once
    would not fit a consumer GPU's memory) and comes out as it would from one call."""
    from featx.samples import camera_sized_photo

    cfg = lite0_backbone.preprocess
    paths = []
    for seed in range(4):
        paths.append(str(tmp_path / f"camera{seed}.jpg"))
        camera_sized_photo((2000, 1500), seed=seed).save(paths[-1], quality=90)
    small = _jpeg(camera_sized_photo((500, 375), seed=9))
    (tmp_path / "small.jpg").write_bytes(small)
    paths.insert(2, str(tmp_path / "small.jpg"))

    def decode(pixels_per_call, resize_pixels=10**9):
        decoder = GpuDecoder(cfg, device="cpu", pixels_per_call=pixels_per_call)
        decoder.resize_pixels = resize_pixels
        calls = []
        decode_list = decoder._decode_list
        decoder._decode_list = lambda tensors: calls.append(len(tensors)) or decode_list(tensors)
        try:
            return decoder.decode(paths), calls
        finally:
            decoder.close()

    whole, whole_calls = decode(10**9)
    split, split_calls = decode(4_000_000)  # one 3-Mpx photo per call, the small one beside the one before it
    resized_apart, resized_apart_calls = decode(10**9, resize_pixels=4_000_000)  # one call, resized one by one
    assert whole_calls == resized_apart_calls == [5] and split_calls == [1, 2, 1, 1]
    assert whole.ok == split.ok == resized_apart.ok == list(range(5))
    assert np.array_equal(whole.images.numpy(), split.images.numpy())
    assert np.array_equal(whole.images.numpy(), resized_apart.images.numpy())
    reference = load_batch(paths, cfg).images.astype(np.float32)
    assert np.abs(split.images.numpy().astype(np.float32) - reference).mean() < 1.0


def test_a_bad_file_in_a_batch_costs_a_few_halved_calls_not_one_call_per_file(tmp_path, coffee, lite0_backbone):
    """A file whose header passes but whose decode fails (here a broken Huffman table) fails the whole
    batched call; the halves are decoded again down to it, and everything else still comes from nvJPEG."""
    cfg = lite0_backbone.preprocess
    paths = []
    for k in range(8):
        data = bytearray(_jpeg(coffee.rotate(45 * k)))
        if k == 5:
            table = data.find(b"\xff\xc4")  # DHT: its code counts, overwritten with nonsense
            data[table + 5:table + 21] = b"\xff" * 16
        paths.append(str(tmp_path / f"{k}.jpg"))
        (tmp_path / f"{k}.jpg").write_bytes(bytes(data))
    with_trailer = tmp_path / "trailer.jpg"  # phones append data after the end marker: still nvJPEG's
    with_trailer.write_bytes(_jpeg(coffee) + b"\x00motion photo" * 50)
    paths.append(str(with_trailer))
    decoder = GpuDecoder(cfg, device="cpu")
    calls = []
    decode_list = decoder._decode_list
    decoder._decode_list = lambda tensors: calls.append(len(tensors)) or decode_list(tensors)
    try:
        assert all(pixels for _, pixels, _ in decoder.read(paths).result())
        decoded = decoder.decode(paths)
    finally:
        decoder.close()
    assert calls == [9, 4, 5, 2, 1, 1, 3]  # 9 fails; 0-3 ok; 4-8 fails; 4-5 fails: 4 ok, 5 fails; 6-8 ok
    reference = load_batch(paths, cfg)
    assert decoded.ok == reference.ok == [0, 1, 2, 3, 4, 6, 7, 8]
    assert [i for i, _ in decoded.failed] == [5]
    assert np.abs(decoded.images.numpy().astype(np.float32) - reference.images).mean() < 1.0
