"""Exported model file -> inference engine with ``encode(uint8 batch) -> embeddings[, logits]``.

Engines run the same file's model behind one interface (``Engine``): onnxruntime (CPU, its CUDA
provider when onnxruntime-gpu sees a GPU, or its TensorRT provider when TensorRT's libraries are
installed) and torch (the same weights rebuilt from the registry and verified against the file's
weights hash; on a GPU it runs fp16, channels_last and optionally torch.compile, which beats
onnxruntime's CUDA kernels). The model's config is always read back from the file. Which engine
``engine="auto"`` takes is measured, once per model and device, by featx.calibration.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from .errors import FeatxError, ModelFileError, WeightsError, first_line
from .export import (CLASS_MEANS_NAME, INPUT_NAME, METADATA_KEY, TENSORS_DIGEST_KEY, TRAINED_PHASHES_KEY,
                     TYPICAL_COSINE_KEY, ModelInfo, decode_phashes, is_model_file, weights_damage)

_logger = logging.getLogger(__name__)

Device = str  # "auto", "cpu", "cuda" or "cuda:N"
EngineName = Literal["auto", "onnx", "tensorrt", "torch", "ray"]


class Engine(Protocol):
    """What the pipeline needs of an inference engine."""

    name: str  # "onnx", "tensorrt" or "torch"
    device: str  # "cpu", "cuda" or "cuda:N"
    info: ModelInfo

    def warmup(self, batch_size: int) -> None: ...

    def encode(self, images) -> Encoded: ...


@dataclass
class Encoded:
    """``embedding`` float32 (n, embed_dim); ``logits`` float32 (n, n_classes) or None: the class scores,
    which for a classifier file (``info.class_scores == "probabilities"``) are its probabilities."""

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


def check_device_name(device: str) -> tuple[str, str]:
    """(kind, index or "") of "auto", "cpu", "cuda" or "cuda:N"; ValueError for anything else."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return kind, index


