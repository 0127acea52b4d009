"""CUDA paths: the torch engine and nvJPEG decode agree with the CPU/onnxruntime path. Skipped without a GPU."""

import concurrent.futures as cf

import numpy as np
import pytest

import featx
from featx.gpudecode import available_jpeg_libraries

pytestmark = pytest.mark.gpu


def cosine_min(a, b):
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_torch_engine_on_cuda_matches_onnxruntime_cpu(lite0_onnx, lite0_backbone):
    from featx.export import check_images
    from featx.runtime import TorchEngine

    images = check_images(lite0_backbone.preprocess)
    ref = featx.load_model(lite0_onnx, device="cpu").encode(images).embedding
    for compile in (False, True):
        engine = TorchEngine(featx.read_model_info(lite0_onnx), device="cuda", compile=compile)
        assert cosine_min(engine.encode(images).embedding, ref) >= 0.999
        assert cosine_min(engine.encode(images[:3]).embedding, ref[:3]) >= 0.999  # padded partial batch


@pytest.mark.parametrize("library", available_jpeg_libraries())
def test_gpu_decode_matches_cpu_decode(tmp_path, lite0_backbone, library):
    from PIL import Image

    from featx.data import load_image
    from featx.gpudecode import GpuDecoder
    from featx.samples import sample_photos, write_jpeg_folder

    root = write_jpeg_folder(tmp_path / "jpegs", 16)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    for orientation in (3, 6, 8):  # phone photos: upside down, portrait either way
        exif = Image.Exif()
        exif[0x0112] = orientation
        paths.append(str(tmp_path / f"rotated{orientation}.jpg"))
        sample_photos()["china"].save(paths[-1], exif=exif, quality=95)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    decoder = GpuDecoder(lite0_backbone.preprocess, library=library)
    try:
        decoded = decoder.decode(paths + [str(tmp_path / "bad.jpg")])
        # several threads at once (TorchCodec: a decoder each; torchvision: one after the other), same pixels
        with cf.ThreadPoolExecutor(4) as threads:
            again = list(threads.map(lambda _: decoder.decode(paths).images.cpu(), range(4)))
    finally:
        decoder.close()
    images, ok, failed = decoded.images, decoded.ok, decoded.failed
    assert ok == list(range(len(paths))) and [i for i, _ in failed] == [len(paths)]
    cpu = np.stack([load_image(p, lite0_backbone.preprocess) for p in paths]).astype(np.float32)
    diff = np.abs(images.cpu().numpy().astype(np.float32) - cpu).mean(axis=(1, 2, 3))
    assert diff.max() < 3.0, diff  # nvJPEG's IDCT and torch's antialiased resize differ from PIL by a few levels
    assert all(np.array_equal(a.numpy(), images.cpu().numpy()) for a in again)


def test_embed_folder_on_gpu_equals_cpu_run(tmp_path, lite0_onnx):
    from featx.samples import write_jpeg_folder

    root = write_jpeg_folder(tmp_path / "jpegs", 64)
    (root / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    cpu = featx.embed_folder(root, tmp_path / "cpu.h5", model=lite0_onnx, device="cpu", workers=2)
    gpu = featx.embed_folder(root, tmp_path / "gpu.h5", model=lite0_onnx, device="cuda", batch_size=16)
    assert (cpu.n_embedded, cpu.n_failed) == (gpu.n_embedded, gpu.n_failed) == (64, 1)
    assert sum(gpu.decoded_by.values()) == 65 and gpu.decoded_by.get("gpu", 0) > 0
    assert f"by nvJPEG ({available_jpeg_libraries()[0]})" in gpu.summary()
    a, b = featx.load_embeddings(tmp_path / "cpu.h5"), featx.load_embeddings(tmp_path / "gpu.h5")
    assert a.keys == b.keys and np.array_equal(a.labels, b.labels) and a.fingerprint == b.fingerprint
    assert cosine_min(a.embeddings, b.embeddings) >= 0.99


def test_finetune_and_mlp_head_on_cuda(small_digits, tmp_path, lite0_onnx):
    """Mixed-precision fine-tuning and the torch MLP head run on the GPU and give usable models."""
    from featx.heads import MLPHead

    result = featx.fine_tune(small_digits, tmp_path / "ft.safetensors", unfreeze=2, epochs=2, input_size=64,
                             hflip=False, batch_size=16, device="cuda", log=lambda line: None)
    assert len(result.history) == 2 and np.isfinite(result.best_val_loss)
    info = featx.export_onnx(featx.load_backbone("efficientnet_lite0", weights=tmp_path / "ft.safetensors"),
                             tmp_path / "ft.onnx")
    assert info.class_names == [str(d) for d in range(10)]
    featx.embed_folder(small_digits, tmp_path / "c.h5", model=lite0_onnx, device="cpu", workers=0)
    data = featx.load_embeddings(tmp_path / "c.h5")
    head = MLPHead(hidden=(64,), max_epochs=30, device="cuda").fit(data.embeddings, data.labels)
    assert np.mean(head.predict(data.embeddings) == data.labels) > 0.8


def test_out_of_memory_on_cuda_backs_off_and_retries_the_same_images(tmp_path, lite0_onnx, caplog):
    """A real CUDA allocation failure, not a simulated one: torch's allocator capped at what a batch of
    32 needed and half as much again, a batch of 256 is halved until it fits and the same images are
    retried; every photo's embedding comes back, in order, as batches of 32 gave it uncapped."""
    import torch

    from featx.data import load_batch
    from featx.runtime import BackoffEncoder, TorchEngine
    from featx.samples import write_jpeg_folder

    root = write_jpeg_folder(tmp_path / "jpegs", 256)
    engine = TorchEngine(featx.read_model_info(lite0_onnx), device="cuda")
    images = load_batch(sorted(str(p) for p in root.rglob("*.jpg")), engine.info.preprocess).images
    assert len(images) == 256
    reference = np.concatenate([engine.encode(images[i:i + 32]).embedding for i in range(0, 256, 32)])
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    engine.encode(images[:32])
    peak32 = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    encoder = BackoffEncoder(engine, 256)
    try:
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 1.5 * peak32) / total)
        embedding = encoder.encode(images).embedding
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert encoder.backoffs[0] == 128 and encoder.limit in (32, 64), encoder.backoffs
    assert "out of memory on cuda" in caplog.text and "the same images retried" in caplog.text
    assert embedding.shape == reference.shape
    assert cosine_min(embedding, reference) >= 0.999  # row by row: the same photos in the same order


