"""Which engine embeds fastest for one model on one device: measured once, then cached.

``engine="auto"`` (the default of ``featx embed``) asks ``choose_engine``. Every candidate engine
that can start here (onnxruntime; its TensorRT provider when TensorRT is installed; torch; on a GPU
also torch.compile) embeds real photos at the run's batch size. It must agree with fp32 torch
(cosine >= 0.999 on every photo) and is timed after a warm-up (one under half the fastest so far on
two batches only); the fastest that agrees wins. The
result is cached in a JSON file keyed by the model's fingerprint, the device, the batch size and
the library versions, so later runs start at once; ``force=True`` (``featx calibrate --force``)
measures again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import FeatxError, first_line

_logger = logging.getLogger(__name__)

MIN_COSINE = 0.999  # every photo's embedding against fp32 torch: below this an engine is refused


@dataclass
class CandidateResult:
    engine: str  # "onnx", "tensorrt", "torch" or "torch-compiled"
    images_per_second: float | None = None
    cosine: float | None = None  # smallest cosine similarity to fp32 torch over the check photos
    problem: str | None = None  # why it was not started, failed, or was refused


@dataclass
class Calibration:
    model: str
    fingerprint: str
    device: str
    device_name: str
    batch_size: int
    chosen: str
    candidates: list[CandidateResult] = field(default_factory=list)
    seconds: float = 0.0
    from_cache: bool = False
    cache_file: str | None = None

    def text(self) -> str:
        lines = [f"calibration of {self.model} on {self.device} ({self.device_name}), batch {self.batch_size}"
                 + (" [cached]" if self.from_cache else f" [{self.seconds:.1f} s]")]
        for c in self.candidates:
            speed = f"{c.images_per_second:10.1f} images/s" if c.images_per_second is not None else " " * 19
            cos = f"  cos>={c.cosine:.5f}" if c.cosine is not None else ""
            mark = "  <- chosen" if c.engine == self.chosen else ""
            lines.append(f"  {c.engine:15s} {speed}{cos}{mark}" + (f"  ({c.problem})" if c.problem else ""))
        if self.cache_file:
            lines.append(f"-> {self.cache_file}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line for logs: the choice and the measured alternatives."""
        rates = ", ".join(f"{c.engine} {c.images_per_second:.0f}/s" for c in self.candidates
                          if c.images_per_second is not None)
        return f"engine {self.chosen} ({'cached calibration' if self.from_cache else 'calibrated'}: {rates or 'none timed'})"


