"""JPEG decode and resize on the GPU (nvJPEG through torchvision), with the CPU path as fallback.

On a GPU the model outruns CPU JPEG decoding many times over, so decode moves to the GPU too:
file bytes are read by threads, JPEGs are decoded in one batched nvJPEG call, resized with
antialiasing in groups of equal size, centre-cropped, and handed to the torch engine as a uint8
(n, H, W, 3) CUDA tensor. Anything nvJPEG does not take (PNG and other formats, CMYK or rotated
JPEGs, files it rejects) goes through :func:`featx.data.load_image` on the CPU; a file that fails
both is a recorded failure, as on the CPU path.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .backbones import PreprocessConfig
from .data import DEFAULT_MAX_PIXELS, load_image, sniff_format
from .errors import ImageError

_logger = logging.getLogger(__name__)


def _read(path: str) -> bytes | ImageError:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return ImageError("no such file (deleted or moved before it could be read)")
    except OSError as e:
        return ImageError(f"cannot read: {e.strerror or e}")


def _gpu_ok(data: bytes, max_pixels: int) -> bool:
    """A JPEG that nvJPEG can take as it is: RGB or grey, upright, within the pixel limit."""
    if sniff_format(data[:16]) != "jpeg":
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:  # header only: no pixels are decoded here
            w, h = img.size
            return img.mode in ("RGB", "L") and w * h <= max_pixels and img.getexif().get(0x0112, 1) == 1
    except Exception:
        return False  # the CPU path will say what is wrong with it


class GpuDecoder:
    """Decode + preprocess batches of files on a CUDA device.

    ``decode(paths)`` returns ``(images, ok, failed)``: uint8 (n_ok, H, W, 3) on the GPU, the
    positions that succeeded, and (position, reason) for the rest.
    """

    def __init__(self, cfg: PreprocessConfig, *, device: str = "cuda", threads: int = 8,
                 max_pixels: int = DEFAULT_MAX_PIXELS, decode_threads: int = 4):
        import threading

        self.cfg = cfg
        self.device = device
        self.max_pixels = max_pixels
        self.decode_threads = decode_threads
        self._local = threading.local()  # one CUDA stream per thread that decodes
        self.decode_pool = cf.ThreadPoolExecutor(decode_threads)
        self.pool = cf.ThreadPoolExecutor(threads)  # file reads and CPU fallbacks
        self.ahead = cf.ThreadPoolExecutor(1)  # whole-batch reads, so they never wait on their own pool

    def read(self, paths: Sequence[str]) -> cf.Future:
        """Start reading a batch's bytes in the background; pass the future to ``decode``."""
        return self.ahead.submit(lambda: list(self.pool.map(_read, paths)))

    def decode(self, paths: Sequence[str], raw: cf.Future | None = None):
        """Thread-safe; runs on this thread's own CUDA stream and returns once the batch is complete."""
        import torch

        stream = self._stream()
        with torch.cuda.stream(stream):
            result = self._decode_batch(paths, raw)
        stream.synchronize()
        return result

    def _decode_batch(self, paths: Sequence[str], raw: cf.Future | None):
        import torch

        blobs = (raw or self.read(paths)).result()
        h, w = self.cfg.input_size
        out = torch.empty((len(paths), h, w, 3), dtype=torch.uint8, device=self.device)
        done: dict[int, bool] = {}
        failed: list[tuple[int, str]] = []
        gpu_idx = [i for i, b in enumerate(blobs) if isinstance(b, bytes) and _gpu_ok(b, self.max_pixels)]
        if gpu_idx:
            tensors = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in gpu_idx]
            decoded = self._decode_jpegs(tensors)
            groups: dict[tuple[int, int], list[int]] = {}
            for k, img in enumerate(decoded):
                if img is not None:
                    groups.setdefault(tuple(img.shape[1:]), []).append(k)
            for (ih, iw), members in groups.items():
                batch = torch.stack([decoded[k] for k in members])
                resized = self._resize_crop(batch, ih, iw)
                for row, k in enumerate(members):
                    out[gpu_idx[k]] = resized[row]
                    done[gpu_idx[k]] = True
        cpu_idx = [i for i in range(len(paths)) if i not in done]
        cpu_jobs = {i: self.pool.submit(self._cpu, paths[i], blobs[i]) for i in cpu_idx}
        for i, job in cpu_jobs.items():
            result = job.result()
            if isinstance(result, np.ndarray):
                out[i] = torch.from_numpy(result).to(self.device)
                done[i] = True
            else:
                failed.append((i, result))
        ok = sorted(done)
        images = out if len(ok) == len(paths) else out[torch.tensor(ok, dtype=torch.long, device=self.device)]
        return images, ok, sorted(failed)

    def _stream(self):
        import torch

        if not hasattr(self._local, "stream"):
            self._local.stream = torch.cuda.Stream(device=self.device)
        return self._local.stream

    def _decode_jpegs(self, tensors: list) -> list:
        """nvJPEG-decode in ``decode_threads`` slices at once (its Huffman stage runs on the CPU)."""
        k = self.decode_threads
        if k <= 1 or len(tensors) < 2 * k:
            return self._decode_slice(tensors)
        step = -(-len(tensors) // k)
        parts = [self.decode_pool.submit(self._decode_slice, tensors[i:i + step]) for i in range(0, len(tensors), step)]
        return [img for part in parts for img in part.result()]

    def _decode_slice(self, tensors: list) -> list:
        import torch
        import torchvision.io

        rgb = torchvision.io.ImageReadMode.RGB
        stream = self._stream()
        with torch.cuda.stream(stream):
            try:
                decoded = torchvision.io.decode_jpeg(tensors, mode=rgb, device=self.device)
            except RuntimeError:  # one bad file fails the batched call: retry one by one
                decoded = []
                for t in tensors:
                    try:
                        decoded.append(torchvision.io.decode_jpeg(t, mode=rgb, device=self.device))
                    except RuntimeError:
                        decoded.append(None)
        stream.synchronize()  # the images are complete before another stream reads them
        return decoded

    def _cpu(self, path: str, blob) -> np.ndarray | str:
        if isinstance(blob, ImageError):
            return str(blob)
        try:
            return load_image(path, self.cfg, max_pixels=self.max_pixels)
        except ImageError as e:
            return str(e)
        except Exception as e:  # a decoder bug must not end the run
            return f"unexpected {type(e).__name__}: {e}"

    def _resize_crop(self, batch, ih: int, iw: int):
        """uint8 (n, 3, ih, iw) -> uint8 (n, H, W, 3): the same geometry as data.preprocess_image."""
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        short, long = min(ih, iw), max(ih, iw)
        new_short, new_long = cfg.resize_size, int(cfg.resize_size * long / short)
        nh, nw = (new_short, new_long) if ih <= iw else (new_long, new_short)
        x = batch.float()
        if (nh, nw) != (ih, iw):
            mode = cfg.interpolation if cfg.interpolation != "nearest" else "nearest-exact"
            x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=mode != "nearest-exact",
                              align_corners=False if mode != "nearest-exact" else None)
        ch, cw = cfg.input_size
        top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
        x = x[:, :, max(top, 0):max(top, 0) + ch, max(left, 0):max(left, 0) + cw]
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.ahead.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
