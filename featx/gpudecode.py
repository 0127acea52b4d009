"""JPEG decode and resize on the GPU (nvJPEG through TorchCodec, or torchvision where TorchCodec does
not load), with the CPU path as fallback.

On a GPU the model outruns CPU JPEG decoding many times over, so decode moves to the GPU too:
file bytes are read by threads, JPEGs are decoded in one batched nvJPEG call, resized with
antialiasing in groups of equal size, centre-cropped, and handed to the torch engine as a uint8
(n, H, W, 3) CUDA tensor. Anything nvJPEG does not take (PNG and other formats, CMYK JPEGs, files
it rejects, and with torchvision EXIF-rotated JPEGs) goes through :func:`featx.data.load_image` on
the CPU; a file that fails both is a recorded failure, as on the CPU path.

TorchCodec is preferred: torchvision's image decoders are deprecated since torchvision 0.29 in its
favour, and torchvision runs every nvJPEG call behind one process-wide lock with one decoder, while
TorchCodec keeps a cache of decoders per GPU, so batches decoded from several threads run at once.
It also turns EXIF-rotated JPEGs upright as PIL's ``exif_transpose`` does (pixel for pixel on the
CPU: tests/test_gpudecode.py), so phone photos taken in portrait stay on the GPU.

nvImageCodec (``FEATX_JPEG_LIBRARY=nvimgcodec``, the nvidia-nvimgcodec-cu13 and nvidia-nvjpeg wheels)
is the third caller, for the hardware JPEG decoders of an A100 or H100, which decode beside the
CUDA cores; it runs only on a GPU, so its tests are those of tests/test_gpu.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import io
import itertools
import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .backbones import PreprocessConfig
from .data import (DEFAULT_MAX_PIXELS, DecodedBatch, content_digest, failure_reason, load_image, perceptual_hashes,
                   read_image_file)
from .errors import ImageError

_logger = logging.getLogger(__name__)


# Frame headers nvJPEG decodes: baseline, extended and progressive Huffman (not lossless, not arithmetic).
_NVJPEG_SOF = {0xC0, 0xC1, 0xC2}
_ANY_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH = {0x01, 0xD8, *range(0xD0, 0xD8)}


def _exif_orientation(tiff: bytes) -> int:
    """EXIF orientation (tag 0x0112 of IFD0) from the TIFF block of an APP1 segment; 1 when absent."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            return int.from_bytes(tiff[entry + 8:entry + 10], order) or 1
    return 1


JPEG_LIBRARIES = ("torchcodec", "torchvision", "nvimgcodec")


def jpeg_library(prefer: str = "auto") -> str:
    """The library that decodes JPEG batches: ``prefer`` if it loads, or with "auto" the one
    ``$FEATX_JPEG_LIBRARY`` names, else TorchCodec when it loads (it is built against torch's stable
    ABI, from torch 2.11), else torchvision. nvImageCodec is taken only when named: it reaches the
    hardware JPEG decoders of an A100 or H100 (NVJPG), which TorchCodec and torchvision do not ask
    for, but it is not yet measured against them (benchmarks/README.md, the GPU checklist)."""
    if prefer == "auto":
        prefer = os.environ.get("FEATX_JPEG_LIBRARY") or "auto"
    if prefer not in ("auto", *JPEG_LIBRARIES):
        raise ValueError(f"unknown JPEG decode library {prefer!r} (FEATX_JPEG_LIBRARY?): "
                         f"use auto, {', '.join(JPEG_LIBRARIES)}")
    if prefer == "nvimgcodec":
        problem = _nvimgcodec_problem()
        if problem is not None:
            raise ImportError(f"nvImageCodec does not decode JPEGs on the GPU here: {problem}")
        return "nvimgcodec"
    if prefer in ("auto", "torchcodec"):
        problem = _torchcodec_problem()
        if problem is None:
            return "torchcodec"
        if prefer == "torchcodec":
            raise ImportError(f"TorchCodec does not load here: {problem}")
    return "torchvision"


@functools.cache
def _torchcodec_problem() -> str | None:
    """Why TorchCodec's decoders do not load here (not installed, or its native library does not
    load with this torch), or None; tried once per process."""
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception as e:
        _logger.debug("TorchCodec does not load (%s); decoding JPEGs with torchvision", e)
        return str(e)
    return None


_NVIMGCODEC_GPU_BACKENDS = ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU")


def _nvimgcodec_decoder(device_id: int):
    """An nvImageCodec decoder on GPU ``device_id`` with its GPU backends alone: the hardware decoder
    first (A100, H100), then nvJPEG's CUDA and hybrid ones. Without its CPU backends a JPEG it cannot
    decode comes back as None and goes to featx's CPU path, which says why."""
    from nvidia import nvimgcodec

    backends = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind)) for kind in _NVIMGCODEC_GPU_BACKENDS]
    return nvimgcodec.Decoder(device_id=device_id, backends=backends)