def resolve_device(device: Device | None) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; "cuda:N" is checked against the GPUs present."""
    if device in (None, "auto"):
        return "cuda" if cuda_device_count() > 0 else "cpu"
    kind, index = check_device_name(device)
    n_gpus = cuda_device_count() if kind == "cuda" else 0
    if kind == "cuda" and n_gpus == 0:
        raise ModelFileError(f"--device {device} asked for, but no CUDA GPU is visible (no NVIDIA driver or no device)")
    if index and int(index) >= n_gpus:
        raise ModelFileError(f"--device {device} asked for, but only {n_gpus} GPU(s) are visible")
    return device


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def cuda_index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


def tensorrt_problem() -> str | None:
    """Why onnxruntime's TensorRT provider cannot run here, or None when it can.

    onnxruntime-gpu lists the provider whether or not TensorRT itself is installed; the session
    would then fall back to CUDA with a page of errors, so the library is looked for first.
    """
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no TensorRT provider (pip install onnxruntime-gpu)"
    if cuda_device_count() == 0:
        return "the TensorRT provider needs a CUDA GPU"
    for name in ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return None
        except OSError:
            continue
    return "TensorRT's libraries (libnvinfer) are not installed (pip install tensorrt, then put them on LD_LIBRARY_PATH)"


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # an embedding cache's first bytes


def file_kind(path: str | os.PathLike) -> str | None:
    """"cache" (HDF5), "safetensors" (a head or a fine-tuning checkpoint) or "onnx", told by the first
    bytes whatever the file's name (--model, --head and --weights take any), or None; so a featx file
    given where another kind is wanted is named as what it is. Protobuf has no signature: a file is
    taken for ONNX by its first field, the ir_version a model starts with (or by its .onnx name)."""
    try:
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError:
        return None
    if start[:8] == HDF5_SIGNATURE:
        return "cache"
    if len(start) == 9 and start[8:] == b"{":  # safetensors: an 8-byte header length, then its JSON
        return "safetensors"
    if start[:1] == b"\x08" or str(path).endswith(".onnx"):  # protobuf field 1 (ir_version), a varint
        return "onnx"
    return None


def _not_onnx(path: Path, e: BaseException, *, device: str = "cpu") -> ModelFileError:
    """Why ``path`` is no model: another featx file given as --model is named as what it is."""
    kind = file_kind(path)
    if kind == "cache":
        return ModelFileError(f"{path} is an embedding cache, not a model (similar, predict and evaluate take it "
                              "as --cache)")
    if kind == "safetensors":
        return ModelFileError(f"{path} is a head or a fine-tuning checkpoint, not a model: a head goes to --head "
                              "(predict, evaluate; export-classifier makes a model of it), a checkpoint to "
                              f"`featx export NAME --weights {path}`")
    if is_cuda(device):  # the file, or the GPU's provider (its libraries, its memory)
        return ModelFileError(f"{path}: onnxruntime cannot open it on {device} ({first_line(e)})")
    return ModelFileError(f"{path}: not a valid ONNX model ({first_line(e)})")


# the metadata of files read in this process, by path, size, modification time and inode: a run reads a file's
# several times (the by-path note, the engine, the store's check), and parsing VGG-16's 528 MB takes 0.7-1.3 s
_INFO_READ: dict[tuple[str, int, int, int], ModelInfo] = {}


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """The featx metadata of an exported file, without building an inference session. A file whose weights
    are not those featx wrote (the digest it recorded in the file) is refused, as an engine refuses it."""
    path = _existing(path)
    key = _checked_key(path)
    if key not in _INFO_READ:
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise _not_onnx(path, e) from None
        _remember_info(key, _info_of(path, proto))
    return _INFO_READ[key]


def _remember_info(key: tuple[str, int, int, int], info: ModelInfo) -> None:
    for array in (info.class_means, info.trained_phashes):  # shared by every later read: kept as read
        if array is not None:
            array.flags.writeable = False
    if len(_INFO_READ) >= 64:
        _INFO_READ.clear()
    _INFO_READ[key] = info


def _info_of(path: Path, proto) -> ModelInfo:
    meta = {p.key: p.value for p in proto.metadata_props}
    info = _info_from_metadata(path, meta)
    _check_weights(path, proto)
    if info.typical_cosine is not None:  # a merged classifier's or fine-tuned export's class means, from its graph
        from onnx import numpy_helper

        means = next((numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == CLASS_MEANS_NAME), None)
        info = dataclasses.replace(info, class_means=None if means is None else means.T.copy())
    return dataclasses.replace(info, pads_per_call=any(node.op_type == "Ceil" for node in proto.graph.node),
                               # a fine-tuned export or a merged head learnt on the file's own embeddings
                               unscaled_input=info.backbone in _SCALES_ITS_INPUT and info.trained_phashes is None
                               and info.class_scores == "logits" and info.preprocess.mean != (0.5, 0.5, 0.5)
                               and not _scales_input(proto),
                               weights_checked=TENSORS_DIGEST_KEY in meta)


# torchvision's: their weights take ImageNet-normalised input and scale it back (transform_input); timm's
# inception_v3, of the same name, is normalised to [-1, 1] (mean 0.5) and scales nothing
_SCALES_ITS_INPUT = ("inception_v3", "googlenet")


def _scales_input(proto) -> bool:
    """Whether the graph scales the normalised input per channel before its first convolution: torchvision's
    transform_input takes the three channels apart and joins them again (a Concat)."""
    for node in proto.graph.node:
        if node.op_type == "Conv":
            return False
        if node.op_type == "Concat":
            return True
    return False


# files whose weights matched their digest in this process (_checked_key): a run
# reads a file's metadata several times, and hashing ResNet-50's weights costs 0.15 s each time
_WEIGHTS_CHECKED: set[tuple[str, int, int, int]] = set()


def _checked_key(path: Path) -> tuple[str, int, int, int]:
    """A file as this process has seen it: a file written again, or another renamed over it, is another key."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino


