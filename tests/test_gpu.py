"""CUDA paths: the torch engine and nvJPEG decode agree with the CPU/onnxruntime path. Skipped without a GPU."""

import numpy as np
import pytest

import featx

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


def test_gpu_decode_matches_cpu_decode(tmp_path, lite0_backbone):
    from featx.data import load_image
    from featx.gpudecode import GpuDecoder
    from featx.samples import write_jpeg_folder

    root = write_jpeg_folder(tmp_path / "jpegs", 16)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    decoder = GpuDecoder(lite0_backbone.preprocess)
    images, ok, failed = decoder.decode(paths + [str(tmp_path / "bad.jpg")])
    assert ok == list(range(16)) and [i for i, _ in failed] == [16]
    cpu = np.stack([load_image(p, lite0_backbone.preprocess) for p in paths]).astype(np.float32)
    diff = np.abs(images.cpu().numpy().astype(np.float32) - cpu)
    assert diff.mean() < 3.0  # nvJPEG's IDCT and torch's antialiased resize differ from PIL by a few levels


def test_embed_folder_on_gpu_equals_cpu_run(tmp_path, lite0_onnx):
    from featx.samples import write_jpeg_folder

    root = write_jpeg_folder(tmp_path / "jpegs", 64)
    (root / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    cpu = featx.embed_folder(root, tmp_path / "cpu.h5", model=lite0_onnx, device="cpu", workers=2)
    gpu = featx.embed_folder(root, tmp_path / "gpu.h5", model=lite0_onnx, device="cuda", batch_size=16)
    assert (cpu.n_embedded, cpu.n_failed) == (gpu.n_embedded, gpu.n_failed) == (64, 1)
    a, b = featx.load_embeddings(tmp_path / "cpu.h5"), featx.load_embeddings(tmp_path / "gpu.h5")
    assert a.keys == b.keys and np.array_equal(a.labels, b.labels) and a.fingerprint == b.fingerprint
    assert cosine_min(a.embeddings, b.embeddings) >= 0.99
