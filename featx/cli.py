"""The ``featx`` command: parses arguments and calls the public API, nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence

from . import __version__


def _add_model(p: argparse.ArgumentParser, *, weights: bool = True, made_with: str | None = None) -> None:
    """``made_with``: the file (a head, a cache) whose own model is the default, found without --model."""
    from .backbones import DEFAULT_BACKBONE

    p.add_argument("--model", "-m", default=None if made_with else DEFAULT_BACKBONE,
                   help=f"backbone name or exported .onnx file (default: the one {made_with} was made with, when "
                        f"its file is still there, else {DEFAULT_BACKBONE})" if made_with else
                        f"backbone name or exported .onnx file (default {DEFAULT_BACKBONE})")
    if weights:
        p.add_argument("--weights", default=None,
                       help="pretrained | none | bundled | PATH to a state dict (.pth/.pt/.safetensors)")


def _device(text: str) -> str:
    from .runtime import check_device_name

    try:
        check_device_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive number or auto, got {text!r}")


def _count(least: int):
    """An argparse type: a whole number of at least ``least`` (--top 0 printed empty rows, --top -2 all
    classes but two)."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"\d+", text.strip()) or int(text) < least:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {least}, got {text!r}")
        return int(text)

    parse.__name__ = "number"  # what argparse names in its error
    return parse


def _number(text: str) -> float:
    """``text`` as a float; NaN (which every range check refuses) when it is not a number."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def _positive(text: str) -> float:
    """An argparse type: a number above 0 (--C 0 and --lr -1 met scikit-learn's traceback, or trained
    the wrong way)."""
    value = _number(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def _share(text: str) -> float:
    """An argparse type: 0 or more and below 1 (a dropout rate)."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 up to (not including) 1, got {text!r}")
    return value