def weights_written(path: str | os.PathLike, proto=None) -> None:
    """Count ``path`` as checked in this process: featx has just written it, its digest taken from the very
    tensors written (an export, a merged classifier), so its first engine does not parse and hash it
    again (VGG-16: 3 s of a 20 s export, and as long again where the same run then embeds with it).
    ``proto``, the model as written: its metadata is kept too, so its first reader does not parse it."""
    path = Path(path)
    key = _checked_key(path)
    _WEIGHTS_CHECKED.add(key)
    if proto is not None:
        with contextlib.suppress(ModelFileError):  # no featx metadata: refused when it is read
            _remember_info(key, _info_of(path, proto))


def rename_written_file(written: str | os.PathLike, path: str | os.PathLike) -> None:
    """``os.replace`` of a file :func:`weights_written` counted, its records kept under its new name."""
    before = _checked_key(Path(written))
    os.replace(written, path)
    after = _checked_key(Path(path))
    _WEIGHTS_CHECKED.add(after)
    if before in _INFO_READ:
        _INFO_READ[after] = _INFO_READ[before]


def _check_weights(path: Path, proto=None) -> None:
    """Refuse a file whose weights are not those featx wrote (:func:`featx.export.weights_damage`);
    ``proto``: the file parsed already, else parsed here (an engine's session has not parsed it in Python)."""
    seen = _checked_key(path)
    if seen in _WEIGHTS_CHECKED:
        return
    if proto is None:
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception:
            return  # no model at all: onnxruntime's refusal says why
    damage = weights_damage(proto)
    if damage is not None:
        raise ModelFileError(f"{path}: {damage}; export it again")
    _WEIGHTS_CHECKED.add(seen)


def model_file_for(model: str, fingerprint: str, recorded: str | None = None) -> Path | None:
    """The exported file a cache group or head was made with, found without --model: the path recorded
    when it was made, else the models folder's file of its name (``model``, the group's); only a file
    with that fingerprint. None when neither is there."""
    from .export import default_models_dir

    for candidate in (recorded, default_models_dir() / f"{model}.onnx"):
        if candidate and Path(candidate).is_file():
            try:
                if read_model_info(candidate).fingerprint == fingerprint:
                    return Path(candidate)
            except ModelFileError:
                continue
    return None


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist")
    return path


def _info_from_metadata(path: Path, meta: dict[str, str]) -> ModelInfo:
    if METADATA_KEY not in meta:
        raise ModelFileError(f"{path}: not exported by featx (no '{METADATA_KEY}' metadata); make one with `featx export`")
    try:
        info = ModelInfo.from_json(meta[METADATA_KEY])
        if "featx_classes" in meta:  # export_classifier's file: the backbone's metadata, its head's classes
            info = dataclasses.replace(info, class_names=[str(c) for c in json.loads(meta["featx_classes"])],
                                       class_scores="probabilities", multilabel=meta.get("featx_multilabel") == "1")
        if TYPICAL_COSINE_KEY in meta:
            info = dataclasses.replace(info, typical_cosine=float(meta[TYPICAL_COSINE_KEY]))
        if TRAINED_PHASHES_KEY in meta:
            info = dataclasses.replace(info, trained_phashes=decode_phashes(meta[TRAINED_PHASHES_KEY]))
        return info
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path}: featx metadata is unreadable ({first_line(e)})") from None


def check_same_weights(backbone, info: ModelInfo, model_file: str | os.PathLike | None = None) -> None:
    """Refuse torch weights other than those the exported file was made from (by their SHA-256)."""
    if backbone.weights_sha256() != info.weights_sha256:
        raise WeightsError(f"torch weights for {info.backbone} ({backbone.weights}) hash to "
                           f"{backbone.weights_sha256()[:12]}…, {model_file or 'the model file'} was exported from "
                           f"{info.weights_sha256[:12]}…: give the backbone name and the weights it was made from")


