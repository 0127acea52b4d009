"""Folder -> stream of files with labels -> decoded, preprocessed uint8 batches. Failures are data.

Nothing here imports torch or onnxruntime: decode workers stay light.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
import stat
import threading
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .backbones import PreprocessConfig
from .errors import FeatxError, ImageError

_logger = logging.getLogger(__name__)

# .jfif and .jpe: JPEGs as Windows and browsers save them ("Save image as" in Chrome on Windows)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".heic", ".heif", ".avif",
                              # Netpbm: datasets from before PNG was everywhere (GTSRB's traffic signs, AT&T's faces)
                              ".ppm", ".pgm", ".pbm", ".pnm",
                              # JPEG 2000: archives, medical and satellite imagery (Pillow's own OpenJPEG)
                              ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx"})
DEFAULT_MAX_PIXELS = 100_000_000  # larger images are refused as decompression bombs (--max-pixels)
_INTERPOLATION = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
# Where an image has transparency, it is composited onto this colour (white, as browsers show it).
ALPHA_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class FileEntry:
    """One image file found under the root. ``key`` is its path relative to the root, '/'-separated."""

    key: str
    path: str
    label: str | None  # first-level subfolder, None for files directly under the root
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class WalkFailure:
    """Something under the root that could not be listed (unreadable folder, symlink loop)."""

    key: str
    reason: str


def sniff_format(head: bytes) -> str | None:
    """Image format from the first (32) bytes of a file, or None when it is no image type featx reads."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6") and head[2:3].isspace():
        return "pnm"  # Netpbm: bitmap, greymap, pixmap, as text (1-3) or binary (4-6)
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "jpeg2000"  # the JP2 file's signature box, or a bare codestream's SOC and SIZ markers
    if head[4:8] == b"ftyp":  # ISO base media file: the major brand, or a generic one and the compatible list
        brand, compatible = head[8:12], head[16:32]
        if brand in (b"avif", b"avis") or (brand in (b"mif1", b"msf1") and b"avif" in compatible):
            return "avif"
        if brand in _HEIF_BRANDS:
            return "heif"
    return None


# HEVC-coded HEIF (phones' .heic) and the generic image brands; AVIF is told apart by its own brand
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}


# what libtiff said while this thread decoded a TIFF (its errors, in order); None outside such a decode
_libtiff_said = threading.local()


@functools.cache
def _take_libtiff_messages() -> None:
    """libtiff's errors and warnings go to featx instead of stderr, where libtiff writes them itself, from C,
    naming no file ("ZIPDecode: Decoding error at scanline 0, invalid distance too far back" between the
    progress bar's lines, a line per damaged strip). Errors are kept per thread (:data:`_libtiff_said`), so
    a damaged TIFF's failure row says what libtiff found, where Pillow says only "decoder error -2";
    warnings (a tag it does not know) are dropped, as Pillow's own are. Only Pillow's libtiff is set
    (:func:`_pillows_library`); left as it is where it is not found (Windows, where Pillow links libtiff
    into itself)."""
    import ctypes
    import ctypes.util

    path = _pillows_library("libtiff")
    if path is None:
        return
    try:
        libtiff = ctypes.CDLL(path)
        vsnprintf = ctypes.CDLL(ctypes.util.find_library("c")).vsnprintf
        set_error, set_warning = libtiff.TIFFSetErrorHandler, libtiff.TIFFSetWarningHandler
    except (OSError, AttributeError, TypeError):
        return
    # void handler(const char *module, const char *fmt, va_list ap): a va_list is passed as a pointer (x86-64:
    # an array; AArch64: a structure of 32 bytes, passed by reference), which vsnprintf takes as it came
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
    vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

    def error(module: bytes | None, fmt: bytes | None, args: int | None) -> None:
        said = getattr(_libtiff_said, "errors", None)
        if said is None or fmt is None:
            return
        text = ctypes.create_string_buffer(300)
        vsnprintf(text, len(text), fmt, args)
        module_name = (module or b"").decode(errors="replace")
        # Pillow hands libtiff its file as "tempfile.tif": a module name says where in libtiff, a file name nothing
        said.append(" ".join(filter(None, [f"{module_name}:" if module_name and "." not in module_name else "",
                                           text.value.decode(errors="replace").strip()])))

    handlers = handler_type(error), handler_type(lambda module, fmt, args: None)
    for setter, handler in zip((set_error, set_warning), handlers):
        setter.argtypes, setter.restype = [handler_type], ctypes.c_void_p
        setter(handler)
    _LIBTIFF_HANDLERS.extend(handlers)  # libtiff keeps only their addresses: they must outlive every call


