"""Throughput of featx against plain PyTorch, measured in one process on the same weights.

Model-only: featx's engines (uint8 batches in, embeddings out) against what a user writes in
PyTorch (the backbone in eval mode on normalised float tensors), after warm-up, several
repetitions, median and spread. End-to-end: ``embed_folder`` on an image folder against a DataLoader of
the same files (PIL + torchvision transforms) + the model, same workers, batch size and machine.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .backbones import DEFAULT_BACKBONE, PreprocessConfig

_logger = logging.getLogger(__name__)


@dataclass
class Timing:
    name: str
    kind: str  # "model" or "end-to-end"
    batch_size: int
    images_per_second: float
    spread: tuple[float, float]  # min and max images/s over the repetitions
    setup_seconds: float = 0.0  # export, session creation or compile time, outside the timed region
    note: str = ""


@dataclass
class BenchResult:
    model: str
    device: str
    machine: dict
    timings: list[Timing] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def table(self) -> str:
        width = max([44] + [len(t.name) for t in self.timings])  # the end-to-end rows' names run long
        lines = [f"featx bench: {self.model} on {self.device} ({self.machine.get('cpu', '')}"
                 f"{', ' + self.machine['gpu'] if self.machine.get('gpu') else ''})",
                 f"{'engine':{width}s} {'kind':10s} {'batch':>5s} {'images/s':>10s}  spread"]
        for t in self.timings:
            lines.append(f"{t.name:{width}s} {t.kind:10s} {t.batch_size:5d} {t.images_per_second:10.1f}  "
                         # end-to-end rows are one whole run each: no spread to show
                         + (f"{t.spread[0]:.1f}-{t.spread[1]:.1f}" if t.spread[1] else "-")
                         + (f"  ({t.note})" if t.note else ""))
        for k, v in self.ratios.items():
            lines.append(f"ratio {k}: {v:.2f}x")
        lines += [f"-> {f}" for f in self.files]
        return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_description() -> dict:
    import onnxruntime
    import torch

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "featx": __version__,
        "platform": platform.platform(),
    }


def time_throughput(run: Callable[[], object], batch_size: int, *, repeats: int = 5, min_seconds: float = 0.5,
                    sync: Callable[[], None] = lambda: None, warmups: int = 2,
                    give_up_below: float | None = None) -> tuple[float, tuple[float, float]]:
    """Median and (min, max) images/s of ``run`` (one batch per call) after ``warmups`` calls. With
    ``give_up_below`` (images/s), a run whose faster of two first calls is below it is timed no
    further: (that rate, (rate, rate)); the faster of two, as a hiccup of the machine only slows."""
    for _ in range(warmups):
        run()
    sync()
    per_call = float("inf")
    for _ in range(1 if give_up_below is None else 2):
        t0 = time.perf_counter()
        run()
        sync()
        per_call = min(per_call, max(time.perf_counter() - t0, 1e-6))
    if give_up_below is not None and batch_size / per_call < give_up_below:
        return batch_size / per_call, (batch_size / per_call, batch_size / per_call)
    calls = max(1, int(min_seconds / per_call))  # each repetition lasts about min_seconds
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        sync()
        rates.append(calls * batch_size / (time.perf_counter() - t0))
    return statistics.median(rates), (min(rates), max(rates))


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """onnxruntime dynamic int8 quantization of an exported file (metadata kept)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .export import save_model_file

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a paragraph per tensor it skips through the root logger
    try:
        # uint8 weights: ConvInteger with int8 weights is missing from onnxruntime 1.23, the last release
        # with Python 3.10 wheels, so such a file would not run there
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)
    proto, original = onnx.load(str(dst)), onnx.load(str(src), load_external_data=False)
    del proto.metadata_props[:]
    proto.metadata_props.extend(original.metadata_props)
    save_model_file(proto, dst)  # its weights are the quantized ones
    return Path(dst)