def torch_backbone(model: str | os.PathLike, weights: str | None = None):
    """The torch backbone of ``model``: a backbone name's, or the one an exported file was made from (the
    backbone and weights its metadata names, or ``weights``), for what needs torch (finetune, bench)."""
    from .backbones import load_backbone

    if not is_model_file(model):
        return load_backbone(str(model), weights=weights)
    info = read_model_info(model)
    source = weights or info.weights
    try:
        backbone = load_backbone(info.backbone, weights=source)
    except FeatxError as e:
        raise WeightsError(f"{model} was exported from torch weights (--model {info.backbone} --weights {source}) "
                           f"that cannot be loaded here: {e}") from None
    if weights is None:
        check_same_weights(backbone, info, model)
    return backbone


class OnnxEngine:
    """onnxruntime session over an exported file.

    Example:
        >>> engine = OnnxEngine("models/efficientnet_lite0.onnx")
        >>> engine.encode(images).embedding.shape   # images: uint8 (n, 224, 224, 3)
        (n, 1280)
    """

    name = "onnx"
    calibration = None  # the featx.calibration result when engine="auto" chose this engine
    _warm: int | None = None  # the batch size warmed up at

    def __init__(self, path: str | os.PathLike, *, device: Device | None = "auto", threads: int | None = None,
                 spin: bool = True, tensorrt: bool = False, cache_dir: str | os.PathLike | None = None):
        """``spin=False`` stops idle intra-op threads from spinning: slower alone, faster when decode
        workers share the cores (measured in benchmarks/embed_cache.py). ``tensorrt`` puts the
        TensorRT provider first (fp16, engines cached under ``cache_dir``); it needs a GPU and TensorRT."""
        import onnxruntime as ort

        self.path = _existing(path)
        self.device = resolve_device(device)
        if tensorrt:
            problem = tensorrt_problem()
            if problem:
                raise ModelFileError(f"--engine tensorrt: {problem}")
            if not is_cuda(self.device):
                raise ModelFileError("--engine tensorrt runs on a GPU; --device cpu was asked for")
            self.name = "tensorrt"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if is_cuda(self.device):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelFileError("--device cuda needs onnxruntime-gpu; this onnxruntime has no CUDA provider")
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # use the CUDA/cuDNN libraries that torch's wheels installed
            gpu = str(cuda_index(self.device))
            cuda_options = {"device_id": gpu, "cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": "1"}
            providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
            if tensorrt:
                from .export import default_models_dir

                trt_cache = Path(cache_dir or default_models_dir() / "tensorrt")
                trt_cache.mkdir(parents=True, exist_ok=True)
                # TensorRT builds an engine per input shape in minutes: cache it beside the models
                trt_options = {"device_id": gpu, "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
                               "trt_engine_cache_path": str(trt_cache), "trt_timing_cache_enable": "True"}
                providers.insert(0, ("TensorrtExecutionProvider", trt_options))
        try:
            # no fallback: onnxruntime's own printed a banner on stdout, among featx's results, and opened the
            # file again on the CPU, also where a GPU was asked for
            self.session = ort.InferenceSession(str(self.path), options, providers=providers, enable_fallback=0)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/InvalidGraph classes
            raise _not_onnx(self.path, e, device=self.device) from None
        try:
            meta = self.session.get_modelmeta().custom_metadata_map
        except UnicodeDecodeError as e:  # a damaged file whose metadata still parses
            raise ModelFileError(f"{self.path}: featx metadata is unreadable ({first_line(e)})") from None
        self.info = _info_from_metadata(self.path, meta)
        if TENSORS_DIGEST_KEY in meta:  # onnxruntime would run damaged weights, to other embeddings
            _check_weights(self.path)
        # the outputs featx reads: a classifier file's class_mean_cosine is for those who run it without
        # featx (classify computes it from the embedding), not computed a second time on every batch
        self.outputs = [o.name for o in self.session.get_outputs() if o.name in ("embedding", self.info.class_scores)]
        width = next((o.shape[-1] for o in self.session.get_outputs() if o.name == "embedding"), None)
        # files exported before timm's conv-head widths (MobileNetV3: 1280, not 960) were read right
        if isinstance(width, int) and width != self.info.embed_dim:
            raise ModelFileError(f"{self.path}: its embedding output is {width}-d but its featx metadata says "
                                 f"{self.info.embed_dim}-d; delete the file and export it again")
        started = self.session.get_providers()
        if is_cuda(self.device) and "CUDAExecutionProvider" not in started:
            raise ModelFileError(f"{self.path}: onnxruntime could not start its CUDA provider on this machine")
        if tensorrt and "TensorrtExecutionProvider" not in started:
            raise ModelFileError(f"{self.path}: onnxruntime could not start its TensorRT provider on this machine")

    def warmup(self, batch_size: int) -> None:
        """One run at ``batch_size``, so session start-up costs land before the first real batch."""
        if self._warm == batch_size:
            return
        h, w = self.info.preprocess.input_size
        self.encode(np.zeros((batch_size, h, w, 3), dtype=np.uint8))
        self._warm = batch_size

    def encode(self, images: np.ndarray) -> Encoded:
        """``images`` uint8 (n, H, W, 3) RGB, preprocessed as ``self.info.preprocess`` says."""
        result = self.session.run(self.outputs, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})
        named = dict(zip(self.outputs, result))
        return Encoded(named["embedding"], named.get(self.info.class_scores))


