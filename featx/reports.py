"""What a head scored on labelled images, as text, CSV and PNG: the report of ``train_head`` (held-out
split, K folds) and of ``evaluate`` (a test folder). Shared by :mod:`featx.heads` and
:mod:`featx.predictions`; it fits nothing, and reads only the images it draws. The sheets of thumbnails
are drawn here for every command that has one: the mistakes, classify's and predict's images by class
(:class:`ClassSheet`), and through :func:`draw_thumbnails` similar's matches and info's copies."""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import check_output_file

NO_MULTILABEL_MISTAKES = ("--mistakes lists images given one wrong class; a multi-label head's report has the F1 of "
                           "each label instead")


@dataclass
class HeadReport:
    """What ``train_head`` measured on held-out data, or ``evaluate_head`` on a labelled cache."""

    head: str
    n_test: int
    accuracy: float
    macro_f1: float
    per_class: str  # scikit-learn's classification report
    confusion: np.ndarray
    classes: list[str]
    n_train: int = 0
    fit_seconds: float = 0.0
    cv_accuracy: list[float] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    micro_f1: float | None = None  # multi-label only; accuracy is then the exact-match ratio
    balanced_accuracy: float | None = None  # single-label: the mean of the per-class recalls
    n_copies: int = 0  # rows left out: the same bytes as another row of the same class or labels (find_copies)
    n_near_copies: int = 0  # train_head: images with a near copy (resized, re-encoded), kept on its side of the split
    evaluated_on: str | None = None  # evaluate_head: the cache scored (the head was trained elsewhere)
    # evaluate_head, single-label: (key, true class, predicted class, its probability), most confident first
    mistakes: list[tuple[str, str, str, float]] = field(default_factory=list)
    mistakes_of: str = ""  # which images the mistakes are of, when not those scored above
    mistakes_file: str | None = None  # the CSV write_mistakes wrote them to
    # the images scored that are unlike the head's training images (its unlike_training), the cosine to
    # the nearest class mean under which they are, and the accuracy (multi-label: exact match) on them
    # and on the rest; None: a head saved without class means
    n_unlike: int | None = None
    typical_cosine: float | None = None
    accuracy_unlike: float | None = None
    accuracy_like: float | None = None
    marked_by: str = "predict"  # the command that marks such images: classify for a model file scored

    def note_unlike(self, unlike: np.ndarray, correct: np.ndarray, typical_cosine: float | None, *,
                    marked_by: str = "predict") -> None:
        """Record which scored images are unlike the training images (bool per image) and how often
        those, and the rest, were right (bool per image)."""
        unlike, correct = np.asarray(unlike, dtype=bool), np.asarray(correct, dtype=bool)
        self.n_unlike, self.typical_cosine, self.marked_by = int(unlike.sum()), typical_cosine, marked_by
        self.accuracy_unlike = float(correct[unlike].mean()) if unlike.any() else None
        self.accuracy_like = float(correct[~unlike].mean()) if (~unlike).any() else None

    def _unlike_line(self) -> str | None:
        if self.n_unlike is None or self.typical_cosine is None:
            return None
        scored = f"{self.n_test} {'held-out ' if self.evaluated_on is None else ''}images"
        cut = (f"(cosine to the nearest class mean under {self.typical_cosine:.3f}, which 99% of the training images "
               "reach)")
        if not self.n_unlike:
            return f"none of the {scored} is unlike the training images {cut}"
        right = "exact-match accuracy" if self.micro_f1 is not None else "accuracy"
        rest = f", {self.accuracy_like:.3f} on the rest" if self.accuracy_like is not None else ""
        return (f"{self.n_unlike} of the {scored} {'is' if self.n_unlike == 1 else 'are'} unlike the training "
                f"images {cut}: {right} "
                f"{self.accuracy_unlike:.3f} on them{rest}; {self.marked_by} marks such images")

    def text(self, *, mistakes_shown: int = 10) -> str:
        micro = f", micro-F1 {self.micro_f1:.4f}" if self.micro_f1 is not None else ""
        balanced = f", balanced accuracy {self.balanced_accuracy:.4f}" if self.balanced_accuracy is not None else ""
        copies = "; ".join(
            ([f"{self.n_copies} cop{'ies' if self.n_copies > 1 else 'y'} of other images left out"] if self.n_copies
             else []) + ([f"{self.n_near_copies} near copies kept on the side of their picture"]
                         if self.n_near_copies else []))
        scores = (f"{self.head}: {'exact-match ' if self.micro_f1 is not None else ''}accuracy {self.accuracy:.4f}"
                  f"{balanced}, macro-F1 {self.macro_f1:.4f}{micro}")
        if self.evaluated_on is not None:
            lines = [f"{scores} on {self.n_test} images of {self.evaluated_on}{f' ({copies})' if copies else ''}"]
        else:
            lines = [f"{scores} on {self.n_test} held-out images (trained on {self.n_train} in "
                     f"{self.fit_seconds:.2f} s{f'; {copies}' if copies else ''})"]
        if self.cv_accuracy:
            lines.append(f"{len(self.cv_accuracy)}-fold cross-validation accuracy: "
                         f"{np.mean(self.cv_accuracy):.4f} ± {np.std(self.cv_accuracy):.4f}")
        unlike = self._unlike_line()
        if unlike:
            lines.append(unlike)
        lines.append(self.per_class.rstrip())
        if self.micro_f1 is None and len(self.classes) <= _MATRIX_PRINTED_UP_TO:
            lines.append(_confusion_table(self.confusion, self.classes))
        elif self.micro_f1 is None:  # numpy would print its corners around '...': the pairs say more
            lines.append(_most_confused(self.confusion, self.classes))
        if self.mistakes:
            shown = self.mistakes[:mistakes_shown]
            of = f" ({self.mistakes_of})" if self.mistakes_of else ""
            lines.append(f"{len(self.mistakes)} misclassified{of}, the most confident first:")
            from .data import printable

            lines += [f"  {printable(key)}  {true} -> {predicted} {p:.1%}" for key, true, predicted, p in shown]
            if len(self.mistakes) > len(shown):
                where = f"all in {self.mistakes_file}" if self.mistakes_file else "--mistakes CSV lists them all"
                lines.append(f"  … {len(self.mistakes) - len(shown)} more ({where})")
        lines += [f"-> {f}" for f in self.files]
        return "\n".join(lines)

    def write_mistakes(self, path: str | os.PathLike) -> Path:
        """Every mistake to a CSV (key, class, predicted, probability), the most confident first; the file
        is then listed with the report's others."""
        import csv

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(["key", "class", "predicted", "probability"])
            writer.writerows((key, true, predicted, f"{p:.6f}") for key, true, predicted, p in self.mistakes)
        self.mistakes_file = str(path)
        self.files.append(str(path))
        return path