_LIBTIFF_HANDLERS: list = []


def _pillows_library(prefix: str) -> str | None:
    """The path of the shared library named ``prefix`` that Pillow uses: the copy its wheel carries
    (``pillow.libs/libtiff-20b7e810.so.6.3.0`` on Linux, ``PIL/.dylibs`` on macOS), else the one this
    process has loaded (a Pillow built on the system's libtiff), else None. Another library's own copy
    (OpenCV's, GDAL's) is left alone: their messages are theirs to handle."""
    import glob

    import PIL

    site = os.path.dirname(os.path.dirname(PIL.__file__))
    for folder in (os.path.join(site, "pillow.libs"), os.path.join(site, "PIL", ".dylibs")):
        found = sorted(glob.glob(os.path.join(folder, prefix + "[.-]*")))
        if found:
            return found[0]
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith(prefix + "."):  # libtiff.so.6
                    return path
    except OSError:
        pass
    return None


@functools.cache
def _open_heif_with_pillow() -> None:
    """Teach PIL to open HEIF (Pillow reads AVIF itself). pillow-heif applies the container's
    rotation and mirror while decoding and sets the EXIF orientation to 1, so the exif_transpose
    every image goes through does not turn it twice."""
    try:
        import pillow_heif
    except ImportError:
        raise ImageError("HEIC/HEIF photo, and pillow-heif is not installed (pip install pillow-heif)") from None
    pillow_heif.register_heif_opener()


# Folders that hold nobody's photos but sit among them: what NAS boxes (Synology's thumbnails and recycle
# bin), zip tools on macOS and Windows drives leave there. Names with a leading dot are passed over too:
# .thumbnails, .Trash-1000, and macOS's AppleDouble files "._IMG_0001.jpg", which carry the photo's
# extension but no image (on a drive copied from a Mac there is one beside every photo).
SYSTEM_FOLDERS = frozenset({"__MACOSX", "@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information"})


# camera RAW files, common in photo folders, that Pillow does not decode (named in the walk's note)
CAMERA_RAW_EXTENSIONS = frozenset({".3fr", ".arw", ".cr2", ".cr3", ".crw", ".dcr", ".dng", ".erf", ".kdc", ".mos",
                                   ".mrw", ".nef", ".nrw", ".orf", ".pef", ".raf", ".raw", ".rw2", ".rwl", ".sr2",
                                   ".srf", ".srw", ".x3f"})


def is_passed_over(name: str) -> bool:
    """Whether the walk leaves out a file or folder of this name: hidden, or a system folder."""
    return name.startswith(".") or name in SYSTEM_FOLDERS


def printable(name: str) -> str:
    """A file name for a line of text: control characters (a newline or a tab in the name) written as
    Python escapes them (``\\n``), so that each file stays one line of classify's, predict's, similar's
    and info's output. CSV files keep names as they are (quoted)."""
    if name.isprintable():
        return name
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) == "Cc" else c for c in name)


def walk_sort_key(key: str) -> list[bytes]:
    """What sorts cache keys ('/'-separated paths under the walked folder) in the order
    :func:`walk_images` meets their files: each folder's entries by the bytes of their names."""
    return [os.fsencode(part) for part in key.split("/")]