def test_two_engines_on_one_gpu_fill_one_store_like_one(tmp_path, lite0_onnx):
    """The several-GPU path (one engine thread per device, each decoding its own batches with nvJPEG,
    one store) with two engines on the one lent GPU: the cache is a single engine's, in walk order,
    the failed file included, and a re-run adds nothing."""
    from featx.samples import write_jpeg_folder

    root = write_jpeg_folder(tmp_path / "jpegs", 96)
    (root / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    runs = {name: featx.embed_folder(root, tmp_path / f"{name}.h5", model=lite0_onnx, engine="torch", batch_size=16,
                                     devices=devices)
            for name, devices in (("one", ["cuda:0"]), ("two", ["cuda:0", "cuda:0"]))}
    assert [(r.n_embedded, r.n_failed) for r in runs.values()] == [(96, 1)] * 2
    assert runs["two"].engine == "torch (cuda:0), torch (cuda:0)" and runs["two"].decoded_by.get("gpu", 0) > 0
    a, b = featx.load_embeddings(tmp_path / "one.h5"), featx.load_embeddings(tmp_path / "two.h5")
    assert a.keys == b.keys and np.array_equal(a.labels, b.labels) and a.failures == b.failures
    assert cosine_min(a.embeddings, b.embeddings) >= 0.999
    again = featx.embed_folder(root, tmp_path / "two.h5", model=lite0_onnx, engine="torch", devices=["cuda:0"] * 2)
    assert (again.n_embedded, again.n_cached, again.n_failed_before) == (0, 96, 1)


def test_look_alike_groups_on_cuda_are_those_of_the_cpu(photos_dir, lite0_onnx, tmp_path):
    """`similar --groups` takes its n²/2 dot products to a GPU when one is visible: the same groups, files
    and cosines as on the CPU, for the sample photos with edits of two of them (alike, not copies)."""
    import shutil

    from PIL import Image

    folder = tmp_path / "photos"
    shutil.copytree(photos_dir, folder)
    coffee = Image.open(folder / "coffee.png")
    w, h = coffee.size
    coffee.crop((w // 10, h // 20, w, h)).save(folder / "coffee_crop.png")
    coffee.transpose(Image.FLIP_LEFT_RIGHT).save(folder / "coffee_mirror.png")
    Image.open(folder / "chelsea.png").transpose(Image.FLIP_LEFT_RIGHT).save(folder / "chelsea_mirror.png")
    shutil.copy(folder / "astronaut.png", folder / "astronaut_copy.png")
    cache = tmp_path / "photos.h5"
    featx.embed_folder(folder, cache, model=lite0_onnx, engine="onnx", device="cpu", workers=1)
    cpu, gpu = (featx.look_alike_groups(cache, device=device) for device in ("cpu", "cuda"))
    assert [[key for key, _ in g.pictures] for g in gpu] == [[key for key, _ in g.pictures] for g in cpu]
    assert len(cpu) == 3 and [(g.copies, g.near_copies) for g in gpu] == [(g.copies, g.near_copies) for g in cpu]
    assert np.allclose([c for g in gpu for _, c in g.pictures], [c for g in cpu for _, c in g.pictures], atol=1e-4)