@functools.cache
def _nvimgcodec_problem() -> str | None:
    """Why nvImageCodec does not decode a JPEG on the GPU here (not installed, no GPU, its nvJPEG
    extension without the nvidia-nvjpeg wheel: it would then decode nothing), or None; tried once."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device"
        from nvidia import nvimgcodec

        probe = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(probe, format="JPEG")
        decoded = _nvimgcodec_decoder(torch.cuda.current_device()).decode(
            [nvimgcodec.CodeStream(probe.getvalue())], params=_nvimgcodec_params())
    except Exception as e:
        _logger.debug("nvImageCodec does not load (%s)", e)
        return str(e) or type(e).__name__
    if decoded[0] is None:
        return "it decoded no JPEG (its nvJPEG extension needs the nvidia-nvjpeg wheel)"
    return None


def _nvimgcodec_params():
    """Planar RGB (3, h, w) as TorchCodec gives it, upright as PIL's exif_transpose turns it."""
    from nvidia import nvimgcodec

    return nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB,
                                   sample_format=nvimgcodec.SampleFormat.P_RGB)


def available_jpeg_libraries() -> list[str]:
    """The JPEG decode libraries that load here, preferred first."""
    available = []
    for library in JPEG_LIBRARIES:
        try:
            available += [library] if jpeg_library(library) == library else []
        except ImportError:
            pass
    return available


def nvjpeg_pixels(data, max_pixels: int, *, rotates: bool = False) -> int:
    """Width x height of a JPEG nvJPEG can take as it is, 0 for anything else. nvJPEG takes an 8-bit
    Huffman JPEG, YCbCr or grey, within the pixel limit, upright unless the decoder applies the EXIF
    orientation itself (``rotates``), and whole: an end-of-image marker after the first scan, since
    one truncated file (an interrupted copy or download) fails the whole batched call. Anything else
    goes to the CPU path, which says what is wrong with it. A scan of the marker segments, then a
    byte search from the end (the marker cannot occur inside the compressed data), no decoding: it
    runs once per image on the host, where parsing the file with PIL cost about 10 times as much."""
    raw = data if isinstance(data, (bytes, bytearray)) else bytes(data)  # for its C-speed find()
    data = memoryview(data)
    if bytes(data[:3]) != b"\xff\xd8\xff":
        return 0
    i, n, orientation, adobe_rgb, pixels = 2, len(data), 1, False, 0
    while i + 4 <= n:
        if data[i] != 0xFF:
            return 0
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _NO_LENGTH:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        segment = data[i + 4:i + 2 + length]
        if marker == 0xE1 and bytes(segment[:6]) == b"Exif\x00\x00":
            orientation = _exif_orientation(bytes(segment[6:]))
        elif marker == 0xEE and bytes(segment[:5]) == b"Adobe" and len(segment) >= 12:
            adobe_rgb = segment[11] == 0  # colour transform 0: RGB-coded, which nvJPEG would read as YCbCr
        elif marker in _ANY_SOF:
            if marker not in _NVJPEG_SOF or len(segment) < 6 or segment[0] != 8:
                return 0
            height, width, components = (segment[1] << 8) | segment[2], (segment[3] << 8) | segment[4], segment[5]
            upright = orientation == 1 or (rotates and 1 <= orientation <= 8)
            # a strip (aspect over 64:1) is resized to gigapixels on its short side: the CPU path refuses it
            if not ((components == 1 or (components == 3 and not adobe_rgb)) and upright
                    and 0 < width * height <= max_pixels and max(width, height) <= 64 * min(width, height)):
                return 0
            pixels = width * height
        elif marker == 0xDA:  # the first scan: the rest is compressed data up to the end-of-image marker,
            # found from the end (where it nearly always is; after it only what phones append)
            return pixels if pixels and raw.rfind(b"\xff\xd9", i + 2 + length) >= 0 else 0
        elif marker == 0xD9:  # end before any scan
            return 0
        i += 2 + length
    return 0


def _read(path: str, max_pixels: int, rotates: bool = False) -> tuple[bytearray | ImageError, int, str]:
    """(file bytes or why they could not be read, their pixels if nvJPEG can decode them else 0, their
    content_digest): the read threads hash too, so the engine thread never does."""
    try:
        data = read_image_file(path)
    except ImageError as e:
        return e, 0, ""
    return data, nvjpeg_pixels(data, max_pixels, rotates=rotates), content_digest(data)