def walk_images(root: str | os.PathLike, subfolder: str = "") -> Iterator[FileEntry | WalkFailure]:
    """Every image file under ``root``, recursively, in a stable sorted order.

    ``subfolder`` ('/'-separated, relative to ``root``) walks that part of the tree alone, with the keys
    and labels the whole walk would give its files (the label is its first folder).

    Streamed: only the listing of the folders on the current path is held. Files with an image
    extension are listed; files without an extension are listed when their content is an image.
    Hidden names and system folders (:func:`is_passed_over`) are left out, and how many is logged.
    Symlinked folders are followed once; a loop is reported as a :class:`WalkFailure`.
    """
    root = os.fspath(root)
    seen_dirs: set[tuple[int, int]] = set()
    passed_over: list[str] = []
    other_types: Counter[str] = Counter()  # extension -> files of it left out (camera RAW, videos, sidecars)

    def walk(folder: str, rel: str, label: str | None) -> Iterator[FileEntry | WalkFailure]:
        try:
            st = os.stat(folder)
        except OSError as e:
            yield WalkFailure(rel or ".", f"folder cannot be read: {e.strerror or e}")
            return
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:
            yield WalkFailure(rel, "symlink loop: this folder was already walked")
            return
        seen_dirs.add(ident)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as e:
            yield WalkFailure(rel or ".", f"folder cannot be read: {e.strerror or e}")
            return
        for entry in entries:
            key = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            ext = os.path.splitext(entry.name)[1].lower()
            if is_passed_over(entry.name):
                if is_dir or ext in IMAGE_EXTENSIONS:  # .DS_Store and the like are no news
                    passed_over.append(key + "/" * is_dir)
                continue
            if is_dir:
                yield from walk(entry.path, key, label if rel else entry.name)
                continue
            if ext not in IMAGE_EXTENSIONS and (ext or not content_is_image(entry.path)):
                other_types[ext or "(no extension)"] += 1
                continue
            try:
                st = entry.stat()
            except OSError as e:  # dangling symlink, or deleted since the listing
                yield WalkFailure(key, f"file cannot be read: {e.strerror or e}")
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            yield FileEntry(key, entry.path, label, st.st_size, st.st_mtime_ns)

    if subfolder:
        yield from walk(os.path.join(root, *subfolder.split("/")), subfolder, subfolder.split("/")[0])
    else:
        yield from walk(root, "", None)
    if passed_over:
        examples = ", ".join(passed_over[:3]) + (f" and {len(passed_over) - 3} more" if len(passed_over) > 3 else "")
        _logger.info("left out %d hidden or system file(s) and folder(s) under %s: %s", len(passed_over), root,
                     examples)
    if other_types:  # 7,000 of 10,000 photos as .NEF would otherwise be missing without a word
        common = sorted(other_types.items(), key=lambda kind: (-kind[1], kind[0]))[:5]
        kinds = ", ".join(f"{ext} {n:,}" for ext, n in common)
        more = f" and {len(other_types) - 5} more kinds" if len(other_types) > 5 else ""
        raw = sorted(set(other_types) & CAMERA_RAW_EXTENSIONS)
        hint = (f"; camera RAW ({', '.join(raw)}) is not read: embed the JPEGs the camera or an editor makes of it"
                if raw else "")
        _logger.info("left out %d file(s) that are not images featx reads under %s: %s%s%s",
                     sum(other_types.values()), root, kinds, more, hint)


def folder_to_walk(root: str | os.PathLike) -> Path:
    """``root`` as a Path; a FeatxError saying so when it is not a folder (a file, a typo)."""
    root = Path(root)
    if not root.is_dir():
        raise FeatxError(f"{root} {'is not a folder' if root.exists() else 'does not exist'}")
    return root


def class_names_of(root: str | os.PathLike) -> list[str]:
    """First-level subfolders of ``root``, sorted: the classes, as Keras and torchvision's ImageFolder see
    them, less hidden and system folders (the walk leaves them out)."""
    with os.scandir(root) as it:
        return sorted((e.name for e in it if e.is_dir() and not is_passed_over(e.name)), key=os.fsencode)


