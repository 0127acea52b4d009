"""Errors featx raises on purpose. Each says what was expected and what came."""


class FeatxError(Exception):
    """Base class: a problem the user can fix, reported in one line without a traceback."""


class UnknownBackboneError(FeatxError, KeyError):
    """A backbone name that no registry knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsError(FeatxError, ValueError):
    """Weights could not be had, or do not fit the architecture, or are unsafe to load."""


class ModelFileError(FeatxError, ValueError):
    """An ONNX file that is missing, corrupt, or not made by featx."""


class ExportCheckError(FeatxError, RuntimeError):
    """An exported file whose outputs disagree with torch beyond tolerance."""


class ImageError(FeatxError, ValueError):
    """An image that cannot be decoded; in bulk runs this becomes a recorded failure instead."""


class StoreError(FeatxError, RuntimeError):
    """The HDF5 cache cannot be used as asked (locked, other model, unwritable)."""


class HeadMismatchError(FeatxError, ValueError):
    """A head trained on one backbone used with another."""


def first_line(error: BaseException) -> str:
    """An exception's message in one line (its first, 300 characters at most), or its type's name: a
    library's multi-line error said inside one of featx's."""
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def check_output_file(path, *, example: str) -> None:
    """Refuse an output path that is a folder before any work starts: the file is written at the end
    (a head after its fit, a model after its export), and the work would be lost with a traceback.
    An embedding cache is refused too: a report or a list written over it (``featx info cache.h5
    --copies -o cache.h5``) would lose every embedding it holds. A picture (``example`` a .png) named
    with a suffix matplotlib does not write (``--report r.txt``) is refused, as it would be at the end."""
    import os

    if path is None:
        return
    if os.path.isdir(path):
        raise FeatxError(f"{path} is a folder; give a file name, e.g. {os.path.join(path, example)}")
    from .runtime import file_kind

    if file_kind(path) == "cache":
        raise FeatxError(f"{path} is an embedding cache; writing {os.path.splitext(example)[1]} over it would lose its "
                         f"embeddings: give another file name, e.g. {example}")
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if example.endswith(".png") and suffix:  # a picture, drawn at the end: matplotlib names its format by the suffix
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if suffix not in formats:
            raise FeatxError(f"{path}: a picture is written as .png, .jpg, .pdf, .svg (or another kind matplotlib "
                             f"writes), not .{suffix}: give e.g. {example}")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), path, create=True)


def check_writable_folder(folder, path=None, *, create: bool = False) -> None:
    """Refuse a new file ``path`` in ``folder`` (or, without ``path``, the output folder itself) before any
    work when the folder cannot take one: a file is written and deleted there, since permission bits do
    not tell (root, a read-only mount, /proc). With ``create`` the missing folders are made first, as
    the writers make them."""
    import os
    import tempfile

    what = f"create {path}" if path is not None else f"write into {folder}"
    ancestor = os.path.abspath(folder)
    while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise FeatxError(f"cannot {what}: {ancestor} is a file, not a folder")
    if ancestor != os.path.abspath(folder) and not create:
        raise FeatxError(f"cannot {what}: folder {folder} does not exist")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".featx-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FeatxError(f"cannot {what}: {e.strerror or e}" + (f" (in {folder})" if path is not None else "")) \
            from None
