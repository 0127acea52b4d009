"""What any featx file holds, told by its content: a cache, an exported model, a head or a
fine-tuning checkpoint (`featx info`)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import FeatxError
from .heads import load_head


def describe_file(path: str | os.PathLike, *, list_failures: bool = False, list_copies: bool = False) -> str:
    """What a featx file holds, told by its content: an embedding cache (models, classes with counts,
    failures; every failed file with ``list_failures``; every picture stored more than once, with its
    files, with ``list_copies``), an exported model, a head or a fine-tuning
    checkpoint. A module of its own after the last stage: it reads every stage's files."""
    from .runtime import HDF5_SIGNATURE, read_model_info
    from .store import summarize_cache

    path = Path(path)
    if path.is_dir():
        raise FeatxError(f"{path} is a folder: featx info reads a cache (.h5), a model (.onnx) or a head "
                         f"(.safetensors); `featx embed {path} -o CACHE.h5` makes a cache of it")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(HDF5_SIGNATURE))
    except OSError as e:
        raise FeatxError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic == HDF5_SIGNATURE:
        summaries = summarize_cache(path, list_copies=list_copies)
        if not summaries:
            return f"{path}: an HDF5 file without featx embeddings (featx embed FOLDER -o {path} adds them)"
        return "\n".join([f"{path}: embedding cache, {len(summaries)} model(s)"]
                         + [s.text(list_failures=list_failures) for s in summaries])
    if path.suffix == ".onnx":
        return f"{path}: {read_model_info(path).summary()}"
    if path.suffix == ".safetensors":
        from .finetune import describe_checkpoint, is_finetune_checkpoint

        if is_finetune_checkpoint(path):
            return f"{path}: {describe_checkpoint(path)}"
        return f"{path}: {load_head(path).summary()}"
    raise FeatxError(f"{path}: not a featx file (an embedding cache .h5, a model .onnx, or a head or fine-tuning "
                     f"checkpoint .safetensors)")