def bench_models(
    *,
    model: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    device: str = "auto",
    batch_sizes: list[int] = (1, 8, 32),
    half: bool = False,
    compile: bool | str | list[str] = False,
    images: str | os.PathLike | None = None,
    n_images: int | None = None,
    repeats: int = 5,
    int8: bool = False,
    end_to_end: bool = True,
    workers: int | None = None,
    out_dir: str | os.PathLike | None = "benchmarks/results",
    models_dir: str | os.PathLike | None = None,
) -> BenchResult:
    """Measure featx against plain PyTorch; write JSON and a PNG chart to ``out_dir``.

    The model alone at each of ``batch_sizes``; end to end (``featx embed`` against a DataLoader) at the
    device's default batch size when it is among them (what users run: 8 on the CPU), else the largest,
    on the image folder ``images`` (any layout and format embed reads), or on ``n_images`` generated
    500x375 JPEGs (512 by default).
    """
    import torch

    from .export import check_images, cosine_agreement, ensure_model_file, is_model_file
    from .errors import FeatxError, ModelFileError, check_writable_folder
    from .runtime import OnnxEngine, TorchEngine, default_batch_size, read_model_info, resolve_device, torch_backbone

    if out_dir:  # the results are written at the end: a folder that cannot take them is refused now
        check_writable_folder(out_dir, create=True)
    if images is not None and end_to_end:  # refused before minutes of model timings, not after them
        if n_images is not None:
            raise FeatxError(f"--n-images sizes the folder bench generates when --images is not given; {images} "
                             "is timed as it is")
        n_images = len(_images_of(images))  # the images found there: the end to end rows say how many
    elif n_images is None:
        n_images = 512
    device = resolve_device(device)
    backbone = torch_backbone(model, weights)
    t0 = time.perf_counter()
    model_file = ensure_model_file(model, weights=weights, half=half, models_dir=models_dir)
    export_seconds = time.perf_counter() - t0
    # a file is named by its stem: its path made the result files "_home_me_models_x.onnx-cpu.json"
    name = Path(model).stem if is_model_file(model) else str(model)
    info = read_model_info(model_file)
    precision = info.precision  # a file given as the model is timed as it is
    if half and precision != "fp16":
        _logger.warning("--half exports a backbone name at fp16; %s is %s and is timed as it is", model_file, precision)
    result = BenchResult(model=f"{name}{' fp16' if precision == 'fp16' else ''}", device=device,
                         machine=machine_description())
    cfg = backbone.preprocess
    h, w = cfg.input_size
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)

    # the int8 copy, the generated JPEGs and the end-to-end caches: gone when bench returns or fails, so
    # runs do not fill the temporary folder (a 512-JPEG run wrote 26 MB)
    with tempfile.TemporaryDirectory(prefix="featx-bench-", ignore_cleanup_errors=True) as scratch:
        engines: list[tuple[str, Callable]] = []
        t0 = time.perf_counter()
        try:
            ort_engine = OnnxEngine(model_file, device=device)
            engines.append((f"featx onnxruntime {precision} ({device})", lambda x: ort_engine.encode(x)))
        except ModelFileError as e:  # e.g. CPU-only onnxruntime on a GPU machine: measure the rest
            _logger.warning("onnxruntime engine not measured: %s", e)
        ort_setup = time.perf_counter() - t0 + export_seconds
        if int8 and device != "cpu":
            _logger.warning("--int8 is timed on the CPU only (onnxruntime's dynamic int8 kernels are the CPU's): "
                            "not measured on %s", device)
        if int8 and device == "cpu":
            q_path = quantize_int8(model_file, Path(scratch) / "int8.onnx")
            q_engine = OnnxEngine(q_path, device="cpu")
            photos = check_images(cfg)
            agreement = cosine_agreement(q_engine.encode(photos).embedding, ort_engine.encode(photos).embedding)
            engines.append((f"featx onnxruntime int8 (cos>={agreement:.4f})", lambda x: q_engine.encode(x)))
        torch_engine = TorchEngine(info, device=device, backbone=backbone)
        engines.append((f"featx torch engine {'fp16 channels_last' if device == 'cuda' else 'fp32'}",
                        lambda x: torch_engine.forward(x)))
        modes = [] if not compile else ["default"] if compile is True else [compile] if isinstance(compile, str) else compile
        for mode in modes:
            compiled = TorchEngine(info, device=device, backbone=backbone, compile=True if mode == "default" else mode)
            engines.append((f"featx torch engine compiled ({mode})", compiled.forward))

        plain = backbone.features.to(device).eval()
        baselines: list[tuple[str, Callable, str]] = [("torch eager fp32", plain, "fp32")]
        if device == "cuda":
            torch.backends.cudnn.benchmark = True
            plain_half = copy.deepcopy(plain).half().to(memory_format=torch.channels_last)
            baselines.append(("torch eager fp16 channels_last", plain_half, "fp16"))
            if compile:
                baselines.append(("torch.compile fp16 channels_last", torch.compile(plain_half), "fp16"))

        for bs in batch_sizes:
            batch_u8 = rng.integers(0, 256, (bs, h, w, 3), dtype=np.uint8)
            batch_t = torch.from_numpy(batch_u8)
            gpu_u8 = batch_t.to(device)
            # the permuted NHWC batch stays channels_last in memory, as featx's torch engine runs: on a CPU that
            # is 1.5x the contiguous NCHW a DataLoader of ToTensor gives (Lite0, batch 32, 2-core Xeon: 42-45
            # against 28 images/s), so the eager baseline is the stronger of the two
            float_in = ((batch_t.permute(0, 3, 1, 2).float() / 255 - mean) / std).to(device)
            for name, fn in engines:
                x = batch_u8 if name.startswith("featx onnxruntime") else gpu_u8
                t0 = time.perf_counter()
                fn(x)
                sync()
                first_call = time.perf_counter() - t0
                rate, spread = time_throughput(lambda: fn(x), bs, repeats=repeats, sync=sync)
                setup = ort_setup if "onnxruntime" in name else first_call
                result.timings.append(Timing(name, "model", bs, rate, spread, setup))
            for name, module, precision in baselines:
                x = float_in.half().contiguous(memory_format=torch.channels_last) if precision == "fp16" else float_in
                t0 = time.perf_counter()
                with torch.inference_mode():
                    module(x)
                sync()
                first_call = time.perf_counter() - t0

                def run(module=module, x=x):
                    with torch.inference_mode():
                        return module(x)

                rate, spread = time_throughput(run, bs, repeats=repeats, sync=sync)
                result.timings.append(Timing(name, "model", bs, rate, spread, first_call))

        if end_to_end:
            first_mode = modes[0] if modes else False
            embed_default = default_batch_size(device)
            e2e_batch = embed_default if embed_default in batch_sizes else max(batch_sizes)
            _bench_end_to_end(result, backbone, model_file, images, n_images, e2e_batch, device, workers,
                              True if first_mode == "default" else first_mode, Path(scratch))
    _ratios(result)
    if out_dir:
        result.files = _write_results(result, Path(out_dir))
    return result


