"""A trained head, or a model with classes of its own, applied to images.

``predict`` / ``iter_predictions``: image files and folders through the head's own model (a folder
through its cache) to rows of top classes. ``evaluate_head`` / ``evaluate_classifier``: accuracy,
per-class report and the most confident mistakes on labelled images kept apart from training (the
pictures the head or model trained on, by bytes or near copy, left out). ``export_classifier``: the
backbone and a head merged into one ONNX file, images to probabilities.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from .errors import FeatxError, HeadMismatchError, check_output_file
from .heads import (LoadedHead, apply_to_rows, digest_prefix_of_each, head_model_file, keys_as_cached, label_matrix,
                    load_head, read_labels_csv, rows_labelled_by_csv)
from .reports import (NO_MULTILABEL_MISTAKES, HeadReport, check_report_files, misclassified, multilabel_report,
                      mistakes_png_beside, plot_confusion, plot_label_f1, plot_mistakes, single_label_report)

_logger = logging.getLogger(__name__)
NOT_FINITE = ("its embedding is not finite numbers (NaN or infinity): the cache holding it is damaged (embed into "
              "a new file), or the model overflowed")


# ---------------------------------------------------------------------------------------- prediction


@dataclass
class PredictionRow:
    marks_unlike: ClassVar[bool] = True  # a head's rows: the CSV has class_mean_cosine and unlike_training

    key: str
    top: list[tuple[str, float]]
    error: str | None = None
    labels: list[str] | None = None  # multi-label heads: every label at or above its threshold
    # its cosine to the nearest class mean of the head's training embeddings, and whether that is below
    # what 99% of the training images reach (the head's unlike_training); None: a head saved without them
    class_mean_cosine: float | None = None
    unlike_training: bool | None = None

    def line(self) -> str:
        from .pipeline import UNLIKE_TRAINING, Classification  # classify's line, a multi-label head's labels

        chosen = f"  labels: {';'.join(self.labels) or '-'}" if self.labels is not None and not self.error else ""
        unlike = f"  {UNLIKE_TRAINING}" if self.unlike_training and not self.error else ""
        return Classification(self.key, self.top, self.error).line() + chosen + unlike


def iter_predictions(
    inputs: Sequence[str | os.PathLike],
    *,
    head: str | os.PathLike,
    model: str | os.PathLike | None = None,
    weights: str | None = None,
    top: int = 3,
    cache: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = False,
    batch_size: int | None = None,
) -> Iterator[PredictionRow]:
    """:func:`predict`'s rows one at a time, as they are made: a folder of any size runs in bounded memory.

    One folder alone is embedded through the cache first (``cache``, else a temporary one), then its
    rows are read back a chunk at a time, files gone from the folder left out; files and several inputs
    are decoded and encoded ``batch_size`` at a time (default: the device's, ``default_batch_size``). The
    head runs once per chunk or batch. ``model``: by default the one the head's embeddings came from
    (:func:`head_model_file`).
    """
    import tempfile

    from .data import walk_sort_key
    from .pipeline import embed_folder, encode_files, encode_files_through_cache, expand_inputs, warn_no_images
    from .runtime import default_batch_size, load_model, read_model_info
    from .store import iter_embeddings, load_failures, model_fingerprints

    if top < 1:
        raise FeatxError(f"top={top}: ask for at least one class")
    loaded = load_head(head)
    model_file = head_model_file(loaded, model, weights)
    info = read_model_info(model_file)
    loaded.check_model(info.fingerprint, f"model {model_file}")
    classes = [str(c) for c in loaded.head.classes_]
    multilabel = getattr(loaded.head, "multilabel_", False)
    knows_means = getattr(loaded.head, "class_means_", None) is not None
    if not knows_means:
        _logger.info("%s was saved before featx kept its class means: images unlike its training images are not "
                     "marked (train it again to have them marked)", head)

    def rows_of(keys: list[str], embeddings: np.ndarray) -> Iterator[PredictionRow]:
        finite = np.isfinite(embeddings).all(axis=1)  # a damaged cache's row: scikit-learn would raise
        if not finite.all():
            made = iter(rows_of([k for k, ok in zip(keys, finite) if ok], embeddings[finite]) if finite.any() else ())
            for key, ok in zip(keys, finite):
                yield next(made) if ok else PredictionRow(key, [], NOT_FINITE)
            return
        cosines, unlike = [None] * len(keys), [None] * len(keys)
        if knows_means:
            cosines = loaded.head.class_mean_cosine(embeddings)
            unlike = loaded.head.unlike_at(cosines)
        for key, probs, cosine, far in zip(keys, loaded.head.predict_proba(embeddings), cosines, unlike):
            best = np.argsort(-probs)[:top]
            chosen = [classes[j] for j in np.flatnonzero(probs >= loaded.head.thresholds_)] if multilabel else None
            yield PredictionRow(key, [(classes[i], float(probs[i])) for i in best], labels=chosen,
                                class_mean_cosine=None if cosine is None else float(cosine),
                                unlike_training=None if far is None else bool(far))

    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        folder = str(inputs[0])
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(cache) if cache else Path(tmp) / "predict.h5"
            stats = embed_folder(folder, out, model=model_file, device=device, progress=progress,
                                 **({"batch_size": batch_size} if batch_size else {}))
            if stats.found_nothing:
                warn_no_images(folder)
            group, gone = Path(model_file).stem, set(stats.gone)
            # the cache's keys are relative to the folder it follows; this folder may be a part of it
            prefix = stats.subfolder + "/" if stats.subfolder else ""

            def named(key: str) -> str:  # a row names the file as given (keys under the prefix only)
                return os.path.join(folder, key[len(prefix):])

            # failures are few: whether each file is still there is asked of the folder itself
            failed = sorted(((walk_sort_key(k), k, reason) for k, reason in load_failures(out, group).items()
                             if k.startswith(prefix) and os.path.lexists(named(k))), reverse=True)
            # rows in the order the folder is walked, each failure in its place
            for keys, embeddings in iter_embeddings(out, group, sort_key=walk_sort_key):
                keep = [i for i, k in enumerate(keys) if k not in gone and k.startswith(prefix)]
                for i, row in zip(keep, rows_of([named(keys[i]) for i in keep], embeddings[keep]) if keep else ()):
                    while failed and failed[-1][0] < walk_sort_key(keys[i]):
                        _, key, reason = failed.pop()
                        yield PredictionRow(named(key), [], reason)
                    yield row
            yield from (PredictionRow(named(key), [], reason) for _, key, reason in reversed(failed))
        return
    def engine():
        return load_model(model_file, device=device, engine="onnx", spin=False)

    batch_size = batch_size or default_batch_size(device)
    paths = expand_inputs(inputs)
    group = Path(model_file).stem
    if cache is not None and Path(cache).exists() and model_fingerprints(cache).get(group) == info.fingerprint:
        # files the cache holds, unchanged since embedded, take their stored embeddings
        encoded = ((path, emb, error) for path, emb, error, _, _ in
                   encode_files_through_cache(engine, paths, cache, group, batch_size=batch_size, progress=progress))
    else:
        if cache is not None:  # given, but it can serve nothing here: said, not left unused in silence
            _logger.warning("%s %s: the images are embedded without it, and nothing is kept (a folder given alone is "
                            "embedded into a cache)", cache, "does not exist" if not Path(cache).exists() else
                            f"holds no embeddings of {model_file}")
        encoded = ((path, emb, error) for path, emb, _, error, _ in
                   encode_files(engine(), paths, batch_size=batch_size, progress=progress))
    batch: list[tuple[str, np.ndarray | None, str | None]] = []
    for path, embedding, error in encoded:
        batch.append((path, embedding, error))
        if len(batch) == batch_size:
            yield from _batch_rows(batch, rows_of)
            batch = []
    yield from _batch_rows(batch, rows_of)


def _batch_rows(batch, rows_of) -> Iterator[PredictionRow]:
    """Rows of one encoded batch in its order: the head runs once on its good images."""
    good = [(path, emb) for path, emb, error in batch if error is None]
    made = iter(rows_of([p for p, _ in good], np.stack([e for _, e in good])) if good else ())
    for path, _, error in batch:
        yield PredictionRow(path, [], error) if error else next(made)


def predict(
    inputs: Sequence[str | os.PathLike],
    *,
    head: str | os.PathLike,
    model: str | os.PathLike | None = None,
    weights: str | None = None,
    top: int = 3,
    output: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = False,
) -> list[PredictionRow]:
    """Classify image files and folders with a trained head; one folder alone is embedded through the
    cache (``cache``, else a temporary one), so a re-run on it only embeds what is new.

    A bad image is a row with an error, never an exception. With ``output``, rows go to a CSV as they
    are made (a run stopped part-way keeps the rows written). ``progress`` shows a bar (images,
    images/s, ETA). For a folder too large to hold its rows in memory, use :func:`iter_predictions`.
    """
    from .pipeline import collect_rows

    return collect_rows(iter_predictions(inputs, head=head, model=model, weights=weights, top=top, cache=cache,
                                         device=device, progress=progress), output, top=top)


# ---------------------------------------------------------------------------------------- evaluation


def evaluate_head(
    data: str | os.PathLike,
    head: str | os.PathLike,
    *,
    cache: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    weights: str | None = None,
    labels_csv: str | os.PathLike | None = None,
    report_png: str | os.PathLike | None = None,
    mistakes_csv: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = False,
) -> HeadReport:
    """Score a trained head on labelled images kept apart from its training: a test folder, new photos
    sorted by hand.

    ``data``: a cache of a folder whose class subfolders are named as the head's classes (its model group
    is the one with the head's fingerprint), or the folder itself, embedded first with ``model`` (by
    default the head's own, :func:`head_model_file`) into ``cache`` (a re-run embeds only what is new; a
    part of the cache's folder is scored alone), else into a temporary one. ``labels_csv``: a multi-label
    head's labels (``key,a;b``).
    Left out, each counted in a warning: images of classes the head does not know, copies (the same bytes
    and class), and images whose bytes are in the cache the head was trained from (it may have trained on
    them: the score would flatter it). Saves the confusion matrix (per-label F1 for a multi-label head)
    as ``report_png``, by default beside the head (HEAD.DATA.confusion.png); ``mistakes_csv``: every
    misclassified image, the most confident mistake first.
    """
    import tempfile

    from .store import check_finite, find_copies, gone_line, load_embeddings, model_fingerprints

    check_report_files(report_png=report_png, mistakes_csv=mistakes_csv)
    loaded = load_head(head)
    multilabel = bool(getattr(loaded.head, "multilabel_", False))
    if multilabel and labels_csv is None:
        raise FeatxError(f"{head} is a multi-label head: give the images' labels with --labels CSV (key,label1;label2)")
    if labels_csv is not None and not multilabel:
        raise FeatxError(f"{head} is a single-label head: its classes are the folder's first-level subfolders, "
                         "not a labels CSV")
    if multilabel and mistakes_csv is not None:
        raise FeatxError(NO_MULTILABEL_MISTAKES)
    wanted = read_labels_csv(labels_csv) if multilabel else None  # before the folder is embedded
    source, part = Path(data), None
    if cache is not None and not source.is_dir():  # it would be left unused: nothing is embedded
        raise FeatxError(f"--cache keeps a test folder's embeddings; {data} is not a folder but a cache itself: "
                         "give the folder, or leave --cache out")
    if source.is_dir():
        with tempfile.TemporaryDirectory() as tmp:  # without a cache, the folder's embeddings are not kept
            source = Path(cache) if cache is not None else Path(tmp) / f"{source.name}.h5"
            group, part = _embed_for_head(loaded, Path(data), source, model, weights, device=device, progress=progress)
            embeddings = load_embeddings(source, group)  # rows of files gone are not the part's
    else:
        groups = model_fingerprints(source)
        matching = [g for g, fp in groups.items() if fp == loaded.fingerprint]
        if not matching:
            held = ", ".join(f"{g} (fingerprint {fp})" for g, fp in groups.items()) or "no embeddings"
            raise HeadMismatchError(f"head was trained on {loaded.model} embeddings (fingerprint "
                                    f"{loaded.fingerprint}); {source} holds {held}: `featx evaluate FOLDER --head "
                                    f"{head} --cache {source}` embeds a folder with the head's model")
        group = loaded.model if loaded.model in matching else matching[0]
        embeddings = load_embeddings(source, group, present_only=True)
    check_finite(embeddings, source)
    if embeddings.gone:  # a cache scored by itself: its folder's photos deleted since are not test images
        _logger.warning("%s", gone_line(embeddings.gone, embeddings.attrs.get("folder"), source))
    rows = [i for i, key in enumerate(embeddings.keys) if part is None or part(key)]
    failed = sorted(key for key in embeddings.failures if part is None or part(key))
    if failed:  # recorded in the cache when embedded: not scored, but not passed over in silence
        kept = f"; `featx info {source} --failures` lists them" if part is None or cache is not None else ""
        _logger.warning("%d image(s) could not be read, left out (e.g. %s: %s)%s", len(failed), failed[0],
                        embeddings.failures[failed[0]], kept)
    classes = [str(c) for c in loaded.head.classes_]
    if multilabel:
        wanted = keys_as_cached(wanted, embeddings.attrs.get("folder"), [*embeddings.keys, *embeddings.gone])
        rows, n_copies = rows_labelled_by_csv(embeddings, rows, wanted, data, labels_csv)
        unknown = sorted({label for i in rows for label in wanted[embeddings.keys[i]]} - set(classes))
        if unknown:
            _logger.warning("%d label(s) of %s are not the head's, left out of the scores: %s", len(unknown),
                            labels_csv, ", ".join(unknown[:10]))
    else:
        names = embeddings.class_names
        truth = [names[embeddings.labels[i]] if embeddings.labels[i] >= 0 else None for i in rows]
        rows = [rows[j] for j in _rows_of_known_classes(truth, classes, Path(data), of="the head")]
        copies = find_copies([embeddings.keys[i] for i in rows], embeddings.labels[rows],
                             [embeddings.digests[i] for i in rows], folder=embeddings.attrs.get("folder"))
        # a temporary cache is named by its folder: its path would be gone before the line is read
        for line in copies.lines(str(data) if part is not None and cache is None else str(source)):
            _logger.warning("%s", line)
        rows, n_copies = [rows[j] for j in copies.keep], copies.n_copies
    rows = _rows_not_trained_on(loaded, embeddings, rows, Path(data))
    probs = apply_to_rows(loaded.head.predict_proba, embeddings.embeddings, rows)
    keys = [embeddings.keys[i] for i in rows]
    where = str(data) if part is not None else source.name
    data_name = Path(data).name if part is not None else source.stem
    png = Path(report_png) if report_png else Path(head).with_name(
        f"{Path(head).stem}.{data_name}.{'f1' if multilabel else 'confusion'}.png")
    # which images are unlike the head's training images: a test folder from elsewhere shows as many of them
    unlike = (apply_to_rows(loaded.head.unlike_training, embeddings.embeddings, rows)
              if getattr(loaded.head, "class_means_", None) is not None else None)
    if not multilabel:
        best = probs.argmax(axis=1)
        truth = [embeddings.class_names[embeddings.labels[i]] for i in rows]
        report = _score_classes(Path(head).name, keys, truth, [classes[j] for j in best],
                                probs[np.arange(len(rows)), best], where=where, png=png, mistakes_csv=mistakes_csv,
                                n_copies=n_copies, folder=embeddings.attrs.get("folder"))
        if unlike is not None:
            report.note_unlike(unlike, np.array(classes, dtype=object)[best] == np.array(truth, dtype=object),
                               loaded.head.typical_cosine_)
        return report
    from sklearn.metrics import f1_score

    truth = label_matrix((wanted[k] for k in keys), classes)
    predicted = (probs >= loaded.head.thresholds_).astype(int)
    report = multilabel_report(Path(head).name, truth, predicted, classes, n_copies=n_copies, evaluated_on=where)
    if unlike is not None:
        report.note_unlike(unlike, (predicted == truth).all(axis=1), loaded.head.typical_cosine_)
    plot_label_f1(f1_score(truth, predicted, average=None, zero_division=0), classes, png,
                   title=f"{Path(head).name} on {where}: micro-F1 {report.micro_f1:.3f}")
    report.files.insert(0, str(png))
    return report


def evaluate_classifier(
    folder: str | os.PathLike,
    model: str | os.PathLike,
    *,
    weights: str | None = None,
    report_png: str | os.PathLike | None = None,
    mistakes_csv: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = False,
) -> HeadReport:
    """Score a model that classifies by itself on a folder whose class subfolders are named as its classes:
    a fine-tuned export (``featx export NAME --weights ft.safetensors``), an :func:`export_classifier`
    file, or a backbone on folders named by ImageNet classes. The same report as :func:`evaluate_head`
    (images of classes the model lacks, and images directly under the folder, left out and counted),
    so a frozen head and a fine-tuned model are compared on one test folder. Nothing is cached.
    """
    from .export import ensure_model_file, is_model_file
    from .pipeline import iter_classify
    from .runtime import read_model_info

    check_report_files(report_png=report_png, mistakes_csv=mistakes_csv)
    folder = Path(folder)
    if not folder.exists():
        raise FeatxError(f"folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise FeatxError(f"{folder} is not a folder: a model is scored on a folder with class subfolders "
                         "(a cache holds embeddings, which a head scores: give --head)")
    model_file = ensure_model_file(model, weights=weights)
    info = read_model_info(model_file)
    if not info.has_logits:
        raise FeatxError(f"{model_file} classifies nothing (no logits): train a head on its embeddings and give --head")
    if info.multilabel:
        raise FeatxError(f"{model_file} is a multi-label classifier: evaluate its head with --head and --labels")
    # each image's perceptual hash taken as it is decoded, where the model knows pictures it trained on
    classified = list(iter_classify([folder], model=model_file, top=1, device=device, progress=progress,
                                    with_phashes=info.trained_phashes is not None))
    failed = [c for c in classified if c.error]
    if failed:
        _logger.warning("%d image(s) could not be read, left out (e.g. %s: %s)", len(failed), failed[0].path,
                        failed[0].error)
    rows = [c for c in classified if not c.error]
    if info.trained_phashes is not None:
        rows = _classified_not_trained_on(rows, info, model_file, folder)
    elif info.class_scores == "probabilities" or info.weights not in ("pretrained", "bundled", "none"):
        # a merged classifier or a fine-tuned export whose file predates the record: said, not passed over
        _logger.warning("%s records no pictures its classifier was trained on (written by a featx from before "
                        "model files kept them): test images it trained on are not left out; export it again "
                        "from its checkpoint or head to keep that record", Path(model_file).name)
    keys = [Path(os.path.relpath(c.path, folder)).as_posix() for c in rows]
    truth = _wordnet_folders_named([key.split("/")[0] if "/" in key else None for key in keys], info.class_names)
    known = _rows_of_known_classes(truth, info.class_names, folder, of="the model")
    # beside a model file named; in the working folder for a backbone name (not in the models folder)
    beside = Path(model_file) if is_model_file(model) else Path(Path(model_file).name)
    png = Path(report_png) if report_png else beside.with_name(f"{beside.stem}.{folder.name}.confusion.png")
    report = _score_classes(Path(model_file).name, [keys[i] for i in known], [truth[i] for i in known],
                            [rows[i].top[0][0] for i in known], [rows[i].top[0][1] for i in known],
                            where=str(folder), png=png, mistakes_csv=mistakes_csv, folder=folder)
    if info.class_means is not None:  # a merged classifier of a head with class means: as evaluate --head says
        report.note_unlike([rows[i].unlike_training for i in known],
                           [rows[i].top[0][0] == truth[i] for i in known], info.typical_cosine, marked_by="classify")
    return report


def _classified_not_trained_on(rows: list, info, model_file, folder: Path) -> list:
    """``rows`` (Classifications with their ``phash``) less the pictures the model's classifier was trained
    on, as its file knows them (``info.trained_phashes``): the same picture, resized or re-encoded, would
    flatter its score."""
    from .data import NEAR_COPY_BITS
    from .store import near_copy_pairs

    hashes = np.array([c.phash for c in rows], dtype=np.uint64)
    trained = set(near_copy_pairs(hashes, info.trained_phashes)[:, 0].tolist())
    if not trained:
        return rows
    kept = [c for i, c in enumerate(rows) if i not in trained]
    if not kept:
        raise FeatxError(f"{folder} holds only pictures {model_file} was trained on (its validation split's too): "
                         "evaluate images kept apart")
    _logger.warning("%d of %d images of %s are pictures %s was trained on (the same, resized or re-encoded: "
                    "perceptual hashes within %d of 64 bits; e.g. %s): left out, since they would flatter its score",
                    len(trained), len(rows), folder, Path(model_file).name, NEAR_COPY_BITS, rows[min(trained)].path)
    return kept


def _wordnet_folders_named(truth: list[str | None], class_names: list[str]) -> list[str | None]:
    """ImageNet's own folders are named by WordNet ID (``n07920052/``, ILSVRC's train and val layout): for
    a model of ImageNet's 1,000 classes, such a folder is read as the class at that ID's place in the
    standard order (timm's ImageNet synset list), ``espresso``; a class the model itself names so stays."""
    import re

    own = set(class_names)
    if len(class_names) != 1000 or not any(t and t not in own and re.fullmatch(r"n\d{8}", t) for t in truth):
        return truth
    from timm.data import ImageNetInfo

    place = {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}
    return [class_names[place[t]] if t in place and t not in own else t for t in truth]


def _score_classes(name: str, keys: list[str], truth: list[str], predicted: list[str], confidence,
                   *, where: str, png: Path, mistakes_csv, n_copies: int = 0, folder=None) -> HeadReport:
    """The report on one class per image: scores, the confusion matrix over the classes met (a model of
    1,000 classes is drawn on those the folder has or it predicted, in name order), its PNG, and the
    mistakes, the most confident first (all of them in ``mistakes_csv``; the first drawn beside the PNG,
    from ``folder``, the one the keys are relative to)."""
    shown = sorted(set(truth) | set(predicted))  # the order of scikit-learn's report, printed above the matrix
    truth, predicted = np.array(truth, dtype=object).astype(str), np.array(predicted, dtype=object).astype(str)
    mistakes = misclassified(keys, truth, predicted, confidence)
    report = single_label_report(name, truth, predicted, shown, n_copies=n_copies, evaluated_on=where,
                                  mistakes=mistakes)
    plot_confusion(report.confusion, shown, png, title=f"{name} on {where}: accuracy {report.accuracy:.3f}")
    report.files.append(str(png))
    plot_mistakes(report, folder, mistakes_png_beside(png), title=f"{name} on {where}")
    if mistakes_csv is not None:
        report.write_mistakes(mistakes_csv)
    return report


def _embed_for_head(loaded: LoadedHead, folder: Path, cache, model, weights, *, device: str, progress: bool):
    """Embed ``folder`` into ``cache`` with ``model`` (by default the one the head was trained on); the
    cache's group, and which of its keys are the folder's files (all but rows of files gone, or the part's)."""
    from .pipeline import embed_folder
    from .runtime import read_model_info

    model_file = head_model_file(loaded, model, weights)
    loaded.check_model(read_model_info(model_file).fingerprint, f"model {model_file}")
    stats = embed_folder(folder, cache, model=model_file, device=device, progress=progress)
    _logger.info("%s", stats.summary())
    prefix, gone = (stats.subfolder + "/" if stats.subfolder else ""), set(stats.gone)
    return Path(model_file).stem, lambda key: key.startswith(prefix) and key not in gone


def _rows_of_known_classes(truth: list[str | None], classes: list[str], source: Path, *, of: str) -> list[int]:
    """Positions of ``truth`` (each image's class; None directly under the folder) whose class is one of
    ``classes``; the others are counted in the log."""
    from collections import Counter

    known = set(classes)
    unlabelled = sum(1 for t in truth if t is None)
    if unlabelled:
        _logger.warning("%d image(s) directly under the folder have no class: left out", unlabelled)
    unknown = Counter(t for t in truth if t is not None and t not in known)
    if unknown:
        _logger.warning("%d image(s) of classes %s was not trained on are left out: %s", sum(unknown.values()), of,
                        ", ".join(f"'{c}' ({n})" for c, n in unknown.most_common(10)))
    rows = [i for i, t in enumerate(truth) if t in known]
    if not truth:
        raise FeatxError(f"{source} has no image to score (none found, or none could be read)")
    if not rows:
        found = ", ".join(f"'{c}'" for c in sorted(unknown)[:10])
        raise FeatxError(f"{source} has no image of a class {of} knows ({', '.join(classes[:10])}"
                         f"{', …' if len(classes) > 10 else ''}); its classes are "
                         f"{found or 'none: no class subfolders'}")
    return rows


def _rows_not_trained_on(loaded: LoadedHead, embeddings, rows: list[int], source: Path) -> list[int]:
    """``rows`` less those whose picture the head was trained or scored on: the same bytes, or a near copy
    (resized, re-encoded: :func:`featx.store.near_copy_pairs`). The head may have trained on them (the
    same photo in train/ and test/), and they would flatter its score. What it trained on is read from
    the head file's record (heads since it was kept: exactly its images, a multi-label head's CSV rows
    alone, whatever the cache has gained since), else from the cache it was trained from (all of it);
    where the cache can be read, an example's training image is named from it."""
    from .data import NEAR_COPY_BITS
    from .store import load_digests, near_copy_pairs

    @functools.cache
    def training_cache():
        """The training cache's (keys, digests, phashes), read once when it is needed; None without it."""
        if loaded.cache and os.path.isfile(loaded.cache):
            try:
                return load_digests(loaded.cache, loaded.model)
            except FeatxError as e:  # replaced or locked since
                _logger.info("cannot read the cache the head was trained from (%s)", e)
        return None

    if loaded.trained_digests is not None:
        known = set(loaded.trained_digests.tolist())
        prefixes = digest_prefix_of_each([embeddings.digests[i] for i in rows])
        same_bytes = [i for i, prefix in zip(rows, prefixes) if prefix in known]
        trained_phashes = loaded.trained_phashes
        where = "images the head was trained or scored on (recorded in its file)"
    elif training_cache() is not None:
        _, trained_digests, trained_phashes = training_cache()
        seen = {d.decode("ascii") for d in trained_digests if d}
        same_bytes = [i for i in rows if embeddings.digests[i] in seen]
        where = f"images of {loaded.cache}, the cache the head was trained from"
    else:
        _logger.warning("the cache the head was trained from (%s) is not there, and the head file is from before "
                        "heads kept what they trained on: test images the head may have trained on are not left "
                        "out; train the head again to keep that record", loaded.cache)
        return rows
    left_out = set(same_bytes)
    near = list(dict.fromkeys(rows[i] for i, _ in near_copy_pairs(embeddings.phashes[rows], trained_phashes)
                              if rows[i] not in left_out))
    left_out.update(near)
    kept = [i for i in rows if i not in left_out]
    if not kept:
        same = (f"{source} is the cache the head was trained from" if loaded.cache and os.path.isfile(loaded.cache)
                and os.path.samefile(source, loaded.cache) else f"{source} holds only {where}")
        raise FeatxError(f"{same}: train-head's report scores the images it held out; evaluate images kept apart")

    def twin(i: int) -> str:  # "test key", and " and training key" where the training cache names it
        found = training_cache()
        if found is None:
            return embeddings.keys[i]
        keys, digests, phashes = found
        digest = embeddings.digests[i].encode("ascii")
        same = np.flatnonzero(digests == digest) if digest else []
        if not len(same):
            same = np.flatnonzero((phashes != 0) & (np.bitwise_count(phashes ^ embeddings.phashes[i]) <= NEAR_COPY_BITS))
        return embeddings.keys[i] + (f" and {keys[same[0]]}" if len(same) else "")

    for found, what in ((same_bytes, "have the same bytes as"),
                        (near, f"are near copies (resized or re-encoded: perceptual hashes within {NEAR_COPY_BITS} "
                               "of 64 bits) of")):
        if found:
            _logger.warning("%d of %d images %s %s (e.g. %s): left out, since the head may have trained on them",
                            len(found), len(rows), what, where, twin(found[0]))
    return kept


# ---------------------------------------------------------------------------------------- deployment


def export_classifier(
    model: str | os.PathLike | None,
    head: str | os.PathLike,
    output: str | os.PathLike,
    *,
    weights: str | None = None,
) -> Path:
    """One ONNX file mapping uint8 images (n, H, W, 3) to ``probabilities`` (n, n_classes), for use without featx.

    The head's standardisation and layers are appended to the backbone's graph after its
    ``embedding`` output; class names go into the metadata (``featx_classes``), next to the
    backbone's preprocessing (``featx``). ``model`` None: the one the head's embeddings came from
    (:func:`head_model_file`).
    """
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    from .export import (METADATA_KEY, TRAINED_PHASHES_KEY, TYPICAL_COSINE_KEY, class_mean_cosine_graph, encode_phashes,
                         replace_model_file, save_model_file)

    check_output_file(output, example="classifier.onnx")
    loaded = load_head(head)
    model_file = head_model_file(loaded, model, weights)
    backbone = onnx.load(str(model_file))
    from .runtime import read_model_info

    backbone_info = read_model_info(model_file)
    loaded.check_model(backbone_info.fingerprint, f"model {model_file}")
    h = loaded.head
    inits = [numpy_helper.from_array(h.mean_.astype(np.float32), "mean"),
             numpy_helper.from_array(h.scale_.astype(np.float32), "scale")]
    nodes = [helper.make_node("Sub", ["embedding", "mean"], ["centred"]),
             helper.make_node("Div", ["centred", "scale"], ["x0"])]
    for i, (W, b) in enumerate(h.layers_):
        inits += [numpy_helper.from_array(W.T.astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [f"x{i}", f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"])]
        if i < len(h.layers_) - 1:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"x{i + 1}"]))
    last = f"z{len(h.layers_) - 1}"
    if getattr(h, "multilabel_", False):
        nodes.append(helper.make_node("Sigmoid", [last], ["probabilities"]))
    else:
        nodes.append(helper.make_node("Softmax", [last], ["probabilities"], axis=1))
    d, k = len(h.mean_), h.layers_[-1][0].shape[0]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", k])]
    marks = getattr(h, "class_means_", None) is not None and h.typical_cosine_ is not None
    if marks:  # named without a prefix here: the head's graph is prefixed 'head/' whole below (CLASS_MEANS_NAME)
        mean_inits, mean_nodes = class_mean_cosine_graph(h.class_means_)
        inits, nodes = inits + mean_inits, nodes + mean_nodes
        outputs.append(helper.make_tensor_value_info("class_mean_cosine", TensorProto.FLOAT, ["batch"]))
    graph = helper.make_graph(
        nodes, "featx_head",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", d])], outputs, initializer=inits,
    )
    head_model = helper.make_model(graph, opset_imports=list(backbone.opset_import), ir_version=backbone.ir_version)
    head_model = compose.add_prefix(head_model, "head/")
    named = ["probabilities"] + (["class_mean_cosine"] if marks else [])
    merged = compose.merge_models(backbone, head_model, io_map=[("embedding", "head/embedding")],
                                  outputs=[f"head/{n}" for n in named] + ["embedding"])
    unprefixed = {f"head/{n}": n for n in named}  # the file's outputs are named as a user reads them
    for out in merged.graph.output:
        out.name = unprefixed.get(out.name, out.name)
    for node in merged.graph.node:
        node.output[:] = [unprefixed.get(o, o) for o in node.output]
    del merged.metadata_props[:]
    merged.metadata_props.extend(p for p in backbone.metadata_props if p.key not in (TRAINED_PHASHES_KEY, METADATA_KEY))
    # the backbone's metadata with the head's classes: its ImageNet names would be read as this file's
    entry = merged.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = replace(backbone_info, class_names=[str(c) for c in h.classes_]).to_json()
    trained = _pictures_trained_on(loaded, backbone_info.trained_phashes)
    if trained is not None:  # evaluate leaves them out of a test folder, as it does for the head itself
        entry = merged.metadata_props.add()
        entry.key, entry.value = TRAINED_PHASHES_KEY, encode_phashes(trained)
    entry = merged.metadata_props.add()
    entry.key, entry.value = "featx_classes", json.dumps([str(c) for c in h.classes_])
    if getattr(h, "multilabel_", False):  # its probabilities are per label, not one class's share
        entry = merged.metadata_props.add()
        entry.key, entry.value = "featx_multilabel", "1"
    if marks:  # classify marks an image whose class_mean_cosine is under it, as predict does with the head
        entry = merged.metadata_props.add()
        entry.key, entry.value = TYPICAL_COSINE_KEY, repr(float(h.typical_cosine_))
    onnx.checker.check_model(merged)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    save_model_file(merged, tmp)
    replace_model_file(tmp, output)
    return output


def _pictures_trained_on(loaded: LoadedHead, backbone_trained: np.ndarray | None) -> np.ndarray | None:
    """uint64 perceptual hashes of every picture behind a classifier file: those the head was trained and
    scored on (its file's record; for a head from before it was kept, its training cache, all of it, as
    evaluate --head reads them) and, for a fine-tuned backbone, the pictures it was tuned on. None when
    neither is known (said)."""
    from .store import load_digests

    known = [] if backbone_trained is None else [backbone_trained]
    if loaded.trained_phashes is not None:
        known.append(loaded.trained_phashes)
    elif loaded.cache and os.path.isfile(loaded.cache):
        try:
            known.append(load_digests(loaded.cache, loaded.model)[2])
        except FeatxError as e:
            _logger.info("the head's training cache cannot be read (%s): its pictures are not kept in the file", e)
    else:
        _logger.info("the head's training cache %s is not there: evaluate cannot leave its pictures out of a "
                     "test folder", loaded.cache)
    if not known:
        return None
    hashes = np.concatenate(known)
    return np.unique(hashes[hashes != 0])