def _cosine(text: str) -> float:
    """An argparse type: a cosine similarity, -1 to 1."""
    value = _number(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity from -1 to 1, got {text!r}")
    return value


def _layer_sizes(text: str) -> tuple[int, ...]:
    """An argparse type: whole numbers above 0 separated by commas; '' for none (a linear head)."""
    sizes = [part.strip() for part in text.split(",") if part.strip()]
    if not all(size.isdigit() and int(size) > 0 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected layer sizes above 0 separated by commas, got {text!r}")
    return tuple(int(size) for size in sizes)


def _batch_sizes(text: str) -> list[int]:
    sizes = [part.strip() for part in text.split(",")]
    if not all(size.isdigit() and int(size) > 0 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return [int(size) for size in sizes]


def _add_cache(p: argparse.ArgumentParser, what: str) -> None:
    """The cache a command reads, first on its line or as --cache (as similar, predict and evaluate name it):
    ``featx train-head --cache c.h5`` was refused as an unrecognised argument. Either one, checked by
    :func:`_cache_given` once parsed."""
    p.add_argument("cache", nargs="?", default=None, help=what)
    p.add_argument("--cache", dest="cache_option", metavar="CACHE", default=None, help="the same, named")
    p.set_defaults(cache_parser=p)


def _cache_given(args: argparse.Namespace) -> None:
    """``args.cache`` from the positional or --cache of :func:`_add_cache`; argparse's error where neither or
    two different ones are given."""
    if not hasattr(args, "cache_option"):
        return
    if args.cache and args.cache_option and args.cache != args.cache_option:
        args.cache_parser.error(f"two caches given, {args.cache} and --cache {args.cache_option}: give one")
    args.cache = args.cache or args.cache_option
    if not args.cache:
        args.cache_parser.error("the following arguments are required: cache (or --cache CACHE)")


def _add_device(p: argparse.ArgumentParser, *, engine: bool = False) -> None:
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    if engine:
        p.add_argument("--engine", choices=["auto", "onnx", "tensorrt", "torch", "ray"], default="auto",
                       help="auto: the fastest engine a short calibration measured on this device (cached; "
                            "`featx calibrate` shows it); onnx: onnxruntime; tensorrt: onnxruntime's TensorRT "
                            "provider; torch: the same weights in torch; ray: a Ray cluster (pip install 'featx[ray]')")
        p.add_argument("--address", default=None, help="ray: cluster address (auto, ray://host:10001); none starts one")
        p.add_argument("--num-gpus-per-worker", type=float, default=0.0, help="ray: GPUs per embedding actor")


def _add_strict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help="exit 1 when any image failed, also one found in a folder")


def build_parser() -> argparse.ArgumentParser:
    from .data import DEFAULT_MAX_PIXELS

    parser = argparse.ArgumentParser(
        prog="featx",
        description="Pretrained backbones as ONNX: classify photos, embed image folders into an HDF5 cache, "
                    "train classifier heads, fine-tune, benchmark.")
    parser.add_argument("--version", action="version", version=f"featx {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job on the default model and bundled data (photos, digits)")
    p.add_argument("--dir", default="demo", help="where to write the data, cache, head and plots")
    _add_device(p)

    p = sub.add_parser("list-models", help="backbone names featx can load")
    p.add_argument("--source", choices=["all", "featx", "torchvision", "timm"], default="all")
    p.add_argument("pattern", nargs="?", default=None, help="substring to filter names")

    p = sub.add_parser("export", help="export a backbone to ONNX (embedding and logits outputs), checked against torch")
    p.add_argument("model", help="backbone name")
    p.add_argument("-o", "--output", default=None, help="output .onnx path (default: NAME.onnx in the models folder, $FEATX_MODELS)")
    p.add_argument("--weights", default=None, help="pretrained | none | bundled | PATH to a state dict")
    p.add_argument("--half", action="store_true", help="fp16 inside the graph (input uint8, outputs float32)")

    p = sub.add_parser("info", help="what a cache (.h5), model (.onnx), head or fine-tuning checkpoint holds")
    p.add_argument("path", help="a cache (.h5), an exported model (.onnx), or a head or checkpoint (.safetensors)")
    p.add_argument("--failures", action="store_true", help="cache: every failed file with its reason")
    p.add_argument("--copies", action="store_true",
                   help="cache: every picture stored more than once (the same bytes, or a near copy), with its files")
    p.add_argument("-o", "--output", default=None,
                   help="with --copies or --failures: write that list to this CSV instead of printing it")
    p.add_argument("--sheet", default=None,
                   help="with --copies: a PNG of the pictures stored more than once (the first 20), their files "
                        "as thumbnails")

    p = sub.add_parser("classify", help="top ImageNet classes of image files and folders")
    p.add_argument("images", nargs="+",
                   help="image files or folders (every image under them); a quoted pattern such as 'photos/*.jpg' "
                        "is expanded; - reads file names from standard input, one a line")
    _add_model(p)
    p.add_argument("--top", type=_count(1), default=5, help="classes per image (default 5)")
    p.add_argument("-o", "--output", default=None,
                   help="CSV file (key, top classes, probabilities, error), written as rows come; default: print")
    _add_sheet(p)
    _add_device(p)
    _add_strict(p)

    p = sub.add_parser("embed", help="embed an image folder into an HDF5 cache (resumable, incremental)",
                       description="Embed every image under ROOT into the cache. A re-run embeds only what is new: "
                       "files already cached (same path, size and mtime, or the same bytes: moved, renamed or "
                       "copied) take their stored rows, and files with the same bytes in one run are embedded "
                       "once. Hidden files and folders and system folders (@eaDir, __MACOSX, $RECYCLE.BIN, ...) "
                       "are left out. "
                       "Killed at any point, the same command resumes.")
    p.add_argument("root", help="image folder; first-level subfolders are the classes")
    p.add_argument("--out", "-o", "--cache", dest="out", required=True,
                   help="HDF5 cache file (--cache, as similar, predict and evaluate call it)")
    _add_model(p)
    p.add_argument("--batch-size", type=_batch_size, default=None,
                   help="images per engine call (default 8 on the CPU, where larger batches run slower, 32 on a "
                        "GPU), or auto: from free memory; halved on out-of-memory")
    p.add_argument("--workers", type=_count(0), default=None,
                   help="decode threads (default: cores - 1, and the engine's thread whenever it would wait; "
                        "0 = only it); "
                        "with GPU decode, processes that take a share of the batches beside nvJPEG "
                        "(default half the cores, 0 = nvJPEG only)")
    _add_device(p, engine=True)
    p.add_argument("--devices", default=None,
                   help="comma-separated devices, one engine each, one store (default: every GPU, else the CPU)")
    p.add_argument("--half", action="store_true", help="fp16 model and float16 storage")
    p.add_argument("--prune", action="store_true", help="remove files no longer in the folder from the cache")
    p.add_argument("--repair", action="store_true",
                   help="embed again the rows a damaged cache cannot vouch for (a chunk failing its checksum, "
                        "embeddings that are not numbers); reads every stored number once")
    p.add_argument("--retry-failed", action="store_true",
                   help="try again the files that failed before, though unchanged (skipped otherwise): after raising "
                        "--max-pixels, installing a decoder or fixing permissions")
    p.add_argument("--new-folder", action="store_true",
                   help="the cache was made from another folder, still there, and ROOT now stands for it (a copy: "
                        "rows are reused by content); without it such a cache is refused")
    _add_strict(p)
    p.add_argument("--max-pixels", type=_count(1), default=None,
                   help=f"refuse larger images, as decoded or as resized (decompression bombs; default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--decode", choices=["auto", "cpu", "gpu"], default="auto",
                   help="gpu: nvJPEG decode and resize on the GPU (auto: whenever the torch engine runs on CUDA)")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   help="torch engine: torch.compile it (optional mode, e.g. reduce-overhead)")

    p = sub.add_parser("calibrate", help="measure which engine --engine auto takes for a model on this device")
    _add_model(p)
    _add_device(p)
    p.add_argument("--batch-size", type=_count(1), default=None, help="default: embed's (8 on the CPU, 32 on a GPU)")
    p.add_argument("--force", action="store_true", help="measure again even when a cached result exists")

    p = sub.add_parser("map", help="draw cached embeddings on a plane, coloured by class (PNG)")
    _add_cache(p, "embedding cache (.h5)")
    p.add_argument("-o", "--output", default=None, help="PNG (default: next to the cache, CACHE.map.png)")
    p.add_argument("--model", "-m", default=None, help="model group in the cache (needed when it holds several)")
    p.add_argument("--method", choices=["tsne", "pca"], default="tsne",
                   help="tsne: neighbourhoods kept (a few seconds per thousand points); pca: instant")
    p.add_argument("--max-points", type=_count(3), default=3000, help="a larger cache is sampled, each class in its share")

    from .search import LOOK_ALIKE_COSINE

    p = sub.add_parser("similar", help="the cached images most similar to query images (cosine of embeddings); "
                                       "--groups: what the cache holds more than once")
    p.add_argument("images", nargs="*", help="query image files or folders, or a quoted pattern ('photos/*.jpg'); "
                                             "- reads file names from standard input, one a line")
    p.add_argument("--cache", required=True, help="embedding cache to search (.h5)")
    p.add_argument("--groups", action="store_true",
                   help="no queries: the cache's pictures that look alike, in groups, each printed once (every "
                        f"picture at --min-similarity, default {LOOK_ALIKE_COSINE:g}, to another of its group), "
                        "with each picture's files (same bytes, or resized); a picture stored in several files is "
                        "a group too")
    p.add_argument("-k", type=_count(1), default=None,
                   help="matches per query, one per picture, the query's own picture under other files first "
                        "(default 5)")
    p.add_argument("-o", "--output", help="CSV of the matches, a row per query and match (--groups: a row per "
                                          "picture), instead of printing them")
    p.add_argument("--sheet", default=None,
                   help="PNG of the queries and their matches as thumbnails, a row per query (--groups: per group; "
                        "the first 20)")
    p.add_argument("--min-similarity", type=_cosine, default=None,
                   help="only matches at least this similar (cosine, e.g. 0.9), and the query's own picture "
                        "whatever its cosine")
    _add_model(p, made_with="the cache")
    _add_device(p)
    _add_strict(p)

    p = sub.add_parser("train-head", help="fit a classifier head on cached embeddings")
    _add_cache(p, "embedding cache (.h5) of a folder with class subfolders")
    p.add_argument("--model", "-m", default=None, help="model group in the cache (needed when it holds several)")
    p.add_argument("--head", choices=["logreg", "mlp"], default="logreg",
                   help="logreg: scikit-learn logistic regression (default); mlp: a small MLP in torch")
    p.add_argument("-o", "--output", required=True, help="head file (.safetensors)")
    p.add_argument("--test-size", type=_fraction, default=0.2, help="share of each class held out (default 0.2)")
    p.add_argument("--cv", type=_count(2), default=None, help="K-fold cross-validation instead of one split")
    p.add_argument("--C", type=_positive, default=None,
                   help="logreg inverse regularisation (default: the lowest held-out log loss in 5-fold cross-validation)")
    p.add_argument("--hidden", type=_layer_sizes, default=None,
                   help="mlp hidden sizes, comma-separated (default 1024)")
    p.add_argument("--dropout", type=_share, default=None, help="mlp dropout (default 0.5)")
    p.add_argument("--epochs", type=_count(1), default=None,
                   help="mlp (and multi-label) epochs at most (default 200)")
    p.add_argument("--seed", type=int, default=0, help="split and initialisation seed (default 0)")
    p.add_argument("--report", default=None, help="confusion-matrix PNG (default: next to the head file)")
    p.add_argument("--labels", default=None,
                   help="multi-label: CSV of key,label1;label2 (sigmoid outputs, per-label thresholds)")
    p.add_argument("--balanced", action="store_true",
                   help="weigh every class equally, however many images it has (classes of very different sizes)")
    p.add_argument("--mistakes", default=None,
                   help="CSV of every held-out image predicted wrong (with --cv: of every image, out of fold), "
                        "most confident first: files filed under the wrong class are among them")

    p = sub.add_parser("evaluate", help="score a head, or a model with its own classes, on labelled images kept "
                                        "apart from its training")
    p.add_argument("data", help="a folder whose class subfolders are named as the classes (with --head: embedded "
                                "first), or with --head an embedding cache (.h5) of one")
    p.add_argument("--head", default=None, help="head file from train-head (.safetensors); without it, --model "
                                                "is scored: a fine-tuned export, a classifier from export-classifier")
    p.add_argument("--model", "-m", default=None,
                   help="without --head, the model scored (backbone name for ImageNet classes, or .onnx file); with "
                        "--head, the one that embeds the folder (default: the head's own)")
    p.add_argument("--weights", default=None, help="pretrained | none | bundled | PATH to a state dict")
    p.add_argument("--cache", default=None, help="with --head, a folder's embeddings go here (made, or brought up to "
                                                 "date, first; default: a temporary cache)")
    p.add_argument("--labels", default=None, help="multi-label heads: CSV of key,label1;label2")
    p.add_argument("--report", default=None,
                   help="confusion-matrix PNG (default: beside the head or model file, NAME.DATA.confusion.png)")
    p.add_argument("--mistakes", default=None,
                   help="CSV of every misclassified image (key, class, predicted, probability), most confident first")
    _add_device(p)

    p = sub.add_parser("export-classifier", help="backbone + head merged into one ONNX file (images -> probabilities)")
    p.add_argument("--head", required=True, help="head file from train-head (.safetensors)")
    _add_model(p, made_with="the head's embeddings")
    p.add_argument("-o", "--output", required=True, help="classifier file (.onnx)")

    p = sub.add_parser("predict", help="classify images or a folder with a trained head")
    p.add_argument("inputs", nargs="+", help="image files or folders (one folder alone is embedded through --cache), "
                                             "or a quoted pattern ('photos/*.jpg'); - reads file names from "
                                             "standard input, one a line")
    p.add_argument("--head", required=True, help="head file from train-head (.safetensors)")
    _add_model(p, made_with="the head's embeddings")
    p.add_argument("--top", type=_count(1), default=3, help="classes per image (default 3)")
    p.add_argument("-o", "--output", default=None, help="CSV file (key, top classes, probabilities)")
    _add_sheet(p)
    p.add_argument("--cache", default=None,
                   help="embedding cache: one folder is embedded through it; files it holds, unchanged, take their "
                        "stored embeddings")
    _add_device(p)
    _add_strict(p)

    p = sub.add_parser("finetune", help="fine-tune the top blocks on class folders (torch), save a checkpoint")
    p.add_argument("root", help="image folder; first-level subfolders are the classes")
    _add_model(p)
    p.add_argument("--head", default=None, help="trained head to start the classifier from")
    p.add_argument("--unfreeze", default="2", help="top blocks to train: N, all, or auto (featx advise); default 2")
    p.add_argument("--epochs", type=_count(1), default=10, help="at most (default 10; see --patience)")
    p.add_argument("--lr", type=_positive, default=1e-3, help="head learning rate (default 0.001); the backbone gets a tenth")
    p.add_argument("--batch-size", type=_count(1), default=32, help="default 32")
    p.add_argument("--input-size", type=_count(16), default=None, help="train at this size (small images train faster)")
    p.add_argument("--no-hflip", action="store_true", help="no horizontal flips (digits, text)")
    p.add_argument("--vflip", action="store_true", help="vertical flips too (aerial, microscope images)")
    p.add_argument("--patience", type=_count(1), default=3,
                   help="stop after this many epochs without a better validation loss (default 3)")
    p.add_argument("--val-fraction", type=_fraction, default=0.2, help="share of each class held out for validation")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint at -o")
    p.add_argument("-o", "--output", required=True, help="checkpoint (.safetensors)")
    _add_device(p)

    p = sub.add_parser("advise", help="which of the four transfer-learning cases a labelled folder is")
    p.add_argument("root", help="image folder; first-level subfolders are the classes")
    _add_model(p)
    _add_device(p)

    p = sub.add_parser("bench", help="throughput against plain PyTorch in the same run")
    _add_model(p)
    _add_device(p)
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8, 32],
                   help="comma-separated batch sizes of the model-only timings (default 1,8,32)")
    p.add_argument("--half", action="store_true",
                   help="time featx's onnxruntime engine on the fp16 export (fp16 inside the graph)")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   help="also time torch.compile; optional comma-separated modes (default, reduce-overhead, ...)")
    p.add_argument("--images", default=None,
                   help="image folder for the end-to-end comparison, any layout (default: --n-images generated JPEGs)")
    p.add_argument("--n-images", type=_count(1), default=None,
                   help="500x375 JPEGs to generate for end-to-end when --images is not given (default 512)")
    p.add_argument("--repeats", type=_count(1), default=5, help="timed repetitions after warm-up, median taken (default 5)")
    p.add_argument("--int8", action="store_true", help="also time onnxruntime int8 (dynamic quantization), CPU")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON and PNG")
    # -q after the command too (`featx embed photos -o c.h5 -q`); SUPPRESS keeps a -q given before it
    for command in sub.choices.values():
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="only warnings and errors")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM: a batch scheduler's time limit, ``kill``, a container stopped. It ends a run as Ctrl-C
    does (the store closed, the message saying how to resume) instead of killing it mid-write."""


_signals = 0  # Ctrl-C/SIGTERM received since the last one raised (or since a lost one was sent again)


def _stop(signum, frame) -> None:
    """The first signal raises; a second does not, since raised inside the clean-up (engine threads being
    joined, worker pools shut down) it left onnxruntime threads running at exit, and the process aborted
    ("terminate called without an active exception", 3 of 6 double Ctrl-Cs); a third quits at once, as
    a SIGKILL would (committed work is kept either way)."""
    global _signals
    _signals += 1
    if _signals == 1:
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    if _signals == 2:
        print("featx: stopping; once more quits at once", file=sys.stderr)
    else:
        os._exit(128 + signum)


def _redeliver_lost_interrupt(unraisable) -> None:
    """Ctrl-C or SIGTERM raised where Python cannot pass it on (a weakref callback or ``__del__``, which
    progress bars and torch run often) is printed as ignored and lost, and the run goes on: seen on
    finetune, which trained to its last epoch. The signal is sent again, from another thread a moment
    later: raised here, its handler would run inside this hook and be lost the same way."""
    global _signals
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        again = signal.SIGTERM if issubclass(unraisable.exc_type, Terminated) else signal.SIGINT
        while True:
            _signals = 0  # it never reached the run: the next one raises
            try:
                threading.Timer(0.01, os.kill, (os.getpid(), again)).start()
                return
            except KeyboardInterrupt:  # the next Ctrl-C came while the timer started: raised in this hook, it was
                continue  # lost as well, and the one sent again only said "stopping" (a run went on to its end)
    else:
        sys.__unraisablehook__(unraisable)


def program() -> int:
    """The ``featx`` program (console script, ``python -m featx``): :func:`main` with the process's signal
    handling, which main alone leaves as it is (a test or a notebook calling it keeps its own)."""
    # a signal the shell set to be ignored (a background job's SIGINT, nohup) stays ignored
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stop)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop)
    sys.unraisablehook = _redeliver_lost_interrupt
    code = main()
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        # the run is over and said so: a later Ctrl-C (the test's second, or one sent again by
        # _redeliver_lost_interrupt) raised now would end the exit in a KeyboardInterrupt (status -2)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _exit_past_stuck_threads(code)
    return code


def _exit_past_stuck_threads(code: int, grace: float = 3.0) -> None:
    """After Ctrl-C or SIGTERM (the store already closed, the message printed): a worker thread stuck in
    a read that never returns (a FIFO named as a photo with no writer, a hung network mount) would hold
    the process for ever, since Python's exit joins every such thread; seen as "featx: interrupted"
    and no exit. Threads that end within ``grace`` seconds are let end; past it the process exits now."""
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cache_given(args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .data import quiet_decompression_bomb_warning
    from .errors import FeatxError

    # --max-pixels is the limit featx applies; Pillow's own warning from 89 million pixels on is noise, also
    # where something other than featx's decoder opens an image (bench's plain PyTorch loader)
    quiet_decompression_bomb_warning()
    # Pillow's warnings on a damaged file ("Corrupt EXIF data" for a TIFF cut short) name no file, and
    # came with the path of Pillow's source line: featx records the file's failure and its reason instead,
    # or embeds what decoded
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    # huggingface_hub prints its warnings (a download's retries) through a handler of its own: not twice;
    # as it was after the command (a test's log capture, a caller's own logging)
    hub_log = logging.getLogger("huggingface_hub")
    hub_propagates, hub_log.propagate = hub_log.propagate, False
    try:
        # a line logged while a progress bar is drawn gets a line of its own, above the bar
        with logging_redirect_tqdm():
            return _run(args)
    except FeatxError as e:
        print(f"featx: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left early (featx classify … | head): its rows were printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's last flush would fail again
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:
        if args.command == "embed" or (args.command in ("predict", "evaluate") and args.cache):
            how = "; committed batches are kept, run the same command again to resume"
        elif args.command in ("classify", "predict") and args.output:
            how = f"; the rows done so far are in {args.output}"
        elif args.command == "finetune":
            how = f"; the best epoch so far is in {args.output}, the same command with --resume continues from it"
        else:
            how = ""
        terminated = isinstance(e, Terminated)
        print(f"featx: {'terminated' if terminated else 'interrupted'}{how}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        hub_log.propagate = hub_propagates


def _run(args: argparse.Namespace) -> int:
    import featx

    if args.command in ("classify", "similar", "predict"):
        name = "inputs" if args.command == "predict" else "images"
        setattr(args, name, _with_stdin_names(getattr(args, name)))

    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.dir, device=args.device, progress=not args.quiet)
        return 0

    if args.command == "list-models":
        names = [name for name in featx.list_backbones(args.source) if args.pattern is None or args.pattern in name]
        for name in names:
            print(name)
        if not names:  # as grep: nothing found is exit 1, said on stderr
            print(f"featx: no {'' if args.source == 'all' else args.source + ' '}model name contains "
                  f"'{args.pattern}'", file=sys.stderr)
        return 0 if names else 1

    if args.command == "export":
        from .export import model_path

        out = args.output or model_path(args.model, weights=args.weights, half=args.half)
        info = featx.export_onnx(featx.load_backbone(args.model, weights=args.weights), out, half=args.half)
        print(f"{out}: {info.summary()}")
        return 0

    if args.command == "info":
        print(featx.describe_file(args.path, list_failures=args.failures, list_copies=args.copies,
                                  output=args.output, sheet=args.sheet))
        return 0

    if args.command == "classify":
        failed: list[str] = []
        rows = _noting_failures(featx.iter_classify(args.images, model=args.model, weights=args.weights, top=args.top,
                                                    device=args.device, progress=not args.quiet), failed)
        _print_or_write(rows, args.output, args.top, sheet=args.sheet)
        return _failures_exit(args.images, failed, args.strict)

    if args.command == "embed":
        from .data import DEFAULT_MAX_PIXELS

        stats = featx.embed_folder(
            args.root, args.out, model=args.model, weights=args.weights, batch_size=args.batch_size,
            workers=args.workers, device=args.device, engine=args.engine, half=args.half, prune=args.prune,
            new_folder=args.new_folder, retry_failed=args.retry_failed, repair=args.repair,
            max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, progress=not args.quiet, decode=args.decode,
            compile=(True if args.compile == "default" else args.compile) if args.compile else False,
            address=args.address, num_gpus_per_worker=args.num_gpus_per_worker,
            devices=args.devices.split(",") if args.devices else None,
        )
        print(stats.summary())
        if stats.n_failed or stats.n_failed_before:
            print(f"the failed files and why: featx info {args.out} --failures")
        return 1 if args.strict and stats.n_failed else 0

    if args.command == "calibrate":
        from .export import ensure_model_file

        print(featx.calibrate(ensure_model_file(args.model, weights=args.weights), device=args.device,
                              batch_size=args.batch_size, force=args.force).text())
        return 0

    if args.command == "train-head":
        report = featx.train_head(
            args.cache, args.output, model=args.model, head=args.head, test_size=args.test_size, cv=args.cv,
            C=args.C, hidden=args.hidden, dropout=args.dropout,
            epochs=args.epochs, seed=args.seed, report_png=args.report, labels_csv=args.labels,
            class_weight="balanced" if args.balanced else None, mistakes_csv=args.mistakes,
        )
        print(report.text())
        return 0

    if args.command == "evaluate":
        common = dict(weights=args.weights, report_png=args.report, mistakes_csv=args.mistakes, device=args.device,
                      progress=not args.quiet)
        if args.head is not None:
            report = featx.evaluate_head(args.data, args.head, cache=args.cache, model=args.model,
                                         labels_csv=args.labels, **common)
        elif args.model is not None:
            if args.cache or args.labels:  # a model scored by itself decodes the folder; nothing would use them
                from .errors import FeatxError

                raise FeatxError(f"{'--cache' if args.cache else '--labels'} goes with --head; a model scored by "
                                 "itself (--model alone) classifies the folder's images as they are decoded")
            report = featx.evaluate_classifier(args.data, args.model, **common)
        else:
            from .errors import FeatxError

            raise FeatxError("evaluate scores a head (--head HEAD.safetensors) or a model that classifies by itself "
                             "(--model FILE.onnx): name one")
        print(report.text())
        return 0

    if args.command == "map":
        print(featx.plot_embeddings(args.cache, args.output, model=args.model, method=args.method,
                                    max_points=args.max_points).text())
        return 0

    if args.command == "similar" and args.groups:
        from .errors import FeatxError
        from .search import LOOK_ALIKE_COSINE, look_alikes_summary

        if args.images or args.k is not None or args.weights is not None:
            raise FeatxError("--groups compares the whole cache with itself: give no query images, -k or --weights")
        threshold = LOOK_ALIKE_COSINE if args.min_similarity is None else args.min_similarity
        groups = featx.look_alike_groups(args.cache, min_similarity=threshold, model=args.model, output=args.output,
                                         sheet=args.sheet, progress=not args.quiet, device=args.device)
        if not args.output:
            for group in groups:
                print(group.text())
        print(look_alikes_summary(groups, threshold) + (f" -> {args.output}" if args.output else ""))
        if args.sheet and groups:
            print(f"-> {args.sheet}")
        return 0

    if args.command == "similar":
        from .search import searched_its_own_folder

        if not args.images:
            from .errors import FeatxError

            raise FeatxError("give query images (files, folders, a pattern, or - to read names from standard input), "
                             "or --groups to compare the cache with itself")
        results = featx.find_similar(args.images, args.cache, k=args.k or 5, model=args.model, weights=args.weights,
                                     device=args.device, output=args.output, min_similarity=args.min_similarity,
                                     sheet=args.sheet)
        if args.output:
            print(f"matches of {len(results)} quer{'y' if len(results) == 1 else 'ies'} -> {args.output}")
        else:
            for result in results:
                if result.matches or result.error or args.min_similarity is None:  # not a list of the unmatched
                    print(result.text())
        if args.min_similarity is not None:
            # the query's own picture is listed whatever its cosine (a small copy scores low): counted apart
            close = sum(any(similarity >= args.min_similarity for _, similarity in r.matches) for r in results)
            own_only = sum(bool(r.matches) for r in results) - close
            print(f"{close} of {len(results)} queries have a match of cosine {args.min_similarity:g} or more"
                  + (f"; {own_only} more only their own picture under another file, at a lower cosine (resized "
                     "or re-encoded)" if own_only else ""))
            if close > 1 and searched_its_own_folder(results):
                print("a folder searched against its own cache lists each pair under both files: `featx similar "
                      f"--groups --cache {args.cache}` prints each group once")
        if args.sheet and any(r.matches for r in results):  # drawn (a sheet of no match is not)
            print(f"-> {args.sheet}")
        return _failures_exit(args.images, [r.query for r in results if r.error], args.strict)

    if args.command == "export-classifier":
        out = featx.export_classifier(args.model, args.head, args.output, weights=args.weights)
        info = featx.read_model_info(out)
        unlike = "" if info.typical_cosine is None else (
            f", 'class_mean_cosine' (n,): under {info.typical_cosine:.3f} (metadata 'featx_typical_cosine') an image "
            "is unlike the head's training images")
        print(f"{out}: input 'images', {info.input_description()} -> 'probabilities' (n, {len(info.class_names)}), "
              f"'embedding' (n, {info.embed_dim}){unlike}; class names in metadata 'featx_classes' (README: "
              "\"The exported classifier, without featx\")")
        return 0

    if args.command == "predict":
        common = dict(head=args.head, model=args.model, weights=args.weights, top=args.top, cache=args.cache,
                      device=args.device, progress=not args.quiet)
        failed: list[str] = []
        _print_or_write(_noting_failures(featx.iter_predictions(args.inputs, **common), failed), args.output, args.top,
                        sheet=args.sheet)
        return _failures_exit(args.inputs, failed, args.strict)

    if args.command == "finetune":
        from .finetune import export_command, loss_text

        unfreeze = args.unfreeze if args.unfreeze in ("all", "auto") else int(args.unfreeze)
        result = featx.fine_tune(
            args.root, args.output, model=args.model, weights=args.weights, head=args.head, unfreeze=unfreeze,
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, input_size=args.input_size,
            hflip=not args.no_hflip, vflip=args.vflip, patience=args.patience, val_fraction=args.val_fraction,
            resume=args.resume, device=args.device, progress=not args.quiet,
        )
        ran = result.history[-1].epoch if result.history else 0
        print(f"saved epoch {result.best_epoch} of {ran}, the lowest val_loss {loss_text(result.best_val_loss)} "
              f"(val_accuracy {result.best_val_accuracy:.4f}) -> {result.checkpoint}; "
              f"trained blocks: {', '.join(result.trainable) or 'classifier only'}\n"
              f"curves: {result.curves}\n"
              f"export it: {export_command(result.checkpoint).strip('`')}")
        return 0

    if args.command == "advise":
        print(featx.advise(args.root, model=args.model, weights=args.weights, device=args.device).text())
        return 0

    if args.command == "bench":
        result = featx.bench_models(
            model=args.model, weights=args.weights, device=args.device,
            batch_sizes=args.batch_sizes, half=args.half, compile=args.compile.split(",") if args.compile else False,
            images=args.images, n_images=args.n_images, repeats=args.repeats, int8=args.int8, out_dir=args.out,
        )
        print(result.table())
        return 0
    raise AssertionError(args.command)


def _with_stdin_names(items: Sequence[str]) -> list[str]:
    """``items`` with '-' standing for the file names standard input gives, one a line (`find photos -newer
    x | featx classify -`), or NUL-separated (`find -print0`)."""
    if "-" not in items:
        return list(items)
    from .data import sniff_format
    from .errors import FeatxError

    data = sys.stdin.buffer.read()
    if sniff_format(data[:32]) is not None:
        raise FeatxError("'-' reads file names from standard input, one a line; it was given an image's bytes: "
                         "name the image's file instead")
    names = [os.fsdecode(line.rstrip(b"\r")) for line in data.split(b"\0" if b"\0" in data else b"\n")
             if line.strip(b"\r\n")]
    if not names:
        raise FeatxError("'-' reads file names from standard input, one a line; it gave none")
    return [name for item in items for name in (names if item == "-" else [item])]


def _failures_exit(inputs: Sequence[str], failed: Sequence[str], strict: bool) -> int:
    """The exit status of a command that printed a row per image: 1 when a file named on the command line
    (or matched by a pattern given there) could not be read (missing, not an image), as `cat` would; a
    bad file found in a folder is a row like any other (embed records it too), unless --strict. One line
    on stderr says how many failed."""
    from .pipeline import named_inputs

    named = {name for name in named_inputs(inputs) if not os.path.isdir(name)}
    named_failed = sum(path in named for path in failed)
    if not named_failed and not (strict and failed):
        return 0
    of_them = f", {named_failed} of them named" if named_failed else ""
    print(f"featx: {len(failed)} image(s) could not be read{of_them} (their rows say why)", file=sys.stderr)
    return 1


def _print_or_write(rows: Iterable, output: str | None, top: int, *, sheet: str | None = None) -> None:
    """Rows printed a line each as they come, or written to the CSV ``output``; with ``sheet``, drawn by
    class at the end (each class's least sure images kept on the way)."""
    import featx

    drawn = featx.ClassSheet()
    if sheet is not None:
        from .errors import check_output_file

        check_output_file(sheet, example="classes.png")  # drawn at the end: refused before the rows are made
        rows = _each(rows, drawn.add)
    unlike: list[str] = []
    rows = _each(rows, lambda row: row.unlike_training and unlike.append(row.key))
    if output is None:
        for row in rows:
            print(row.line(), flush=True)
    else:
        n = featx.write_predictions(rows, output, top=top)
        print(f"{n} rows -> {output}")
    if unlike:  # a folder's worth of lines scrolls past: the count is said at the end
        print(f"{len(unlike)} image(s) unlike the training images, their classes guesses (e.g. {unlike[0]})"
              + (": column unlike_training" if output is not None else ""))
    if sheet is not None and drawn.draw(sheet):
        print(f"-> {sheet}")


def _add_sheet(p) -> None:
    p.add_argument("--sheet", default=None,
                   help="PNG of the images by the class given, a row per class (the 20 given most often), the least "
                        "sure first")


def _each(rows: Iterable, on_row) -> Iterator:
    """``rows`` as they come, each handed to ``on_row`` on its way."""
    for row in rows:
        on_row(row)
        yield row


def _noting_failures(rows: Iterable, failed: list[str]) -> Iterator:
    """``rows`` as they come, the key of each failed one appended to ``failed``."""
    return _each(rows, lambda row: row.error and failed.append(row.key))


if __name__ == "__main__":
    sys.exit(main())