def _bench_end_to_end(result, backbone, model_file, images, n_images, batch_size, device, workers, compile,
                      tmp: Path) -> None:
    """Both sides timed from their first image, with the model already loaded (setup reported apart).
    ``n_images``: how many images the folder ``images`` holds, or how many to generate without one; ``tmp``
    takes the generated JPEGs and the caches."""
    import torch
    import torchvision

    from .errors import FeatxError
    from .pipeline import default_workers, embed_folder
    from .samples import write_jpeg_folder
    from .store import load_digests, load_failures

    workers = default_workers() if workers is None else workers
    root = Path(images) if images else write_jpeg_folder(tmp / "jpegs", n_images)
    n = n_images

    compile = compile if device == "cuda" else False
    runs = [(workers, f"{workers} decode worker{'s' * (workers != 1)}")]
    if device == "cuda":  # nvJPEG alone, and with the CPU workers taking a share of the batches
        from .gpudecode import jpeg_library

        nvjpeg = f"nvJPEG through {jpeg_library()}"
        runs = [(0, nvjpeg), (None, f"{nvjpeg} + {default_workers(gpu_decode=True)} CPU decode workers")]
    for run_workers, how in runs:
        stats = embed_folder(root, tmp / f"bench-{how}.h5", model=model_file, batch_size=batch_size,
                             workers=run_workers, device=device, engine="auto", compile=compile)
        result.timings.append(Timing(f"featx embed (decode+infer+store{', compiled' if compile else ''}, {how})",
                                     "end-to-end", batch_size, stats.steady_images_per_second, (0, 0),
                                     setup_seconds=stats.load_seconds,
                                     note=f"{stats.n_embedded} images" + (f" ({stats.n_failed} of the {n} files cannot "
                                          "be read: tried, not counted)" if stats.n_failed else "")
                                          + f"; {stats.engine}"))
        embedded = [str(root / key) for key in load_digests(tmp / f"bench-{how}.h5")[0]]
        if not embedded:
            key, reason = next(iter(load_failures(tmp / f"bench-{how}.h5").items()))
            raise FeatxError(f"none of the {n} image files under {root} could be read, nothing to time end to end "
                             f"(e.g. {key}: {reason})")

    if device == "cuda":  # the pipeline's decode stage alone, to tell a decode wall from a model wall
        from .data import DEFAULT_MAX_PIXELS, FileEntry
        from .gpudecode import available_jpeg_libraries
        from .pipeline import _gpu_decode_ahead

        entries = [FileEntry(key=p, path=p, label=None, size=0, mtime_ns=0) for p in embedded]
        batches = [entries[i:i + batch_size] for i in range(0, len(entries), batch_size)]

        def decode_all():
            for _ in _gpu_decode_ahead(iter(batches), backbone.preprocess, "cuda:0", DEFAULT_MAX_PIXELS):
                pass
            torch.cuda.synchronize()

        # with each JPEG library that loads (the one embed took first): which decodes fastest is then
        # read from one run
        chosen = os.environ.get("FEATX_JPEG_LIBRARY")
        first = jpeg_library()
        libraries = [first] + [lib for lib in available_jpeg_libraries() if lib != first]
        try:
            for library in libraries:
                os.environ["FEATX_JPEG_LIBRARY"] = library
                decode_all()  # warm-up: decoder handles, allocator, page cache
                t0 = time.perf_counter()
                decode_all()
                result.timings.append(Timing(f"featx GPU decode+resize only (no model, {library})", "end-to-end",
                                             batch_size, len(entries) / (time.perf_counter() - t0), (0, 0),
                                             note=f"{len(entries)} images; nvJPEG through {library}"))
        finally:
            if chosen is None:
                os.environ.pop("FEATX_JPEG_LIBRARY", None)
            else:
                os.environ["FEATX_JPEG_LIBRARY"] = chosen

    p = backbone.preprocess
    # torchvision's Resize of the shorter side, or of both (timm's "squash"); timm's "border" fits the longer
    # side (its padding a plain crop gives in black)
    mode = getattr(torchvision.transforms.InterpolationMode, p.interpolation.upper())
    resize = torchvision.transforms.Resize(p.box[::-1] if p.crop_mode == "squash" else p.resize_size,
                                           interpolation=mode)
    if p.crop_mode == "border":
        resize = torchvision.transforms.Lambda(functools.partial(_fit_longer_side, cfg=p))
    transform = torchvision.transforms.Compose([
        resize,
        torchvision.transforms.CenterCrop(p.input_size),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(p.mean, p.std),
    ])
    # the files featx embedded (those it could read), in any layout: ImageFolder wants class folders
    dataset = _ImageFiles(embedded, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device == "cuda")
    model = backbone.features.to(device).eval()
    t0 = time.perf_counter()
    kept = []
    with torch.inference_mode():
        for x, _ in loader:
            kept.append(model(x.to(device, non_blocking=True)).cpu())
    torch_seconds = time.perf_counter() - t0
    result.timings.append(Timing("plain PyTorch DataLoader fp32", "end-to-end", batch_size,
                                 sum(len(k) for k in kept) / torch_seconds, (0, 0),
                                 note=f"{len(embedded)} images (PIL + torchvision transforms), "
                                      f"{workers} worker{'s' * (workers != 1)}"))