def content_is_image(path: str) -> bool:
    """Whether a file's first bytes are those of an image format featx reads (for files without an extension)."""
    try:
        with open(path, "rb") as f:
            return sniff_format(f.read(32)) is not None
    except OSError:
        return False


def read_image_file(path: str | os.PathLike) -> bytearray:
    """A file's bytes, in a writable buffer (torch.frombuffer shares it rather than copying).

    Raises:
        ImageError: with a one-line reason (gone since the walk, permission denied, I/O error, or a
            content that is no image: refused from its first bytes, so a large stray file is not read).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if head and sniff_format(head) is None:
                raise ImageError(_not_an_image(head))
            data = bytearray(max(len(head), os.fstat(f.fileno()).st_size))
            data[:len(head)] = head
            del data[len(head) + f.readinto(memoryview(data)[len(head):]):]
            rest = f.read()  # grown since the stat
    except FileNotFoundError:
        raise ImageError(_missing(path)) from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except IsADirectoryError:  # embed_images, a head's predict on files: what takes a folder instead
        raise ImageError("a folder, not an image file (featx.embed_folder, classify and predict take folders)") \
            from None
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror or e}") from None
    return data + rest if rest else data


def is_glob_pattern(text: str) -> bool:
    """Whether a name holds glob's wildcards (``*``, ``?``, ``[``)."""
    return any(c in text for c in "*?[")


def _missing(path: str | os.PathLike) -> str:
    """Why a path is no file: a URL, a folder that is not there, or a file gone (since the walk listed it)."""
    text = os.fsdecode(path)
    if "://" in text:
        return "no such file: a URL? featx reads local files (download it first)"
    if is_glob_pattern(text):  # expand_inputs found nothing it matches
        return "no such file, and no file matches it as a pattern"
    folder = os.path.dirname(text) or "."
    if not os.path.isdir(folder):
        return f"no such file: folder {folder} does not exist"
    return "no such file (deleted or moved before it could be read, or a typo in its name)"


def _not_an_image(head: bytes) -> str:
    return f"not an image: content starts with {head[:8]!r}"


def content_digest(data: bytes | bytearray) -> str:
    """SHA-256 of a file's bytes as hex, what ``sha256sum`` prints: the cache's record of the content
    it embedded, by which a renamed, moved or copied file is recognised without decoding it."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """``content_digest`` of a file, read 1 MiB at a time. Raises OSError when it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digests_of_look_alikes(paths: Sequence[str | os.PathLike]) -> list[str]:
    """``file_digest`` of each file whose size another of ``paths`` shares, "" for the rest (and for files
    that cannot be read): all :func:`featx.store.find_copies` needs to find identical files, reading
    only those that could be one."""
    sizes = [_size_or_none(p) for p in paths]
    counts = Counter(sizes)
    out = []
    for path, size in zip(paths, sizes):
        digest = ""
        if size is not None and counts[size] > 1:
            try:
                digest = file_digest(path)
            except OSError:
                pass
        out.append(digest)
    return out


# Bits in which two perceptual hashes may differ and still be one picture. Resized (to a quarter) and
# re-encoded (JPEG quality 40) copies of real photos come within 4 of 64 at the model's input; distinct
# photos differ in 20 or more, and a crop of 5 % already in 6 to 26 (tests/test_data.py, and
# benchmarks/near_copies.py on the digits).
NEAR_COPY_BITS = 4
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as PIL's convert("L")