def single_label_report(head: str, truth: np.ndarray, predicted: np.ndarray, classes: list[str],
                         **fields) -> HeadReport:
    """Scores of class-name predictions against class names; the confusion matrix over ``classes``."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score, classification_report, confusion_matrix, f1_score

    with warnings.catch_warnings():  # a class predicted but absent from the truth (a part of a folder) is no news
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(truth, predicted))
    return HeadReport(
        head=head, n_test=len(truth), accuracy=float(np.mean(predicted == truth)), balanced_accuracy=balanced,
        macro_f1=float(f1_score(truth, predicted, average="macro", zero_division=0)),
        per_class=classification_report(truth, predicted, digits=3, zero_division=0),
        confusion=confusion_matrix(truth, predicted, labels=classes), classes=classes, **fields)


def multilabel_report(head: str, truth: np.ndarray, predicted: np.ndarray, names: list[str], **fields) -> HeadReport:
    """Scores of (n, labels) 0/1 predictions: exact-match ratio, macro and micro F1, per-label report."""
    from sklearn.metrics import classification_report, f1_score, multilabel_confusion_matrix

    return HeadReport(
        head=f"{head} (multi-label)", n_test=len(truth), accuracy=float(np.mean((predicted == truth).all(axis=1))),
        macro_f1=float(f1_score(truth, predicted, average="macro", zero_division=0)),
        micro_f1=float(f1_score(truth, predicted, average="micro", zero_division=0)),
        per_class=classification_report(truth, predicted, target_names=names, digits=3, zero_division=0),
        confusion=multilabel_confusion_matrix(truth, predicted), classes=names, **fields)


def check_report_files(*, output=None, report_png=None, mistakes_csv=None) -> None:
    """The files a fit or a score writes at its end, refused before it starts when one is a folder;
    ``output``: (path, an example file name)."""
    if output is not None:
        check_output_file(output[0], example=output[1])
    check_output_file(report_png, example="confusion.png")
    check_output_file(mistakes_csv, example="mistakes.csv")


def misclassified(keys, truth: np.ndarray, predicted: np.ndarray, confidence) -> list[tuple[str, str, str, float]]:
    """(key, class, predicted class, its probability) of each image predicted wrong, the most confident
    first: a file filed under the wrong class is among them. ``confidence``: (n,) the predicted
    class's probability."""
    wrong = np.flatnonzero(predicted != truth)
    return sorted(((str(keys[i]), str(truth[i]), str(predicted[i]), float(confidence[i])) for i in wrong),
                  key=lambda m: -m[3])