def _images_of(folder: str | os.PathLike) -> list[str]:
    """The image files embed reads under ``folder``; a FeatxError when it is no folder or holds none."""
    from .data import FileEntry, folder_to_walk, walk_images
    from .errors import FeatxError
    from .pipeline import WHAT_FEATX_READS

    files = [e.path for e in walk_images(folder_to_walk(folder)) if isinstance(e, FileEntry)]
    if not files:
        raise FeatxError(f"{folder} holds no image files to time end to end ({WHAT_FEATX_READS})")
    return files


class _ImageFiles:
    """What a user writes in PyTorch for a list of image files: PIL opens each, torchvision's
    transforms make the tensor (a map-style dataset a DataLoader batches)."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), 0


def _ratios(result: BenchResult) -> None:
    by = {}
    for t in result.timings:
        by.setdefault((t.name, t.kind, t.batch_size), t.images_per_second)
    model_rows = [t for t in result.timings if t.kind == "model"]
    featx_rows = [t for t in model_rows if t.name.startswith("featx") and "int8" not in t.name]
    for bs in sorted({t.batch_size for t in model_rows}):
        best = max((t for t in featx_rows if t.batch_size == bs), key=lambda t: t.images_per_second)
        for base in ("torch eager fp32", "torch.compile fp16 channels_last"):
            if (base, "model", bs) in by:
                result.ratios[f"best featx ({best.name}) / {base}, batch {bs}"] = (
                    best.images_per_second / by[(base, "model", bs)])
    e2e = [t for t in result.timings if t.kind == "end-to-end" and "only" not in t.name]
    featx_e2e = [t.images_per_second for t in e2e if t.name.startswith("featx")]
    plain = [t.images_per_second for t in e2e if t.name.startswith("plain")]
    if featx_e2e and plain:
        a = max(featx_e2e)
        result.ratios["end-to-end featx embed / plain PyTorch pipeline"] = a / plain[0]
        model_best = max((t.images_per_second for t in featx_rows if t.batch_size == e2e[0].batch_size), default=0)
        if model_best:
            result.ratios["end-to-end featx embed / featx model-only (same batch)"] = a / model_best


def replot(json_path: str | os.PathLike) -> list[str]:
    """Redraw the PNG of a recorded result (and rewrite its JSON unchanged) without measuring again."""
    d = json.loads(Path(json_path).read_text())
    result = BenchResult(d["model"], d["device"], d["machine"],
                         [Timing(**{**t, "spread": tuple(t["spread"])}) for t in d["timings"]], d["ratios"])
    return _write_results(result, Path(json_path).parent)


def _write_results(result: BenchResult, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result.model.replace(' ', '-').replace('/', '_')}-{result.device}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(asdict(result), indent=2))
    names = list(dict.fromkeys(t.name for t in result.timings if t.kind == "model"))
    sizes = sorted({t.batch_size for t in result.timings if t.kind == "model"})
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [3, 1.2]})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        rates = [next((t.images_per_second for t in result.timings if t.name == name and t.batch_size == bs
                       and t.kind == "model"), 0) for bs in sizes]
        axes[0].bar(np.arange(len(sizes)) + i * width, rates, width, label=name)
    axes[0].set_xticks(np.arange(len(sizes)) + width * (len(names) - 1) / 2, [f"batch {b}" for b in sizes])
    axes[0].set_ylabel("images/s")
    axes[0].set_title(f"model only: {result.model} on {result.device}")
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    e2e = [t for t in result.timings if t.kind == "end-to-end"]
    import textwrap

    axes[1].bar(range(len(e2e)), [t.images_per_second for t in e2e],
                color=["tab:gray" if t.name.startswith("plain") else "tab:blue" for t in e2e])
    # names wrap between words ("Im / ageFolder" before)
    axes[1].set_xticks(range(len(e2e)), [textwrap.fill(t.name, 18, break_long_words=False) for t in e2e], fontsize=6)
    axes[1].set_ylabel("images/s")
    axes[1].set_title("end to end (JPEG folder)")
    fig.tight_layout()
    png_path = out_dir / f"{stem}.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return [str(json_path), str(png_path)]


def scratch_folder(prefix: str) -> Path:
    """A new temporary folder, removed when the process exits: a benchmark script's JPEGs, exports and
    caches (tens of MB a run) do not pile up in the temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _fit_longer_side(img, cfg: PreprocessConfig):
    """A PIL image resized as timm's "border" mode resizes it (a picklable transform for DataLoader workers)."""
    from .data import _INTERPOLATION

    return img.resize(cfg.resized_size(*img.size), _INTERPOLATION[cfg.interpolation])