def perceptual_hashes(images) -> np.ndarray:
    """The pHash of each image, what ``imagehash.phash`` computes: luma averaged down to 32x32, its 8x8
    lowest DCT-II frequencies, each bit set where a coefficient exceeds their median. A resized or
    re-encoded copy of a photo keeps its hash to within :data:`NEAR_COPY_BITS` bits; the cache stores
    it so that train-head and evaluate keep such copies out of each other's way.

    ``images``: uint8 (n, H, W, 3), the model's input (numpy, or a torch tensor where the GPU decoded
    it: the reduction runs there, and 64 coefficients an image come back). Returns uint64 (n,).
    Written here rather than taken from imagehash, which hashes one PIL image at a time on the CPU:
    the area average and the DCT are two matrix products on a whole batch (0.05 ms an image).
    """
    n, h, w, _ = images.shape
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    rows, cols = _pooled_dct(h), _pooled_dct(w).T
    if isinstance(images, np.ndarray):  # 16 images at a time: a batch of 128 in float32 would take 77 MB more
        coefficients = np.concatenate([rows @ (images[i:i + 16] @ _GRAY) @ cols for i in range(0, n, 16)])
    else:  # a torch tensor: reduced where it lies
        import torch

        as_tensor = functools.partial(torch.as_tensor, device=images.device)
        coefficients = (as_tensor(rows) @ (images.float() @ as_tensor(_GRAY)) @ as_tensor(cols)).cpu().numpy()
    coefficients = coefficients.reshape(n, 64)
    bits = coefficients > np.median(coefficients, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


@functools.lru_cache(maxsize=8)
def _pooled_dct(size: int) -> np.ndarray:
    """float32 (8, size): ``size`` samples averaged into 32 equal bins (each sample weighted by its
    overlap), then the 8 lowest DCT-II frequencies of those 32."""
    edges = np.linspace(0, size, 33)
    left, right = edges[:-1, None], edges[1:, None]
    pixel = np.arange(size)[None, :]
    overlap = np.clip(np.minimum(right, pixel + 1) - np.maximum(left, pixel), 0, None) / (right - left)
    frequency, x = np.arange(8)[:, None], np.arange(32)[None, :]
    return (np.cos(np.pi * frequency * (2 * x + 1) / 64) @ overlap).astype(np.float32)


def _size_or_none(path) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def decode_image(path: str | os.PathLike | bytes | bytearray, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_size: int | None = None) -> Image.Image:
    """Read an image file (or its bytes, already read) as an upright RGB picture.

    EXIF orientation is applied; alpha is composited onto white; CMYK, palette, grayscale and
    16-bit images are converted (16-bit scaled to 8 bits, not clipped). ``min_size``: a JPEG
    whose sides are both at least twice that is decoded at 1/2, 1/4 or 1/8 scale inside libjpeg
    (its DCT scaling), as long as both sides stay at least ``min_size``; a JPEG 2000 at a half, a
    quarter … inside OpenJPEG (its wavelet levels), as long as both stay at least twice ``min_size``.

    Raises:
        ImageError: with a one-line reason (empty, not an image, truncated, too large, unreadable).
    """
    data = path if isinstance(path, (bytes, bytearray)) else read_image_file(path)
    try:
        with io.BytesIO(data) as f:
            head = f.read(32)
            if not head:
                raise ImageError("empty file (0 bytes)")
            fmt = sniff_format(head)
            if fmt is None:
                raise ImageError(_not_an_image(head))
            if fmt == "heif":
                _open_heif_with_pillow()
            if fmt == "tiff":
                _take_libtiff_messages()
                _libtiff_said.errors = []
            f.seek(0)
            with _open_image(f) as img:
                if min_size and fmt == "jpeg":  # first: the limit is on what is decoded, here 1/2 to 1/8 of it
                    img.draft(None, (min_size, min_size))
                w, h = img.size
                skipped = _jpeg2000_reductions(data, w, h, min_size) if min_size and fmt == "jpeg2000" else 0
                if skipped:  # OpenJPEG leaves out the finest wavelet levels: a half, a quarter … of each side
                    img.reduce = skipped
                    w, h = -(-w >> skipped), -(-h >> skipped)
                if w * h > max_pixels:
                    raise ImageError(f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} (--max-pixels)")
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # a GIF frame larger than its canvas, checked as it loads
        raise ImageError(f"decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # PIL names the file object it was given ("<_io.BufferedReader name='...'>"): the row has the path
        text = [re.sub(r"\s*<_io\.\w+[^>]*>", "", line) for line in str(e).strip().splitlines()]
        libtiff = getattr(_libtiff_said, "errors", None)
        raise ImageError(f"cannot decode: {text[0] if text and text[0] else type(e).__name__}"
                         + (f" (libtiff: {libtiff[0]})" if libtiff else "")) from None
    finally:
        _libtiff_said.errors = None


def _jpeg2000_reductions(data: bytes | bytearray, width: int, height: int, min_size: int) -> int:
    """How many resolution levels a JPEG 2000 decode may leave out: as many halvings as leave both sides
    at least twice ``min_size``, up to the fewest wavelet levels its main header gives a component (COD,
    and COC for one component; 0 where none is found: OpenJPEG fails a decode asked to leave out more
    levels than a component has). Twice, since the wavelet's low-pass filters less well than the resize
    after it: a 4032x3024 photo embeds at cosine 0.9994 to its full decode at half its sides (2016x1512),
    0.996 at a quarter (where a JPEG's DCT scaling stays at 0.9998); at the bound, 2736x2048 at half,
    0.9989. A 10980-pixel Sentinel-2 tile, 121 megapixels and over the default --max-pixels, is decoded
    at 1/8 of its sides for a model that resizes to 256."""
    start = data.find(b"\xff\x4f\xff\x51", 0, 1 << 20)  # SOC, SIZ: after the JP2 boxes, if any
    levels, components, i = [], 0, start + 2
    while 0 <= start and i + 10 <= len(data) and data[i] == 0xFF and data[i + 1] != 0x90:  # up to the first tile
        marker, at = data[i + 1], i + 4  # past the marker and its segment's length
        if marker == 0x51:  # SIZ: the component count after Rsiz and eight 32-bit sizes and offsets
            components = int.from_bytes(data[at + 34:at + 36], "big")
        elif marker == 0x52:  # COD: Scod (1 byte), SGcod (4), then the levels
            levels.append(data[at + 5])
        elif marker == 0x53:  # COC: the component (1 byte, 2 past 256 components), Scoc (1), then the levels
            levels.append(data[at + (3 if components > 256 else 2)])
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    skipped = 0
    while skipped < min(levels, default=0) and \
            min(-(-width >> (skipped + 1)), -(-height >> (skipped + 1))) >= 2 * min_size:
        skipped += 1
    return skipped


def thumbnail(path: str | os.PathLike, size: int = 160) -> Image.Image | None:
    """The image at ``path``, upright RGB, at most ``size`` pixels a side, to draw it in a report; None
    when it does not read (deleted since, or changed). A JPEG is decoded at 1/2 to 1/8 scale inside
    libjpeg: a camera photo is not decoded whole for a thumbnail."""
    try:
        picture = decode_image(path, min_size=size)
    except ImageError:
        return None
    picture.thumbnail((size, size))
    return picture


# Pillow's own decompression-bomb refusal is lifted, under this lock, for an image over twice
# Image.MAX_IMAGE_PIXELS (179 million): featx's max_pixels is the limit that applies, checked
# before anything is decoded, and a user may raise it for panoramas.
_PILLOW_LIMIT_LIFTED = threading.Lock()


def quiet_decompression_bomb_warning() -> None:
    """Pillow's DecompressionBombWarning (from 89 million pixels) ignored in this process: featx's
    max_pixels is the limit that applies, and the warning reached those calling featx from Python. One
    filter left in place (added again only when a caller's ``catch_warnings`` took it away), not one set
    and restored around each image: that resets Python's record of the warnings already shown, and
    another library's once-only warning came back at every image."""
    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _open_image(f: io.BytesIO) -> Image.Image:
    quiet_decompression_bomb_warning()
    try:
        return Image.open(f)
    except Image.DecompressionBombError:
        f.seek(0)
        with _PILLOW_LIMIT_LIFTED:
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return Image.open(f)
            finally:
                Image.MAX_IMAGE_PIXELS = limit


def _float_grey_as_8_bits(a: np.ndarray) -> np.ndarray:
    """uint8 of a float greyscale file's values (a TIFF of Pillow's mode F: microscopy, depth, remote
    sensing): 0..1 as arrays are read (x 255), else 0..255 as they are, else its own lowest to highest
    stretched onto 0..255, as an image viewer shows it. NaN and infinities are 0. Clipped to 0..255, as
    before, a 0..1 image was black, and one of 16-bit values white."""
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if 0.0 <= lo and hi <= 1.0:
        a = a * 255.0
    elif not (0.0 <= lo and hi <= 255.0):
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)  # one value, out of range: black
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: scale 0..65535 onto 0..255 instead of letting PIL clip at 255
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "I" and (a.min() < 0 or a.max() > 65535):  # 32-bit, on no fixed range: as mode F's
            img = Image.fromarray(_float_grey_as_8_bits(a), mode="L")
        else:
            top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
            img = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(_float_grey_as_8_bits(np.asarray(img, dtype=np.float64)), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def as_rgb(img: Image.Image | np.ndarray) -> Image.Image:
    """A picture already in memory as :func:`decode_image` leaves a file: upright RGB, alpha composited
    onto white. A PIL image has its EXIF orientation applied (``Image.open`` does not). An array is
    (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), channels last: uint8; 16-bit (scaled to 8 bits); other
    integers in 0..255; float in 0..1 (scikit-image's and torchvision's convention).

    Raises:
        ImageError: an array of another shape, type or range, saying which.
    """
    if isinstance(img, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(img))
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    described = f"shape {a.shape}, {a.dtype}"
    if a.size == 0 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"an image array is (H, W), (H, W, 3) or (H, W, 4), channels last; got {described}")
    if a.dtype == np.uint16:
        a = np.rint(a / 257.0).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        lo, hi = float(np.min(a)), float(np.max(a))
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise ImageError(f"an image array holds numbers; got {described}")
        if np.issubdtype(a.dtype, np.floating):
            if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
                raise ImageError(f"a float image array is read as 0..1; this one ({described}) spans {lo:g}..{hi:g}: "
                                 f"divide by 255, or pass uint8")
            a = np.rint(a * 255.0).astype(np.uint8)
        elif 0 <= lo and hi <= 255:
            a = a.astype(np.uint8)
        else:
            raise ImageError(f"an integer image array is read as 0..255 (uint16 as 0..65535); this one ({described}) "
                             f"spans {lo:g}..{hi:g}")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a)))