def featx_cache_dir() -> Path:
    """``$FEATX_CACHE_DIR``, else ``$XDG_CACHE_HOME/featx``, else ``~/.cache/featx``."""
    if os.environ.get("FEATX_CACHE_DIR"):
        return Path(os.environ["FEATX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featx"


def candidate_engines(device: str) -> list[tuple[str, str | None]]:
    """(engine, why it cannot run here or None) for every engine featx has, on ``device``."""
    import onnxruntime as ort

    from .runtime import is_cuda, tensorrt_problem

    if not is_cuda(device):
        return [("onnx", None), ("torch", None)]
    cuda_ep = None if "CUDAExecutionProvider" in ort.get_available_providers() else \
        "this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
    return [("onnx", cuda_ep), ("tensorrt", tensorrt_problem()), ("torch", None), ("torch-compiled", None)]


def device_name(device: str) -> str:
    from .runtime import cuda_index, is_cuda

    if is_cuda(device):
        import torch

        return torch.cuda.get_device_name(cuda_index(device))
    from .bench import cpu_name

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_name()}, {cores} cores"


def _cache_key(fingerprint: str, name: str, batch_size: int, spin: bool, threads: int | None,
               per_call_padding: bool = False) -> str:
    """What the ranking depends on. Versions are read from the installed metadata: importing
    torch only to learn its version would cost a second on every CPU run. A file that pads per call
    (an earlier featx's export of a tf_ model: ModelInfo.pads_per_call) is the same model as its
    export today, but onnxruntime runs it at 0.6x on a CPU: ranked on its own (and rankings cached
    before featx told the two apart are measured again, once)."""
    from importlib.metadata import version

    ort = next((version(d) for d in ("onnxruntime-gpu", "onnxruntime") if _installed(d)), "?")
    return (f"{fingerprint}|{name}|batch {batch_size}|spin {spin}|threads {threads}|onnxruntime {ort}"
            f"|torch {version('torch')}|featx {__version__}|padding {'per call' if per_call_padding else 'fixed'}")


def _installed(distribution: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(distribution)
        return True
    except PackageNotFoundError:
        return False


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _logger.warning("ignoring unreadable calibration cache %s (%s); measuring again", path, e)
        return {}


def _write_cache(path: Path, key: str, calibration: Calibration) -> None:
    """Atomic: a killed run leaves the old file or the new one, never half of one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path)
        entries[key] = asdict(calibration)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop the run: the choice is only not remembered
        _logger.warning("could not cache the calibration in %s (%s)", path, e)


def _free_gpu_cache(device: str) -> None:
    """Give the memory of engines already dropped back to the driver before the next one is built."""
    from .runtime import is_cuda

    if is_cuda(device):
        import torch

        torch.cuda.empty_cache()


def choose_engine(path: str | os.PathLike, *, device: str, batch_size: int, force: bool = False,
                  threads: int | None = None, spin: bool = True):
    """(the fastest agreeing engine, built and warmed up at ``batch_size``; its Calibration)."""
    from .runtime import build_engine, read_model_info, resolve_device

    device = resolve_device(device)
    info = read_model_info(path)
    name = device_name(device)
    cache_file = featx_cache_dir() / "calibration.json"
    key = _cache_key(info.fingerprint, name, batch_size, spin, threads, info.pads_per_call)
    cached = None if force else _read_cache(cache_file).get(key)
    if cached is not None:
        try:
            candidates = [CandidateResult(**c) for c in cached.pop("candidates")]
            calibration = Calibration(**{**cached, "candidates": candidates, "from_cache": True,
                                         "cache_file": str(cache_file)})
            engine = build_engine(calibration.chosen, path, device=device, threads=threads, spin=spin)
            engine.warmup(batch_size)
            return engine, calibration
        except (TypeError, KeyError, FeatxError) as e:  # an older layout, or the chosen engine no longer starts
            _logger.warning("cached calibration not usable (%s); measuring again", e)

    from .backbones import load_backbone
    from .bench import time_throughput
    from .export import check_images, cosine_agreement
    from .runtime import TorchEngine

    start = time.perf_counter()
    photos = check_images(info.preprocess)
    batch = np.concatenate([photos] * -(-batch_size // len(photos)))[:batch_size]
    try:  # the reference every candidate must agree with: fp32 torch on the CPU, the same weights
        backbone = load_backbone(info.backbone, weights=info.weights)
        reference = TorchEngine(info, device="cpu", dtype="fp32", backbone=backbone).encode(photos).embedding
    except FeatxError as e:  # e.g. weights not downloadable here: onnxruntime alone, as exported and checked
        _logger.warning("torch weights for %s not available (%s): calibrating without the torch engines", info.backbone, e)
        backbone, reference = None, None

    results: list[CandidateResult] = []
    best = None
    for candidate, problem in candidate_engines(device):
        result = CandidateResult(candidate, problem=problem)
        results.append(result)
        if problem:
            continue
        if candidate.startswith("torch") and backbone is None:
            result.problem = "torch weights not available"
            continue
        engine = None
        try:
            engine = build_engine(candidate, path, device=device, backbone=backbone, threads=threads, spin=spin)
            engine.warmup(batch_size)
            if reference is not None:
                result.cosine = cosine_agreement(engine.encode(photos).embedding, reference)
                if result.cosine < MIN_COSINE:
                    result.problem = f"refused: embeddings differ from fp32 torch (cosine {result.cosine:.4f})"
                    continue
            # warm already; one under half the best so far is timed no further (torch on a CPU: 2 batches, not 6)
            rate, _ = time_throughput(lambda: engine.encode(batch), batch_size, repeats=3, min_seconds=0.25,
                                      warmups=0, give_up_below=best[1].images_per_second / 2 if best else None)
            result.images_per_second = rate
            if best is None or rate > best[1].images_per_second:
                best = (engine, result)  # the one it beats is dropped below
        except Exception as e:  # an engine that cannot run here is a result, not the end of the run
            result.problem = f"failed: {first_line(e)}"
        finally:
            engine = None  # only the best one stays referenced
            _free_gpu_cache(device)
    if best is None:
        raise FeatxError(f"no engine could run {path} on {device}: "
                         + "; ".join(f"{r.engine}: {r.problem}" for r in results))
    calibration = Calibration(model=info.backbone, fingerprint=info.fingerprint, device=device, device_name=name,
                              batch_size=batch_size, chosen=best[1].engine, candidates=results,
                              seconds=time.perf_counter() - start, cache_file=str(cache_file))
    _write_cache(cache_file, key, calibration)
    return best[0], calibration


def calibrate(path: str | os.PathLike, *, device: str = "auto", batch_size: int | None = None, force: bool = False,
              threads: int | None = None, spin: bool = True) -> Calibration:
    """Measure (or read from the cache) which engine ``engine="auto"`` takes for a model file or a
    backbone name (exported on first use); see the module doc. ``batch_size``: the device's default, as
    ``featx embed`` runs it, unless given.

    Example:
        >>> print(calibrate("efficientnet_lite0", device="cpu").text())
    """
    from .export import ensure_model_file
    from .runtime import default_batch_size, resolve_device

    path = ensure_model_file(path)
    device = resolve_device(device)
    return choose_engine(path, device=device, batch_size=batch_size or default_batch_size(device), force=force,
                         threads=threads, spin=spin)[1]