def bench_workspace(prefix: str, n_jpegs: int = 0, model: str = DEFAULT_BACKBONE) -> tuple[Path, Path, Path | None]:
    """(a fresh temporary folder, ``model``'s export, a folder of ``n_jpegs`` 500x375 JPEGs or None): what the
    benchmark scripts start from, so no file from an earlier run is measured. The export is the one in
    ``$FEATX_MODELS`` where that is set (featx's models folder of the user's choosing, whose files are
    checked and exported again when stale; the tests' session export), else made in the folder. The folder
    is removed when the process exits."""
    from .export import ensure_model_file
    from .samples import write_jpeg_folder

    tmp = scratch_folder(prefix)
    model_file = ensure_model_file(model, models_dir=os.environ.get("FEATX_MODELS") or tmp / "models")
    return tmp, model_file, write_jpeg_folder(tmp / "jpegs", n_jpegs) if n_jpegs else None


def write_record(record: dict, out_dir: str | os.PathLike, name: str, *, plot_rates: bool = False) -> Path:
    """Print a benchmark script's figures, one a line, and write them as ``out_dir/name.json``; with
    ``plot_rates``, also ``out_dir/name.png``: a bar a ``*_per_s`` figure, to see at a glance which stage
    is the slowest."""
    for key, value in record.items():
        if key != "machine":
            print(f"{key:40s} {value:.4g}" if isinstance(value, float) else f"{key:40s} {value}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name.replace("/", "_")  # a model named as timm/pnasnet5large: one file, not a folder
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"-> {path}")
    if plot_rates:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rates = {k[:-len("_per_s")]: v for k, v in record.items() if k.endswith("_per_s") and isinstance(v, float)}
        fig, ax = plt.subplots(figsize=(9, 0.3 * len(rates) + 1.2))
        ax.barh(range(len(rates)), list(rates.values()), color="tab:blue")
        ax.set_yticks(range(len(rates)), [k.replace("_", " ") for k in rates], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")  # file reads run at tens of thousands a second, decoders at hundreds
        ax.set_xlabel("per second (log scale)")
        ax.set_title(f"{name} ({record.get('machine', {}).get('gpu') or record.get('machine', {}).get('cpu', '')})",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        print(f"-> {out / f'{name}.png'}")
    return path