def preprocess_image(img: Image.Image | np.ndarray, cfg: PreprocessConfig, *,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Resize the shorter side to ``cfg.resize_size``, centre-crop to ``cfg.input_size`` (or as timm's crop
    modes say: :meth:`PreprocessConfig.resized_size`).

    What torchvision's Resize + CenterCrop give on PIL images, computed for the crop only: Pillow
    resamples the crop's region of the photo (``resize(box=...)``, the same filter at the same
    scale, reading the pixels around the region as the full resize does) instead of the whole
    photo, of which the crop then keeps 44 % of a 4:3 landscape's pixels: 1.6x torchvision's rate
    at EfficientNet-Lite's bicubic, 1.4x at ResNet-50's bilinear, on 500x375 photos whose JPEG
    decode takes about as long (``python benchmarks/preprocess.py``). Pillow takes the region in
    float32, and Pillow 13 may run its two passes in the other order (as it does between a
    portrait photo and its crop), so on photos some pixels differ by 1 to 3 levels: one in 50 on
    average, up to one in 7 on some shapes (on random pixel noise, all edges, up to 20 levels).
    Embeddings: cosine 0.9998 at worst on 208 photos, 0.99999 on average; the size of the change
    Pillow 13's order brought to torchvision's own resize. An array, or a PIL image that is not
    RGB, is converted first (:func:`as_rgb`). Returns uint8 (H, W, 3).

    Raises:
        ImageError: when the resized picture would be over ``max_pixels``: a strip of a few pixels'
            height (60000x3, 180,000 pixels) becomes 256x5,120,000, which took 17 s and 5.5 GB.
    """
    if isinstance(img, np.ndarray):
        img = as_rgb(img)
    elif img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size
    new_w, new_h = cfg.resized_size(w, h)
    if new_w * new_h > max_pixels:
        raise ImageError(f"{w}x{h} resized to {new_w}x{new_h} ({cfg.resize_text()}) = "
                         f"{new_w * new_h:,} pixels is over the limit of {max_pixels:,} (--max-pixels)")
    ch, cw = cfg.input_size
    top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
    if (new_w, new_h) != (w, h) and new_w >= cw and new_h >= ch:  # the crop's region, resized alone
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        return np.asarray(img.resize((cw, ch), _INTERPOLATION[cfg.interpolation], box=box), dtype=np.uint8)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _INTERPOLATION[cfg.interpolation])
    if new_w < cw or new_h < ch:  # resize_size < crop, or timm's "border": pad as torchvision's center_crop
        canvas = Image.new("RGB", (max(new_w, cw), max(new_h, ch)), cfg.pad_fill)
        canvas.paste(img, ((max(new_w, cw) - new_w) // 2, (max(new_h, ch) - new_h) // 2))
        img, (new_w, new_h) = canvas, canvas.size
    top = int(round((new_h - ch) / 2.0))
    left = int(round((new_w - cw) / 2.0))
    return np.asarray(img.crop((left, top, left + cw, top + ch)), dtype=np.uint8)


def load_image(path: str | os.PathLike | bytes | bytearray, cfg: PreprocessConfig, *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode and preprocess one file (or its bytes). Returns uint8 (H, W, 3); raises ImageError.

    A large JPEG (a 12-megapixel photo) is decoded at a reduced scale that keeps at least twice the
    resize target on its shorter side, so the antialiased resize still does the final filtering; the
    decode costs a fraction of a full one (benchmarks/large_photos.py measures time and agreement).
    """
    return preprocess_image(decode_image(path, max_pixels=max_pixels, min_size=decode_floor(cfg)), cfg,
                            max_pixels=max_pixels)