class GpuDecoder:
    """Decode + preprocess batches of files: nvJPEG on a CUDA device, through ``library`` (see
    :func:`jpeg_library`).

    ``decode(paths)`` returns a DecodedBatch: uint8 (n_ok, H, W, 3) images on ``device``, the
    positions that succeeded, and (position, reason) for the rest. ``device="cpu"`` runs the same
    steps with libjpeg-turbo, so the batching, fallbacks and failures are tested without a GPU.
    """

    def __init__(self, cfg: PreprocessConfig, *, device: str = "cuda", threads: int = 8,
                 max_pixels: int = DEFAULT_MAX_PIXELS, library: str = "auto", pixels_per_call: int = 2**26):
        import threading

        self.cfg = cfg
        self.device = device
        self.max_pixels = max_pixels
        # GPU memory per batch in flight stays near 0.6 GiB whatever the photos' size: nvJPEG calls of
        # 64 Mpx (a whole batch of 256 photos up to 0.25 Mpx, e.g. 500x375, in one; 192 MiB decoded),
        # resized 16 Mpx at a time (192 MiB as floats)
        self.pixels_per_call = pixels_per_call
        self.resize_pixels = 2**24
        self.library = jpeg_library(library)
        if self.library == "nvimgcodec" and not device.startswith("cuda"):
            raise ValueError(f"nvImageCodec decodes on a GPU only, not on {device!r}")
        self._decode_list = self._batch_decode_fn()
        self._local = threading.local()  # one CUDA stream per thread that decodes
        self.pool = cf.ThreadPoolExecutor(threads)  # file reads + header checks, and CPU fallbacks
        self.ahead = cf.ThreadPoolExecutor(1)  # whole-batch reads, so they never wait on their own pool

    @property
    def rotates(self) -> bool:
        """Whether the library applies the EXIF orientation itself, as the CPU path does."""
        return self.library in ("torchcodec", "nvimgcodec")

    def read(self, paths: Sequence[str]) -> cf.Future:
        """Start reading a batch's bytes in the background; pass the future to ``decode``."""
        return self.ahead.submit(lambda: list(self.pool.map(_read, paths, itertools.repeat(self.max_pixels),
                                                            itertools.repeat(self.rotates))))

    def decode(self, paths: Sequence[str], raw: cf.Future | None = None):
        """Thread-safe; runs on this thread's own CUDA stream and returns once the batch is complete."""
        import torch

        if not self.device.startswith("cuda"):
            return self._decode_batch(paths, raw)
        stream = self._stream()
        with torch.cuda.stream(stream):
            result = self._decode_batch(paths, raw)
        stream.synchronize()
        return result

    def _decode_batch(self, paths: Sequence[str], raw: cf.Future | None):
        import torch

        read = (raw or self.read(paths)).result()
        h, w = self.cfg.input_size
        out = torch.empty((len(paths), h, w, 3), dtype=torch.uint8, device=self.device)
        done: set[int] = set()
        for call in self._calls([(i, pixels) for i, (_, pixels, _) in enumerate(read) if pixels]):
            decoded = self._decode_jpegs([torch.frombuffer(read[i][0], dtype=torch.uint8) for i in call])
            groups: dict[tuple[int, int], list[int]] = {}
            for k, img in enumerate(decoded):
                if img is not None:
                    groups.setdefault(tuple(img.shape[1:]), []).append(k)
            for (ih, iw), members in groups.items():
                step = max(1, self.resize_pixels // (ih * iw))
                for part in (members[j:j + step] for j in range(0, len(members), step)):
                    rows = [call[k] for k in part]
                    resized = self._resize_crop(torch.stack([decoded[k] for k in part]), ih, iw)
                    out.index_copy_(0, torch.tensor(rows, device=self.device), resized)
                    done.update(rows)
            del decoded  # full-size images: freed before the next call decodes
        cpu_jobs = {i: self.pool.submit(self._cpu, read[i][0]) for i in range(len(paths)) if i not in done}
        failed: list[tuple[int, str]] = []
        cpu_rows, cpu_images = [], []
        for i, job in cpu_jobs.items():
            result = job.result()
            if isinstance(result, np.ndarray):
                cpu_rows.append(i)
                cpu_images.append(result)
            else:
                failed.append((i, result))
        if cpu_rows:  # one host-to-device copy for all of them
            out.index_copy_(0, torch.tensor(cpu_rows, device=self.device), self.to_device(np.stack(cpu_images)))
            done.update(cpu_rows)
        ok = sorted(done)
        images = out if len(ok) == len(paths) else out[torch.tensor(ok, dtype=torch.long, device=self.device)]
        return DecodedBatch(images, ok, sorted(failed), decoded_by="gpu", digests=[read[i][2] for i in ok],
                            phashes=perceptual_hashes(images))

    def to_device(self, images: np.ndarray):
        """uint8 (n, H, W, 3) decoded on the host -> the same on ``device``, copied from pinned memory on
        this thread's stream (a pageable copy would hold up whichever thread asked for it)."""
        import torch

        tensor = torch.from_numpy(images)
        if not self.device.startswith("cuda"):
            return tensor
        with torch.cuda.stream(self._stream()):
            on_device = tensor.pin_memory().to(self.device, non_blocking=True)
        self._stream().synchronize()  # the pinned buffer may be freed once this returns
        return on_device

    def _stream(self):
        import torch

        if not hasattr(self._local, "stream"):
            self._local.stream = torch.cuda.Stream(device=self.device)
        return self._local.stream

    def _calls(self, jpegs: list[tuple[int, int]]) -> list[list[int]]:
        """Positions of the batch's (position, pixels) JPEGs split into consecutive nvJPEG calls of at most
        ``pixels_per_call`` pixels together (one image alone may be larger): a batch of 12-megapixel
        photos would otherwise decode to 8.7 GiB at once, and 35 GiB as floats in the resize."""
        calls: list[list[int]] = []
        total = self.pixels_per_call
        for i, pixels in jpegs:
            if total + pixels > self.pixels_per_call:
                calls.append([])
                total = 0
            calls[-1].append(i)
            total += pixels
        return calls

    def _decode_jpegs(self, tensors: list) -> list:
        """One batched call per batch, which keeps all of the GPU's hardware JPEG decoders busy (and with
        torchvision, whose calls queue behind one lock, several smaller calls would only wait). One bad
        file fails the whole call and the decoders say not which: the halves are decoded again, down to
        the bad files (None), so one bad file costs about 2 log2(n) calls instead of n single ones."""
        try:
            return self._decode_list(tensors)
        except (RuntimeError, ValueError):
            if len(tensors) == 1:
                return [None]
            half = len(tensors) // 2
            return self._decode_jpegs(tensors[:half]) + self._decode_jpegs(tensors[half:])

    def _batch_decode_fn(self):
        """list of 1-D uint8 CPU tensors -> list of uint8 (3, h, w) RGB images on ``device``."""
        device = self.device
        if self.library == "nvimgcodec":
            return self._nvimgcodec_decode
        if self.library == "torchcodec":
            from torchcodec.decoders import decode_jpeg

            return lambda tensors: decode_jpeg(list(tensors), mode="RGB", device=device)
        import torchvision.io

        rgb = torchvision.io.ImageReadMode.RGB
        return lambda tensors: torchvision.io.decode_jpeg(list(tensors), mode=rgb, device=device)

    def _nvimgcodec_decode(self, tensors: list) -> list:
        """The batch through nvImageCodec, on this thread's stream with this thread's decoder; each image
        handed to torch through DLPack (no copy), None where it could not be decoded."""
        import torch
        from nvidia import nvimgcodec

        if not hasattr(self._local, "nvimgcodec"):
            index = torch.device(self.device).index
            self._local.nvimgcodec = _nvimgcodec_decoder(torch.cuda.current_device() if index is None else index)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        images = self._local.nvimgcodec.decode([nvimgcodec.CodeStream(t.numpy()) for t in tensors],
                                               params=_nvimgcodec_params(), cuda_stream=stream)
        return [None if image is None else torch.from_dlpack(image) for image in images]

    def _cpu(self, blob) -> np.ndarray | str:
        """The CPU path on the bytes already read (the file is not read twice)."""
        if isinstance(blob, ImageError):
            return str(blob)
        try:
            return load_image(blob, self.cfg, max_pixels=self.max_pixels)
        except Exception as e:
            return failure_reason(e)

    def _resize_crop(self, batch, ih: int, iw: int):
        """uint8 (n, 3, ih, iw) -> uint8 (n, H, W, 3): the same geometry as data.preprocess_image."""
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        nw, nh = cfg.resized_size(iw, ih)
        x = batch.float()
        if (nh, nw) != (ih, iw):
            mode = cfg.interpolation if cfg.interpolation != "nearest" else "nearest-exact"
            x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=mode != "nearest-exact",
                              align_corners=False if mode != "nearest-exact" else None)
        ch, cw = cfg.input_size
        if nh < ch or nw < cw:  # timm's "border" (or a resize under the crop): padded as the CPU path pads
            canvas = torch.tensor(cfg.pad_fill, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            canvas = canvas.expand(len(x), 3, max(nh, ch), max(nw, cw)).clone()
            top, left = (max(nh, ch) - nh) // 2, (max(nw, cw) - nw) // 2
            canvas[:, :, top:top + nh, left:left + nw] = x
            x, (nh, nw) = canvas, canvas.shape[2:]
        top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
        x = x[:, :, max(top, 0):max(top, 0) + ch, max(left, 0):max(left, 0) + cw]
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    def close(self) -> None:
        self.ahead.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
