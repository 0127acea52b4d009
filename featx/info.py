"""What any featx file holds, told by its content: a cache, an exported model, a head or a
fine-tuning checkpoint (`featx info`)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import FeatxError, check_output_file
from .heads import load_head


# said of a model, head or checkpoint written before featx recorded the digest of its weights (2026-12-07)
_NO_DIGEST = ("\n  it keeps no digest of its weights (an earlier featx's, or another tool's): damage inside them "
              "cannot be told; {again} it has one")


def describe_file(path: str | os.PathLike, *, list_failures: bool = False, list_copies: bool = False,
                  output: str | os.PathLike | None = None, sheet: str | os.PathLike | None = None) -> str:
    """What a featx file holds, told by its content: an embedding cache (models, classes with counts,
    failures; every failed file with ``list_failures``; every picture stored more than once, with its
    files, with ``list_copies``), an exported model, a head or a fine-tuning
    checkpoint. A module of its own after the last stage: it reads every stage's files.

    ``output``: a CSV that takes the one list asked for, for a script or a spreadsheet, named in the text
    in its place. ``list_copies``: rows ``model,picture,key,copy,bits_apart``, every file of each picture
    stored more than once (``picture``: its first file in the folder's order; ``copy``: first, same bytes
    or near copy; ``bits_apart``: between the perceptual hashes of the file and the first, empty where
    one has none). ``list_failures``: rows ``model,key,reason``. ``sheet``: with ``list_copies``, a PNG
    of the pictures stored more than once (the first 20), a row of thumbnails each (:func:`plot_copies`)."""
    from .export import export_again_command, outdated_export
    from .runtime import file_kind, read_model_info
    from .store import summarize_cache

    path = Path(path)
    if output is not None and list_failures == list_copies:
        raise FeatxError("-o writes one list as CSV: give it --copies or --failures")
    check_output_file(output, example="copies.csv" if list_copies else "failures.csv")
    if sheet is not None and not list_copies:
        raise FeatxError("--sheet draws the --copies list: give it --copies")
    check_output_file(sheet, example="copies.png")
    if path.is_dir():
        raise FeatxError(f"{path} is a folder: featx info reads a cache (.h5), a model (.onnx) or a head "
                         f"(.safetensors); `featx embed {path} -o CACHE.h5` makes a cache of it")
    try:
        open(path, "rb").close()
    except OSError as e:
        raise FeatxError(f"{path}: cannot read ({e.strerror or e})") from None
    kind = file_kind(path)  # by content: --model takes a model file of any name
    if output is not None and kind != "cache":
        raise FeatxError(f"{path} is not an embedding cache: --copies and --failures list a cache's files")
    if kind == "cache":
        summaries = summarize_cache(path, list_copies=list_copies)
        if not summaries:
            return f"{path}: an HDF5 file without featx embeddings (featx embed FOLDER -o {path} adds them)"
        if output is not None:
            _write_list(summaries, output, copies=list_copies)
        drawn = sheet is not None and plot_copies(summaries, Path(sheet))
        return "\n".join([f"{path}: embedding cache, {len(summaries)} model(s)"]
                         + [s.text(list_failures=list_failures, listed_in=output and str(output))
                            for s in summaries] + ([f"-> {sheet}"] if drawn else []))
    if kind == "onnx":
        info = read_model_info(path)
        again = export_again_command(info)
        stale = (f"\n  its 'SAME' padding is worked out at every call (an earlier featx's export): exported again "
                 f"({again}) it gives the same embeddings at 1.5-1.9x the speed on a CPU" if info.pads_per_call else "")
        outdated = outdated_export(info)
        if outdated is not None:
            stale += (f"\n  {outdated} (an earlier featx's export): exported again ({again}) it is the model its "
                      "weights are, under another fingerprint")
        if not info.weights_checked:
            stale += _NO_DIGEST.format(again="exported again (featx export)")
        return f"{path}: {info.summary()}{stale}"
    if kind == "safetensors" or path.suffix == ".safetensors":
        from .finetune import describe_checkpoint, is_finetune_checkpoint

        if is_finetune_checkpoint(path):
            line, weights_checked = describe_checkpoint(path)
            return f"{path}: {line}" + ("" if weights_checked else _NO_DIGEST.format(again="fine-tuned again"))
        head = load_head(path)
        return f"{path}: {head.summary()}" + ("" if head.weights_checked else _NO_DIGEST.format(again="trained again"))
    raise FeatxError(f"{path}: not a featx file (an embedding cache .h5, a model .onnx, or a head or fine-tuning "
                     f"checkpoint .safetensors)")


PICTURES_DRAWN, FILES_DRAWN = 20, 8  # a sheet of 20 rows of 8 thumbnails at the most


def plot_copies(summaries, path: Path) -> bool:
    """The pictures stored more than once (of the first model group that has any; the first
    PICTURES_DRAWN) as rows of thumbnails, each file (FILES_DRAWN at most) under how it copies the first
    and its file name: what to keep and what to delete, seen. Nothing is drawn (False, said) when there
    is no copy, or the folder is not here."""
    import logging

    from .reports import draw_thumbnails, file_caption

    said = logging.getLogger(__name__).warning
    summary = next((s for s in summaries if s.copy_groups), None)
    if summary is None:
        said("no picture is stored more than once: %s is not drawn", path)
        return False
    folder = summary.attrs.get("folder")
    if not folder or not os.path.isdir(folder):
        said("%s: the folder its keys are under (%s) is not here: %s is not drawn", summary.path, folder, path)
        return False
    groups = summary.copy_groups[:PICTURES_DRAWN]
    columns = min(FILES_DRAWN, max(map(len, groups)))
    tiles: list[tuple[str, str] | None] = []
    for group in groups:
        for c in group[:columns]:
            how = f"near copy, {c.bits_apart} bits" if c.copy == "near copy" and c.bits_apart is not None else c.copy
            tiles.append((os.path.join(folder, c.key), f"{how}\n{file_caption(c.key)}"))
        tiles += [None] * (columns - min(columns, len(group)))
    title = f"{summary.model}: {len(groups)} of {len(summary.copy_groups)} pictures stored more than once"
    draw_thumbnails(tiles, columns, path, title=f"{title}, each file under how it copies the first")
    return True


def _write_list(summaries, output: str | os.PathLike, *, copies: bool) -> None:
    """Every model's copies or failures as CSV rows (see :func:`describe_file`); keys as they are, quoted."""
    import csv

    if copies:
        rows = [["model", "picture", "key", "copy", "bits_apart"]] + [
            [s.model, group[0].key, c.key, c.copy, "" if c.bits_apart is None else c.bits_apart]
            for s in summaries for group in s.copy_groups for c in group]
    else:
        rows = [["model", "key", "reason"]] + [[s.model, key, reason] for s in summaries
                                               for key, reason in sorted(s.failures.items())]
    try:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            csv.writer(f).writerows(rows)
    except OSError as e:
        raise FeatxError(f"{output}: cannot write ({e.strerror or e})") from None