def decode_floor(cfg: PreprocessConfig) -> int:
    """The smallest side a reduced-scale JPEG decode may leave: twice the larger of resize target and crop."""
    return 2 * max(cfg.resize_size, *cfg.input_size)


@dataclass
class DecodedBatch:
    """A batch ready for the model: ``images`` uint8 (n_ok, H, W, 3) for ``ok`` positions of the input."""

    images: np.ndarray
    ok: list[int]
    failed: list[tuple[int, str]]  # (position in the input, reason)
    decoded_by: str = "cpu"  # "gpu": nvJPEG (featx.gpudecode); only counted, in RunStats.decoded_by
    digests: list[str] = field(default_factory=list)  # content_digest of each ``ok`` file's bytes, in order
    phashes: np.ndarray | None = None  # uint64 (n_ok,): perceptual_hashes of ``images``, where they are stored


def failure_reason(error: Exception) -> str:
    """What a file's failure row says: an ImageError's own one line, or any other exception named as
    unexpected (a decoder bug must not end a run of millions of files, only cost that file)."""
    return str(error) if isinstance(error, ImageError) else f"unexpected {type(error).__name__}: {error}"


def load_batch(paths: Sequence[str], cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS, *,
               with_digests: bool = True) -> DecodedBatch:
    """Decode and preprocess ``paths``; a bad file becomes a (position, reason) row, never an exception.

    ``with_digests=False`` leaves ``digests`` empty and ``phashes`` None, for callers that store nothing
    (classify, predict).
    """
    h, w = cfg.input_size
    images = np.empty((len(paths), h, w, 3), dtype=np.uint8)
    ok: list[int] = []
    failed: list[tuple[int, str]] = []
    digests: list[str] = []
    for i, path in enumerate(paths):
        try:
            data = read_image_file(path)  # read once: decoded and hashed from memory
            images[len(ok)] = load_image(data, cfg, max_pixels=max_pixels)
            if with_digests:
                digests.append(content_digest(data))
            ok.append(i)
        except Exception as e:
            failed.append((i, failure_reason(e)))
    images = images[: len(ok)]
    return DecodedBatch(images, ok, failed, digests=digests, phashes=perceptual_hashes(images) if with_digests else None)