class TorchEngine:
    """The same model in torch: rebuilt from the registry, checked against the file's weights hash.

    On CUDA it runs in ``dtype`` (fp16 by default) with channels_last. ``compile`` takes a
    ``torch.compile`` mode (True means "default"); compiled graphs are frozen (inductor folds
    BatchNorm into the convolutions) and batches are padded to the first batch's size, so the
    compiled shape never changes.
    """

    name = "torch"
    calibration = None
    _warm: int | None = None

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
        check_same_weights(backbone, info)
        dtype = dtype or ("fp16" if is_cuda(self.device) or info.precision == "fp16" else "fp32")
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        if self.device == "cpu" and torch_dtype is torch.float16:
            torch_dtype = torch.float32  # fp16 convolutions on CPU are slower than fp32
        self.dtype = torch_dtype
        model = embedding_model(backbone, dtype=torch_dtype).to(self.device)
        if is_cuda(self.device):
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

        if self._warm == batch_size:
            return
        h, w = self.info.preprocess.input_size
        # eager on a CPU runs at full speed from its first call (Lite0, batch 64: 2.03 s, then 2.11, 1.96 s)
        for _ in range(2 if is_cuda(self.device) or self.compiled else 1):
            self.forward(torch.zeros((batch_size, h, w, 3), dtype=torch.uint8, device=self.device))
        if is_cuda(self.device):
            torch.cuda.synchronize(self.device)
        self._warm = batch_size

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
        if self.info.class_scores != "logits":  # a classifier file: torch rebuilds its backbone, not its head
            logits = None
        return Encoded(emb.float().cpu().numpy(), None if logits is None else logits.float().cpu().numpy())


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an engine error means the batch did not fit in memory (CUDA or host, torch or onnxruntime)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return any(s in text for s in ("out of memory", "failed to allocate memory", "bad_alloc", "bad allocation",
                                   "can't allocate memory", "alloc_failed", "cudaerrormemoryallocation"))


