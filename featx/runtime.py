"""Exported model file -> inference engine with ``encode(uint8 batch) -> embeddings[, logits]``.

Two engines run the same file's model: onnxruntime (CPU, or CUDA when onnxruntime-gpu sees a GPU)
and torch (the same weights rebuilt from the registry and verified against the file's weights
hash; on a GPU it runs fp16, channels_last and optionally torch.compile, which beats onnxruntime's
CUDA kernels). The model's config is always read back from the file.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import ModelFileError, WeightsError
from .export import INPUT_NAME, METADATA_KEY, ModelInfo

_logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
EngineName = Literal["auto", "onnx", "torch", "ray"]


@dataclass
class Encoded:
    """``embedding`` float32 (n, embed_dim); ``logits`` float32 (n, n_classes) or None."""

    embedding: np.ndarray
    logits: np.ndarray | None = None


def cuda_device_count() -> int:
    """GPUs the NVIDIA driver reports, asked without importing torch (0 without a driver)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def resolve_device(device: Device | None) -> str:
    if device in (None, "auto"):
        return "cuda" if cuda_device_count() > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and cuda_device_count() == 0:
        raise ModelFileError("--device cuda asked for, but no CUDA GPU is visible (no NVIDIA driver or no device)")
    return device


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """The featx metadata of an exported file, without building an inference session."""
    import onnx

    path = _existing(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelFileError(f"{path}: not a valid ONNX file ({_first_line(e)})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    return _info_from_metadata(path, meta)


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist")
    return path


def _info_from_metadata(path: Path, meta: dict[str, str]) -> ModelInfo:
    if METADATA_KEY not in meta:
        raise ModelFileError(f"{path}: not exported by featx (no '{METADATA_KEY}' metadata); make one with `featx export`")
    try:
        return ModelInfo.from_json(meta[METADATA_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path}: featx metadata is unreadable ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


class OnnxEngine:
    """onnxruntime session over an exported file.

    Example:
        >>> engine = OnnxEngine("models/efficientnet_lite0.onnx")
        >>> engine.encode(images).embedding.shape   # images: uint8 (n, 224, 224, 3)
        (n, 1280)
    """

    name = "onnx"

    def __init__(self, path: str | os.PathLike, *, device: Device | None = "auto", threads: int | None = None,
                 spin: bool = True):
        """``spin=False`` stops idle intra-op threads from spinning: slower alone, faster when decode
        workers share the cores (measured in benchmarks/embed_cache.py)."""
        import onnxruntime as ort

        self.path = _existing(path)
        self.device = resolve_device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelFileError("--device cuda needs onnxruntime-gpu; this onnxruntime has no CUDA provider")
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # use the CUDA/cuDNN libraries that torch's wheels installed
            cuda_options = {"cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": "1"}
            providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/InvalidGraph classes
            raise ModelFileError(f"{self.path}: not a valid ONNX model ({_first_line(e)})") from None
        self.info = _info_from_metadata(self.path, self.session.get_modelmeta().custom_metadata_map)
        self.outputs = [o.name for o in self.session.get_outputs()]
        if self.device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ModelFileError(f"{self.path}: onnxruntime could not start its CUDA provider on this machine")

    def warmup(self, batch_size: int) -> None:
        """One run at ``batch_size``, so session start-up costs land before the first real batch."""
        h, w = self.info.preprocess.input_size
        self.encode(np.zeros((batch_size, h, w, 3), dtype=np.uint8))

    def encode(self, images: np.ndarray) -> Encoded:
        """``images`` uint8 (n, H, W, 3) RGB, preprocessed as ``self.info.preprocess`` says."""
        result = self.session.run(self.outputs, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})
        named = dict(zip(self.outputs, result))
        return Encoded(named["embedding"], named.get("logits"))


class TorchEngine:
    """The same model in torch: rebuilt from the registry, checked against the file's weights hash.

    On CUDA it runs in ``dtype`` (fp16 by default) with channels_last. ``compile`` takes a
    ``torch.compile`` mode (True means "default"); compiled graphs are frozen (inductor folds
    BatchNorm into the convolutions) and batches are padded to the first batch's size, so the
    compiled shape never changes.
    """

    name = "torch"

    def __init__(
        self,
        info: ModelInfo,
        *,
        device: Device | None = "auto",
        compile: bool | str = False,
        dtype: Literal["fp32", "fp16", "bf16"] | None = None,
        backbone=None,
    ):
        import torch

        from .backbones import load_backbone
        from .export import embedding_model

        self.info = info
        self.device = resolve_device(device)
        backbone = backbone or load_backbone(info.backbone, weights=info.weights)
        if backbone.weights_sha256() != info.weights_sha256:
            raise WeightsError(
                f"torch weights for {info.backbone} ({backbone.weights}) hash to {backbone.weights_sha256()[:12]}…, "
                f"the model file was exported from {info.weights_sha256[:12]}…"
            )
        dtype = dtype or ("fp16" if self.device == "cuda" or info.precision == "fp16" else "fp32")
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        if self.device == "cpu" and torch_dtype is torch.float16:
            torch_dtype = torch.float32  # fp16 convolutions on CPU are slower than fp32
        self.dtype = torch_dtype
        model = embedding_model(backbone, dtype=torch_dtype).to(self.device)
        if self.device == "cuda":
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.compiled = bool(compile)
        self.batch_size: int | None = None
        if compile:
            model = torch.compile(model, mode=None if compile is True else compile, dynamic=False)
        self.model = model

    def warmup(self, batch_size: int) -> None:
        """Compile (when asked) and autotune at ``batch_size`` now, not inside the first real batch."""
        import torch

        h, w = self.info.preprocess.input_size
        for _ in range(2):
            self.forward(torch.zeros((batch_size, h, w, 3), dtype=torch.uint8, device=self.device))
        if self.device == "cuda":
            torch.cuda.synchronize()

    def forward(self, images):
        """Run on a uint8 (n, H, W, 3) tensor on any device; returns device tensors (embedding, logits|None)."""
        import torch

        n = images.shape[0]
        if self.compiled:
            self.batch_size = self.batch_size or n
            if n < self.batch_size:  # keep the compiled shape: pad, then drop the padding
                pad = images.new_zeros((self.batch_size - n, *images.shape[1:]))
                images = torch.cat([images, pad])
        with torch.inference_mode(), _freezing(self.compiled):
            out = self.model(images.to(self.device, non_blocking=True))
        emb, logits = out if isinstance(out, tuple) else (out, None)
        return emb[:n], None if logits is None else logits[:n]

    def encode(self, images) -> Encoded:
        """``images`` uint8 (n, H, W, 3), numpy or a torch tensor (already on the GPU is fastest)."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        emb, logits = self.forward(x)
        return Encoded(emb.float().cpu().numpy(), None if logits is None else logits.float().cpu().numpy())


def _freezing(on: bool):
    """Inductor's freezing (weights as constants: BatchNorm folded, layouts pre-packed), read when
    torch.compile compiles on the first call; patched per call so other compiled code is untouched."""
    import contextlib

    if not on:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def load_model(
    path: str | os.PathLike,
    *,
    device: Device | None = "auto",
    engine: EngineName | None = "onnx",
    threads: int | None = None,
    compile: bool | str = False,
    spin: bool = True,
) -> OnnxEngine | TorchEngine:
    """Open an exported featx model file with the chosen engine.

    ``engine="auto"`` takes onnxruntime on CPU (measured faster than torch there) and torch on CUDA
    (torch fp16 channels_last beats onnxruntime's CUDA provider; see benchmarks/).
    """
    device = resolve_device(device)
    if engine in (None, "auto"):
        engine = "torch" if device == "cuda" else "onnx"
    if engine == "onnx":
        return OnnxEngine(path, device=device, threads=threads, spin=spin)
    if engine == "torch":
        return TorchEngine(read_model_info(path), device=device, compile=compile)
    raise ValueError(f"engine must be onnx, torch or auto, got {engine!r}")