def plot_label_f1(f1: np.ndarray, names: list[str], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(max(5, 0.6 * len(names) + 2), 22), 4))
    ax.bar(range(len(names)), f1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    _name_some_classes(ax, names, y=False)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 on held-out images")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


_MATRIX_PRINTED_UP_TO = 20  # classes; more, and the report lists the most confused pairs instead
_VALUES_DRAWN_UP_TO = 40  # classes; more, and a cell is too small for its count
_LABELS_DRAWN = 80  # at most this many class names along each axis


def _confusion_table(matrix: np.ndarray, classes: list[str]) -> str:
    """The matrix with each row named by its class and the columns numbered as the rows: the classes
    are the head's (or those met), which scikit-learn's report above lists only when they were met."""
    named_by_number = all(str(name) == str(i) for i, name in enumerate(classes))  # digits: '0 0' says it twice
    number = [str(name) if named_by_number else f"{i} {name}" for i, name in enumerate(classes)]
    first = max(len(n) for n in number)
    cell = max(len(str(int(matrix.max()))), len(str(len(classes) - 1))) + 2
    lines = ["confusion matrix (rows: true class; columns: predicted, numbered as the rows):",
             " " * (first + 2) + "".join(f"{i:>{cell}}" for i in range(len(classes)))]
    lines += [f"  {n:<{first}}" + "".join(f"{int(v):>{cell}}" for v in row) for n, row in zip(number, matrix)]
    return "\n".join(lines)


def _most_confused(matrix: np.ndarray, classes: list[str], shown: int = 10) -> str:
    """The ``shown`` largest off-diagonal counts of a confusion matrix, as 'true -> predicted: n' lines."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:shown]  # ties in class order
    pairs = [(int(i), int(j)) for i, j in zip(*np.unravel_index(order, off.shape)) if off[i, j] > 0]
    if not pairs:
        return "no image was given another class"
    return "\n".join([f"most confused classes ({len(classes)} classes; the confusion PNG has them all):"]
                     + [f"  {classes[i]} -> {classes[j]}: {off[i, j]} image{'s' if off[i, j] > 1 else ''}"
                        for i, j in pairs])


def _name_some_classes(ax, names: list[str], *, y: bool = True) -> None:
    """Past 80 classes, every k-th name along the x axis (and y), small, so at most 80 are drawn."""
    step = -(-len(names) // _LABELS_DRAWN)
    if step > 1:
        ticks = np.arange(0, len(names), step)
        ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=6)
        if y:
            ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=6)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, *, title: str) -> None:
    """Counts; beside them, when the held-out classes differ twice or more in size, each row divided by
    its total (the recall of each class), where a small class's misses would not show in counts.
    Past 40 classes the cells are drawn without their numbers, the figure stops growing (22 inches a
    side), and at most 80 class names label each axis: 300 classes took 86 s and 14 MB drawn in full,
    and 1,000 would have been a 55,000-pixel square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    support = matrix.sum(axis=1)
    uneven = support.min() > 0 and support.max() >= 2 * support.min()
    values = len(classes) <= _VALUES_DRAWN_UP_TO
    size = min(max(5, 0.5 * len(classes) + 2), 22)
    fig, axes = plt.subplots(1, 2 if uneven else 1, figsize=(size * (2 if uneven else 1), size), squeeze=False,
                             layout="constrained")
    panels = [(matrix, "counts", "d")]
    if uneven:
        panels.append((matrix / support[:, None], "share of each true class (rows sum to 1)", ".2f"))
    for ax, (shown, name, fmt) in zip(axes[0], panels):
        ConfusionMatrixDisplay(shown, display_labels=classes).plot(ax=ax, colorbar=False, xticks_rotation=45,
                                                                   values_format=fmt, include_values=values)
        ax.set_title(name)
        _name_some_classes(ax, classes)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


MISTAKES_DRAWN = 24  # the most confident mistakes drawn as thumbnails: four rows of six


def mistakes_png_beside(png: Path) -> Path:
    """Where the mistakes' thumbnails go: beside the confusion matrix ``head.confusion.png``, as
    ``head.mistakes.png``."""
    stem = png.name[:-len(".confusion.png")] if png.name.endswith(".confusion.png") else png.stem
    return png.with_name(f"{stem}.mistakes.png")


def plot_mistakes(report: HeadReport, folder: str | os.PathLike | None, path: Path, *, title: str) -> bool:
    """The most confident mistakes as thumbnails, each under its class, what the head took it for and how
    sure, and its file name: a misfiled photo is seen at a glance, where the list gives only paths.
    ``folder``: the one the mistakes' keys are relative to. Nothing is drawn (False) when there is no
    mistake or the folder is not here (a cache read on another machine). A file that no longer reads
    is a grey tile that says so."""
    if not report.mistakes or not folder or not os.path.isdir(folder):
        return False
    shown = report.mistakes[:MISTAKES_DRAWN]
    tiles = [(os.path.join(folder, key), f"{short_caption(true)} -> {short_caption(predicted)} {p:.0%}\n"
              f"{file_caption(key)}") for key, true, predicted, p in shown]
    draw_thumbnails(tiles, min(6, len(tiles)), path,
                    title=f"{title}: {len(shown)} of {len(report.mistakes)} mistakes, the most confident first")
    report.files.append(str(path))
    return True


CLASSES_DRAWN, IMAGES_PER_CLASS_DRAWN = 20, 8  # a sheet of 20 rows of 8 thumbnails at the most


def plot_by_class(rows, path: str | os.PathLike) -> bool:
    """Images by the class they were given (``rows`` of :func:`featx.classify` or :func:`featx.predict`:
    ``key`` a file's path, ``top`` its classes, the first taken), a row per class, the classes given most
    often first (CLASSES_DRAWN of them), the least sure first in each row (IMAGES_PER_CLASS_DRAWN of
    them): where a new folder's errors are, seen. Failed rows are left out. Nothing is drawn (False,
    said) when no image was classified. ``rows`` are read once, as they come (:class:`ClassSheet`)."""
    sheet = ClassSheet()
    for row in rows:
        sheet.add(row)
    return sheet.draw(path)


class ClassSheet:
    """:func:`plot_by_class` fed a row at a time, beside whatever else reads the rows (the CLI prints them
    as they come): it keeps each class's count and its least sure images only, so a folder of any size
    is drawn in bounded memory."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        # per class: a max-heap of (-sureness, key, p, unlike); an image unlike the training images (a head's
        # or merged classifier's mark) is less sure than any other, whatever its probability
        self.least_sure: dict[str, list[tuple[float, str, float, bool]]] = {}

    def add(self, row) -> None:
        if row.error is not None or not row.top:
            return
        name, p = row.top[0]
        unlike = bool(row.unlike_training)
        self.counts[name] = self.counts.get(name, 0) + 1
        heap = self.least_sure.setdefault(name, [])
        entry = (-(p - unlike), row.key, p, unlike)
        if len(heap) < IMAGES_PER_CLASS_DRAWN:
            heapq.heappush(heap, entry)
        elif entry[0] > heap[0][0]:
            heapq.heapreplace(heap, entry)

    def draw(self, path: str | os.PathLike) -> bool:
        import logging

        if not self.counts:
            logging.getLogger(__name__).warning("no image was classified: %s is not drawn", path)
            return False
        classes = sorted(self.counts, key=lambda name: (-self.counts[name], name))[:CLASSES_DRAWN]
        per_class = max(len(self.least_sure[name]) for name in classes)
        # a row per class; where each class has one to three images (a few photos, a class each), rows of six
        columns = per_class if per_class >= 4 else 6
        tiles: list[tuple[str, str] | None] = []
        for name in classes:
            shown = sorted(self.least_sure[name], reverse=True)
            tiles += [(key, f"{short_caption(name, 20)} {p:.0%}{' unlike training' if unlike else ''}\n"
                            f"{file_caption(key)}") for _, key, p, unlike in shown]
            if columns == per_class:
                tiles += [None] * (columns - len(shown))
        columns = min(columns, len(tiles))
        layout = "a row each" if columns == per_class else "in turn"
        draw_thumbnails(tiles, columns, Path(path), title=f"{sum(self.counts.values())} images by the class given, "
                        f"{layout} ({len(classes)} of {len(self.counts)} classes), the least sure first")
        return True


def draw_thumbnails(tiles: list[tuple[str, str] | None], columns: int, path: Path, *, title: str) -> None:
    """A PNG of image files as thumbnails, ``columns`` a row, each under its caption: ``tiles`` holds
    (file, caption), or None for an empty place. A file that does not read (deleted since, or changed)
    is a grey tile that says so."""
    import concurrent.futures as cf
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import thumbnail
    from .pipeline import default_workers

    # decoded in threads: a phone's HEIC photo takes most of a second (JPEGs, at reduced scale, a few ms)
    with cf.ThreadPoolExecutor(default_workers()) as pool:
        pictures = list(pool.map(lambda tile: tile and thumbnail(tile[0]), tiles))
    rows = -(-len(tiles) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.6 * rows + 0.5), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, picture, tile in zip(axes.flat, pictures, tiles):
        if tile is None:
            continue
        if picture is not None:
            # a small image (a 32-pixel digit) drawn with its pixels square, not blurred across the tile
            ax.imshow(picture, interpolation="nearest" if max(picture.size) < 80 else "antialiased")
        else:
            ax.imshow(np.full((160, 160, 3), 200, dtype=np.uint8))
            ax.text(80, 80, "not readable now", ha="center", va="center", fontsize=8)
        ax.set_title(tile[1], fontsize=8)
    fig.suptitle(textwrap.fill(title, 22 * columns), fontsize=10)  # a narrow sheet (two tiles) cut it off
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def short_caption(text: str, most: int = 14) -> str:
    """``text`` cut to ``most`` characters with an ellipsis: a thumbnail's caption is 2 inches wide."""
    return text if len(text) <= most else text[:most - 1] + "…"


def file_caption(path: str) -> str:
    """A file's name (a key's or a path's last part), printable and cut to fit under its thumbnail."""
    from .data import printable

    return short_caption(printable(path.replace(os.sep, "/").rsplit("/", 1)[-1]), 26)