class BackoffEncoder:
    """Runs batches through an engine, at most ``limit`` images at a time; on out-of-memory it
    halves the limit and retries the same images, so none are lost or encoded twice.

    The lowered limit stays for the rest of the run (the next batches would not fit either).
    """

    def __init__(self, engine: Engine, limit: int):
        self.engine = engine
        self.limit = limit
        self.backoffs: list[int] = []  # the limits backed off to, in order

    def warmup(self) -> None:
        """The engine's warm-up at the current limit, backing off as ``encode`` does."""
        while True:
            try:
                return self.engine.warmup(self.limit)
            except Exception as e:
                if not is_out_of_memory(e) or self.limit == 1:
                    raise
                self._back_off(self.limit // 2, e)

    def encode(self, images) -> Encoded:
        n = len(images)
        parts: list[Encoded] = []
        start = 0
        while start < n:
            size = min(self.limit, n - start)
            try:
                parts.append(self.engine.encode(images[start:start + size]))
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                if size == 1:
                    raise ModelFileError(f"{self.engine.info.backbone}: out of memory with a single image "
                                         f"on {self.engine.device} ({_oom_reason(e)})") from None
                self._back_off(size // 2, e)
                continue
            start += size
        if len(parts) == 1:
            return parts[0]
        logits = [p.logits for p in parts]
        return Encoded(np.concatenate([p.embedding for p in parts]),
                       None if logits[0] is None else np.concatenate(logits))

    def _back_off(self, limit: int, error: BaseException) -> None:
        self.limit = limit
        self.backoffs.append(limit)
        _logger.warning("out of memory on %s (%s): batch size lowered to %d, the same images retried",
                        self.engine.device, _oom_reason(error), limit)
        if is_cuda(self.engine.device):
            import torch

            torch.cuda.empty_cache()  # what the failed batch left cached, back to the driver
        if getattr(self.engine, "compiled", False):
            self.engine.batch_size = limit  # the compiled shape follows (one recompile), padding stays within it


def _oom_reason(error: BaseException) -> str:
    """The allocation that failed, without onnxruntime's node names and source paths."""
    import re

    found = re.search(r"(failed to allocate memory[^.\n]*?size \d+|tried to allocate [\d.]+ \w+|out of memory)",
                      str(error), re.IGNORECASE)
    return found.group(1) if found else first_line(error)[:160]


CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 32


def default_batch_size(device: Device | None) -> int:
    """Images per engine call when none is asked for: 8 on the CPU, 32 on a GPU (``"auto"`` sizes a
    GPU's batch from its free memory).

    A CPU is busy inside each layer already at a few images, and past them the activations outgrow
    its caches. `featx embed` at batch 8 against 32 (2-core Xeon, ``python benchmarks/batch_sizes.py``,
    results in benchmarks/results/cpu): Lite0 120.4 vs 96.2 images/s, peak memory 283 vs 843 MB;
    MobileNetV3 193 vs 182 images/s; ResNet-50 35.0 vs 31.7. Batch 4 was no faster end to end."""
    return GPU_BATCH_SIZE if is_cuda(resolve_device(device)) else CPU_BATCH_SIZE


def auto_batch_size(engine: Engine, *, cap: int | None = None, memory_fraction: float = 0.6) -> int:
    """The batch size to run ``engine`` at, from its measured memory per image and the free memory.

    On CUDA: a probe at two batch sizes measures bytes per image (torch's peak-allocation counter
    for the torch engine, the driver's free memory for onnxruntime); the largest power of two
    that fits ``memory_fraction`` of the free memory, at most ``cap`` (1024). On CPU:
    ``CPU_BATCH_SIZE`` (throughput falls past it, see ``default_batch_size``), unless free memory
    says less; the ``BackoffEncoder`` handles what a probe misjudges.
    """
    h, w = engine.info.preprocess.input_size
    if not is_cuda(engine.device):
        cap = cap or CPU_BATCH_SIZE
        per_image = 4 * 3 * h * w * 64  # float activations of a few wide layers: a generous CPU bound
        return max(1, min(cap, _floor_pow2(memory_fraction * _free_host_memory() / per_image)))
    import torch

    cap = cap or 1024
    index = cuda_index(engine.device)
    probe = (8, 32)
    peaks = []
    model = getattr(engine, "model", None)
    eager = getattr(model, "_orig_mod", model)  # probe torch.compile'd models eagerly: no compile per shape
    free_at_start = torch.cuda.mem_get_info(index)[0]  # onnxruntime's arena keeps what it grew: one baseline
    for n in probe:
        torch.cuda.synchronize(index)
        if eager is not None:
            images = torch.zeros((n, h, w, 3), dtype=torch.uint8, device=engine.device)
            torch.cuda.reset_peak_memory_stats(index)
            base = torch.cuda.memory_allocated(index)
            with torch.inference_mode():
                eager(images)
            torch.cuda.synchronize(index)
            peaks.append(torch.cuda.max_memory_allocated(index) - base)
        else:
            engine.encode(np.zeros((n, h, w, 3), dtype=np.uint8))
            peaks.append(free_at_start - torch.cuda.mem_get_info(index)[0])
    per_image = max((peaks[1] - peaks[0]) / (probe[1] - probe[0]), 1.0)
    free = torch.cuda.mem_get_info(index)[0] + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    return max(1, min(cap, _floor_pow2(memory_fraction * free / per_image)))


def _floor_pow2(x: float) -> int:
    return 1 << max(0, int(x).bit_length() - 1) if x >= 1 else 1


def _free_host_memory() -> int:
    """Bytes this process may still take: MemAvailable, or the cgroup's limit when that is lower."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # macOS has no such name: no bound from here, the back-off stays
        free = 1 << 40
    try:
        free = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemAvailable"))) * 1024
        limit, used = (Path("/sys/fs/cgroup") / "memory.max").read_text().strip(), \
            int((Path("/sys/fs/cgroup") / "memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, StopIteration, ValueError):
        pass
    return free


def _freezing(on: bool):
    """Inductor's freezing (weights as constants: BatchNorm folded, layouts pre-packed), read when
    torch.compile compiles on the first call; patched per call so other compiled code is untouched."""
    import contextlib

    if not on:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def build_engine(name: str, path: str | os.PathLike, *, device: Device | None = "auto", threads: int | None = None,
                 spin: bool = True, compile: bool | str = False, backbone=None) -> Engine:
    """The engine called ``name``: "onnx", "tensorrt", "torch" or "torch-compiled"."""
    if name in ("onnx", "tensorrt"):
        return OnnxEngine(path, device=device, threads=threads, spin=spin, tensorrt=name == "tensorrt")
    if name in ("torch", "torch-compiled"):
        return TorchEngine(read_model_info(path), device=device, compile=compile or name == "torch-compiled",
                           backbone=backbone)
    raise ValueError(f"engine must be onnx, tensorrt, torch or auto, got {name!r}")


def load_model(
    path: str | os.PathLike,
    *,
    device: Device | None = "auto",
    engine: EngineName | None = "onnx",
    threads: int | None = None,
    compile: bool | str = False,
    spin: bool = True,
    batch_size: int | None = None,
    weights: str | os.PathLike | None = None,
) -> Engine:
    """Open an exported featx model file, or a backbone name (with ``weights``: exported into the models
    folder on first use, as ``embed_folder`` takes it), with the chosen engine.

    ``engine="auto"`` takes the engine that a short calibration on this device, model and
    ``batch_size`` measured fastest among those that agree with fp32 torch (featx.calibration; cached,
    so only the first run pays). ``compile`` asks for the torch engine compiled.

    Example:
        >>> featx.load_model("efficientnet_lite0", device="cpu").encode(images).embedding  # (n, 1280)
    """
    from .export import ensure_model_file

    path = ensure_model_file(path, weights=weights)
    device = resolve_device(device)
    if compile and engine in ("onnx", "tensorrt"):  # said rather than left unused
        raise FeatxError(f"--compile is the torch engine's (torch.compile); --engine {engine} runs onnxruntime: "
                         "drop one of them")
    if engine in (None, "auto") and compile:
        engine = "torch"
    if engine in (None, "auto"):
        from .calibration import choose_engine

        chosen, calibration = choose_engine(path, device=device, batch_size=batch_size or default_batch_size(device),
                                            threads=threads, spin=spin)
        _logger.info("%s", calibration.summary())
        chosen.calibration = calibration
        return chosen
    return build_engine(engine, path, device=device, threads=threads, spin=spin, compile=compile)
