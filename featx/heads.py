"""Cheap classifier heads on cached embeddings, as scikit-learn estimators; save/load without pickle.

``LogRegHead``: standardise + multinomial logistic regression (C by cross-validation unless given).
``MLPHead``: standardise + a small torch MLP (Dense-ReLU-Dropout blocks, AdamW, early stopping).
Both keep their learned state as plain arrays, predict with numpy, and save to .safetensors with
a JSON header (class names, backbone fingerprint), so loading a head runs no code from the file.
``train_head``: a cache's labelled rows to a saved head and a report on rows held out (or K folds).
A saved head applied to images (predict, evaluate, export with its backbone): :mod:`featx.predictions`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.exceptions import NotFittedError as _SklearnNotFittedError
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .backbones import DEFAULT_BACKBONE, save_safetensors, tensors_sha256
from .errors import FeatxError, HeadMismatchError, first_line
from .reports import (NO_MULTILABEL_MISTAKES, HeadReport, check_report_files, misclassified, multilabel_report,
                      mistakes_png_beside, plot_confusion, plot_label_f1, plot_mistakes, single_label_report)
from .store import unit_rows

_logger = logging.getLogger(__name__)
HEAD_FORMAT = "featx-head/1"
# Multi-label heads saved before 2026-12-06 chose their thresholds on scores standardised twice (0.05
# for every label); the header of those since says so, so that the old ones can be named.
THRESHOLDS_FROM = "network scores"



class NotFittedError(FeatxError, _SklearnNotFittedError):
    """A head used before fit: scikit-learn's error, and a featx one for the CLI's one-line report."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) without exp's overflow warning for large negative logits."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


_ROWS_AT_A_TIME = 1024  # a slice of 1,024 x 1,280 is 10 MB in float64


def _column_mean_std(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 (d,) mean and standard deviation of each column, a slice of rows at a time (two passes:
    the deviations are summed around the mean, as numpy's std does, not as squares less the square)."""
    total = np.zeros(X.shape[1])
    for start in range(0, len(X), _ROWS_AT_A_TIME):
        total += X[start:start + _ROWS_AT_A_TIME].sum(axis=0, dtype=np.float64)
    mean = total / len(X)
    squares = np.zeros(X.shape[1])
    for start in range(0, len(X), _ROWS_AT_A_TIME):
        deviation = X[start:start + _ROWS_AT_A_TIME] - mean
        squares += np.einsum("ij,ij->j", deviation, deviation)
    return mean, np.sqrt(squares / len(X))


# A new image is "unlike the training images" when its cosine to the nearest class mean is below what this
# share of the training images reach, each scored against its own class's mean without itself (as an
# image the head has not seen would be): 1% of images like the training ones are then marked.
TYPICAL_SHARE = 0.99


def _members(y_idx: np.ndarray, rows: slice, n_classes: int) -> np.ndarray:
    """float32 (m, n_classes) 0/1: which classes each row of ``rows`` belongs to (several, multi-label)."""
    part = y_idx[rows]
    if part.ndim == 2:
        return np.asarray(part, dtype=np.float32)
    members = np.zeros((len(part), n_classes), dtype=np.float32)
    members[np.arange(len(part)), part] = 1.0
    return members


def class_means_and_typical_cosine(X: np.ndarray, y_idx: np.ndarray,
                                   n_classes: int) -> tuple[np.ndarray, float | None]:
    """float64 (n_classes, d) unit means of each class's unit-length rows, and the cosine to the nearest
    class mean that ``TYPICAL_SHARE`` of the rows reach, each row left out of its own class's mean (None
    where no row has a class of two or more). ``y_idx``: class indices, or a 0/1 (n, n_classes) matrix.
    A slice of rows at a time: X is not copied."""
    sums, counts = np.zeros((n_classes, X.shape[1])), np.zeros(n_classes)
    for start in range(0, len(X), _ROWS_AT_A_TIME):
        rows = slice(start, start + _ROWS_AT_A_TIME)
        members = _members(y_idx, rows, n_classes)
        sums += members.T @ unit_rows(X[rows])
        counts += members.sum(axis=0)
    sums = sums.astype(np.float32)
    sum_norms = np.linalg.norm(sums.astype(np.float64), axis=1)
    best = np.empty(len(X))
    for start in range(0, len(X), _ROWS_AT_A_TIME):
        rows = slice(start, start + _ROWS_AT_A_TIME)
        unit = unit_rows(X[rows])
        dots = (unit @ sums.T).astype(np.float64)  # (m, n_classes): each row's dot product with each class's sum
        self_dot = np.einsum("ij,ij->i", unit, unit)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            others = dots / sum_norms
            # its own class's sum less itself: (u.s - u.u) / |s - u|
            left_out = (dots - self_dot) / np.sqrt(np.maximum(sum_norms ** 2 - 2 * dots + self_dot, 0))
        own = _members(y_idx, rows, n_classes) > 0
        cosines = np.where(own, np.where(counts > 1, left_out, -np.inf), others)
        best[rows] = np.nan_to_num(cosines, nan=-np.inf).max(axis=1)
    scored = best[np.isfinite(best)]
    means = sums / np.where(sum_norms > 0, sum_norms, 1.0)[:, None]
    return means, float(np.quantile(scored, 1 - TYPICAL_SHARE)) if len(scored) else None


def lbfgs_blas_single_threaded():
    """A context in which scipy's own OpenBLAS (pip's wheels ship one beside numpy's) runs one thread.

    scipy 1.15's L-BFGS-B (logistic regression's solver) calls BLAS on vectors of the coefficients'
    size; threaded, each call costs milliseconds for microseconds of work (scipy/scipy#22438, #23191;
    OpenMathLib/OpenBLAS#5383). On this 2-core machine it held a digits fit at 1.3 s instead of 0.3 s,
    and a 100,000 x 1,280 fit at 4.5 s instead of 2.3 s. numpy's BLAS, which does the fit's matrix
    products, keeps its threads. Where scipy shares numpy's BLAS (conda, MKL) nothing is changed.
    """
    import importlib
    from contextlib import nullcontext

    from threadpoolctl import ThreadpoolController

    importlib.import_module("scipy.optimize")  # loads scipy's BLAS, so that it is listed below
    controller = ThreadpoolController()
    own = [c.filepath for c in controller.lib_controllers
           if c.user_api == "blas" and Path(c.filepath).parent.name == "scipy.libs"]
    return controller.select(filepath=own).limit(limits=1) if own else nullcontext()


class _Head(ClassifierMixin, BaseEstimator):
    """Shared prediction: ``layers_`` is [(W, b), ...] applied to standardised inputs, ReLU between."""

    def _prepare_fit(self, X, y, *, multilabel: bool = False, dtype=None,
                     overwrite_X: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Validate, learn classes_ and the standardisation; returns standardised X and class indices
        (or, multi-label, the (n, n_labels) indicator matrix as float32).

        float32 embeddings stay float32, standardised into one new array (in ``dtype`` if given), or
        into X itself with ``overwrite_X`` (a copy the caller is done with: train-head's training
        rows). The column means and deviations are summed in float64 a slice at a time, so no
        temporary the size of X is made: in float64, and copied again to standardise, a cache's
        embeddings took six times their size more while fitting (``python benchmarks/head_memory.py``,
        100,000 x 1,280)."""
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], multi_output=multilabel)
        check_classification_targets(y)
        self.multilabel_ = multilabel
        if multilabel:
            self.classes_, y_idx = np.arange(y.shape[1]), np.asarray(y, dtype=np.float32)
        else:
            self.classes_, y_idx = np.unique(y, return_inverse=True)
        # before X is standardised (in place, with overwrite_X): the means are of the embeddings as they come
        self.class_means_, self.typical_cosine_ = class_means_and_typical_cosine(X, y_idx, len(self.classes_))
        self.mean_, scale = _column_mean_std(X)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        dtype = np.dtype(dtype or X.dtype)  # float64 where the fit would copy it so anyway
        in_place = overwrite_X and X.dtype == dtype and X.flags.writeable and X.flags.c_contiguous
        Xs = X if in_place else np.empty(X.shape, dtype)
        mean, scale = self.mean_.astype(dtype), self.scale_.astype(dtype)
        for start in range(0, len(X), _ROWS_AT_A_TIME):
            rows = slice(start, start + _ROWS_AT_A_TIME)
            np.subtract(X[rows], mean, out=Xs[rows])
            Xs[rows] /= scale
        if len(self.classes_) == 1:  # one class seen: always predict it (one logit, probability 1)
            self.layers_ = [(np.zeros((1, Xs.shape[1])), np.zeros(1))]
        return Xs, y_idx

    def decision_function(self, X) -> np.ndarray:
        """float (n, n_classes) logits; for two classes, as scikit-learn has it, (n,) scores of ``classes_[1]``."""
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def _logits(self, X) -> np.ndarray:
        try:
            check_is_fitted(self)
        except Exception as e:
            raise NotFittedError(str(e)) from None
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        logits = np.empty((len(X), self.layers_[-1][0].shape[0]))
        for start in range(0, len(X), 8192):  # in float64 a slice at a time: a whole cache would double in size
            h = (X[start:start + 8192] - self.mean_) / self.scale_
            for i, (W, b) in enumerate(self.layers_):
                h = h @ W.T + b
                if i < len(self.layers_) - 1:
                    h = np.maximum(h, 0)
            logits[start:start + 8192] = h
        return logits

    def class_mean_cosine(self, X) -> np.ndarray:
        """float (n,): each row's cosine to the nearest class mean of the training embeddings (rows and
        means at unit length), how like some class's training images it is. A head's probabilities do not
        say so: a photo given to a head of handwritten digits is one digit at 100%."""
        try:
            check_is_fitted(self, "class_means_")
        except Exception:
            raise NotFittedError("this head keeps no class means (saved before featx kept them): train it again "
                                 "to have images unlike its training images marked") from None
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return np.concatenate([(unit_rows(X[start:start + 8192]) @ self.class_means_.T).max(axis=1)
                               for start in range(0, len(X), 8192)]) if len(X) else np.empty(0)

    def unlike_training(self, X) -> np.ndarray:
        """bool (n,): rows less like every class than ``TYPICAL_SHARE`` (99%) of the training images were,
        each then left out of its class's mean (``class_mean_cosine`` under ``typical_cosine_``): their
        classes are guesses, however sure the probabilities look. None marked where the head had no class
        of two images or more."""
        return self.unlike_at(self.class_mean_cosine(X))

    def unlike_at(self, cosines: np.ndarray) -> np.ndarray:
        """bool (n,): :meth:`unlike_training` of rows whose ``class_mean_cosine`` is already taken."""
        cosines = np.asarray(cosines)
        return cosines < self.typical_cosine_ if self.typical_cosine_ is not None else np.zeros(len(cosines), bool)

    def predict_proba(self, X) -> np.ndarray:
        """float (n, n_classes) probabilities, columns in the order of ``classes_``
        (multi-label: independent sigmoid probabilities, one column per label)."""
        logits = self._logits(X)
        return _sigmoid(logits) if getattr(self, "multilabel_", False) else _softmax(logits)

    def predict(self, X) -> np.ndarray:
        """Class labels; multi-label: int (n, n_labels) indicator, each label at its own threshold."""
        scores = self._logits(X)  # checks fitted before classes_ is touched
        if getattr(self, "multilabel_", False):
            return (_sigmoid(scores) >= self.thresholds_).astype(int)
        return self.classes_[np.argmax(scores, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags


class LogRegHead(_Head):
    """Standardised multinomial logistic regression.

    Args:
        C: inverse regularisation; None chooses it by ``cv``-fold cross-validation.
        cv: folds for choosing C.
        class_weight: None; "balanced": each class weighs as much in the loss as any other, however
            many images it has (and C's held-out log loss weighs each class the same); or a dict class -> weight.
    """

    Cs = tuple(np.logspace(-4, 2, 7))  # the values C is chosen from: 1e-4 to 100

    def __init__(self, C: float | None = None, cv: int = 5, max_iter: int = 2000, random_state: int | None = 0,
                 class_weight: str | None = None):
        self.C = C
        self.cv = cv
        self.max_iter = max_iter
        self.random_state = random_state
        self.class_weight = class_weight

    def fit(self, X, y, groups=None, *, overwrite_X: bool = False) -> LogRegHead:
        """``groups``: int per row, shared by near copies (:func:`featx.store.near_copy_groups`): C is then
        chosen with each group in one fold, so a copy's twin does not vouch for a weak regularisation.
        ``overwrite_X``: X may be standardised in place (a float32 copy the caller has no more use for)."""
        Xs, y_idx = self._prepare_fit(X, y, overwrite_X=overwrite_X)
        if len(self.classes_) == 1:
            self.C_, self.n_iter_, self.cv_folds_ = self.C, 1, 0
            return self
        with lbfgs_blas_single_threaded():
            return self._fit_standardised(Xs, y_idx, groups)

    def _fit_standardised(self, Xs: np.ndarray, y_idx: np.ndarray, groups) -> LogRegHead:
        from sklearn.linear_model import LogisticRegression

        # pictures per class: a picture's near copies share a fold, so they count once
        counts = np.bincount(y_idx[one_per_group(groups, len(y_idx))], minlength=len(self.classes_))
        start = None
        # the folds the C search ran (0: none), as a class of 3 pictures takes 3 folds whatever cv says
        self.cv_folds_ = int(min(self.cv, counts.min())) if self.C is None and counts.min() >= 2 else 0
        if self.cv_folds_:
            self.C_, start = self._choose_C(Xs, y_idx, groups, folds=self.cv_folds_)
        else:
            if self.C is None:
                _logger.info("C 1: class '%s' has %s, which no fold could both hold out and train on",
                             self.classes_[counts.argmin()], "a single picture" if counts.min() else
                             "only near copies of pictures in other classes")
            self.C_ = 1.0 if self.C is None else float(self.C)
        model = LogisticRegression(C=self.C_, max_iter=self.max_iter, class_weight=self.class_weight,
                                   random_state=self.random_state, warm_start=start is not None)
        if start is not None:  # the folds' mean at the chosen C, as LogisticRegressionCV refits
            model.coef_, model.intercept_ = start
        model.fit(Xs, y_idx)
        self.n_iter_ = int(np.max(model.n_iter_))
        coef, intercept = model.coef_.astype(np.float64), model.intercept_.astype(np.float64)
        if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        self.layers_ = [(coef, intercept)]
        return self

    def _choose_C(self, Xs: np.ndarray, y_idx: np.ndarray, groups, *, folds: int):
        """C from ``Cs`` with the lowest mean held-out log loss over stratified folds, and the folds'
        mean (coef, intercept) there, to start the final fit from. Sets ``cv_log_loss_`` and
        ``cv_scores_`` (accuracy, or balanced accuracy): float (len(Cs), folds), each fold's at each C.

        Log loss, not accuracy (scikit-learn's LogisticRegressionCV moves to it in 1.11): accuracy
        counts only which side of 50 % a prediction falls, so on classes the embeddings separate every
        C ties and the smallest won: a head that called held-out noughts and ones right at 61 % on
        average, where the C of the lowest log loss says 99 %, as accurately. The probabilities are
        what predict prints, what evaluate ranks mistakes by, and what a user thresholds on.

        What LogisticRegressionCV does, in a fifth of its memory on a cache's float32 rows (``python
        benchmarks/head_memory.py``): scikit-learn copies them into float64 and copies each fold's
        training rows again. Here every fit runs on the one standardised matrix, a fold's held-out
        rows weighing 0 (the same optimum as leaving them out: the loss is a weighted mean and the
        penalty is scaled by the weights' sum), warm-started from the fold's fit at the C before, as
        scikit-learn's path is. One line a C is logged: on a large cache this is the slow part.
        """
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss
        from sklearn.utils.class_weight import compute_sample_weight

        # shuffled (seeded): the held-out split it stands for is drawn at random, and a folder's files in
        # order are not (the demo's digits in order: 0.911 ± 0.045 at C 0.1; shuffled: 0.939 ± 0.019)
        splits = stratified_folds(y_idx, folds, groups=groups, shuffle=True, seed=self.random_state)
        balanced = self.class_weight == "balanced"
        score, scoring = (balanced_accuracy_score, "balanced accuracy") if balanced else (accuracy_score, "accuracy")
        fold_models = [LogisticRegression(max_iter=self.max_iter, random_state=self.random_state, warm_start=True)
                       for _ in splits]
        weights = []  # a fold's rows weigh their class's weight in the fold itself; its held-out rows 0
        # balanced: each class's held-out images weigh as much in the log loss as another's, as in the fit
        held_out_weights = []
        for train, test in splits:
            weights.append(np.zeros(len(y_idx)))
            weights[-1][train] = compute_sample_weight(self.class_weight, y_idx[train])
            held_out_weights.append(compute_sample_weight("balanced", y_idx[test]) if balanced else None)
        labels = np.arange(len(self.classes_))
        best = (np.inf, None, None)
        self.cv_scores_ = np.zeros((len(self.Cs), len(splits)))
        self.cv_log_loss_ = np.zeros_like(self.cv_scores_)
        for C, scores, losses in zip(self.Cs, self.cv_scores_, self.cv_log_loss_):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)  # said once in the C's line, not per fold
                for i, (model, (_, test), weight, held_out_weight) in enumerate(
                        zip(fold_models, splits, weights, held_out_weights)):
                    model.set_params(C=C).fit(Xs, y_idx, sample_weight=weight)
                    probs = apply_to_rows(model.predict_proba, Xs, test)
                    scores[i] = score(y_idx[test], probs.argmax(axis=1))
                    losses[i] = log_loss(y_idx[test], probs, labels=labels, sample_weight=held_out_weight)
            unconverged = ""
            for w in caught:
                if issubclass(w.category, ConvergenceWarning):
                    unconverged = f" (not converged in {self.max_iter} iterations)"
                else:  # only scikit-learn's convergence notices are folded into the line
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            _logger.info("C %g: log loss %.4f ± %.4f, %s %.4f ± %.4f over %d folds%s", C, np.mean(losses),
                         np.std(losses), scoring, np.mean(scores), np.std(scores), folds, unconverged)
            if np.mean(losses) < best[0]:
                best = (np.mean(losses), C, (np.mean([m.coef_ for m in fold_models], axis=0),
                                             np.mean([m.intercept_ for m in fold_models], axis=0)))
        _logger.info("C %g chosen (the lowest held-out log loss)", best[1])
        return float(best[1]), best[2]


def apply_to_rows(predict, X: np.ndarray, rows) -> np.ndarray:
    """``predict(X[rows])`` a slice of rows at a time, without a copy of X[rows] (a cache's rows, 5 GB
    a million)."""
    rows = np.asarray(rows, dtype=np.intp)
    if len(rows) == 0:
        return predict(X[rows])
    return np.concatenate([predict(X[rows[i:i + _ROWS_AT_A_TIME]]) for i in range(0, len(rows), _ROWS_AT_A_TIME)])


MLP_EPOCH_LINE_SECONDS = 5.0  # an MLP's fit says how it goes at most this often (a fit of seconds says nothing)


class MLPHead(_Head):
    """Standardise, then Dense(hidden)-ReLU-Dropout blocks and a softmax layer, trained in torch.

    AdamW with early stopping on a stratified validation split: the weights of the epoch with the
    lowest validation loss are kept. Runs on CUDA when available. ``class_weight`` as scikit-learn's:
    "balanced" weighs each class (multi-label: each label's positives against its negatives) equally
    in the loss, a dict gives a weight per class.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (1024,),
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 200,
        batch_size: int = 256,
        validation_fraction: float = 0.1,
        patience: int = 10,
        random_state: int | None = 0,
        device: str = "auto",
        class_weight: str | None = None,
    ):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state
        self.device = device
        self.class_weight = class_weight

    def fit(self, X, y, groups=None, *, overwrite_X: bool = False) -> MLPHead:
        """``y``: class labels, or a (n, n_labels) 0/1 matrix for multi-label (sigmoid outputs, BCE loss,
        a threshold per label chosen for the best F1 on the validation split). ``groups``: int per row,
        shared by near copies (:func:`featx.store.near_copy_groups`), kept on one side of that split.
        ``overwrite_X``: X may be standardised in place (a float32 copy the caller has no more use for)."""
        import torch

        from sklearn.utils.multiclass import type_of_target

        multilabel = type_of_target(y) == "multilabel-indicator"
        Xs, y_idx = self._prepare_fit(X, y, multilabel=multilabel, overwrite_X=overwrite_X)
        Xs = Xs.astype(np.float32, copy=False)
        if len(self.classes_) == 1:
            return self
        device = "cuda" if self.device == "auto" and torch.cuda.is_available() else (
            "cpu" if self.device == "auto" else self.device)
        train, val = self._split(y_idx, groups)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if self.random_state is None else self.random_state)
            net = self._network(Xs.shape[1], len(self.classes_)).to(device)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            weight = None if self.class_weight is None else torch.from_numpy(
                self._loss_weights(y_idx[train], multilabel)).to(device)
            loss_fn = (torch.nn.BCEWithLogitsLoss(pos_weight=weight) if multilabel
                       else torch.nn.CrossEntropyLoss(weight=weight))
            yt = torch.from_numpy(y_idx if multilabel else y_idx.astype(np.int64)).to(device)
            Xt = torch.from_numpy(Xs).to(device)
            best, best_state, waited = np.inf, None, 0
            self.history_ = []
            said = time.perf_counter()
            for epoch in range(self.max_epochs):
                net.train()
                order = train[torch.randperm(len(train)).numpy()]
                for start in range(0, len(order), self.batch_size):
                    idx = torch.from_numpy(order[start:start + self.batch_size]).to(device)
                    opt.zero_grad()
                    loss_fn(net(Xt[idx]), yt[idx]).backward()
                    opt.step()
                net.eval()
                with torch.no_grad():
                    watch = val if len(val) else train
                    v = float(loss_fn(net(Xt[watch]), yt[watch]))
                self.history_.append(v)
                if v < best - 1e-6:
                    best, waited, self.best_epoch_ = v, 0, epoch + 1
                    best_state = {k: t.detach().cpu().clone() for k, t in net.state_dict().items()}
                else:
                    waited += 1
                    if waited >= self.patience:
                        break
                if time.perf_counter() - said >= MLP_EPOCH_LINE_SECONDS:  # a large cache: minutes, not silent
                    said = time.perf_counter()
                    _logger.info("epoch %d: validation loss %.4f, the lowest %.4f (epoch %d); stops after %d "
                                 "epochs without a lower one, or at %d", epoch + 1, v, best, self.best_epoch_,
                                 self.patience, self.max_epochs)
            net.load_state_dict(best_state)
            if multilabel:  # on Xs: X itself may be standardised already (overwrite_X), predict_proba would again
                watch = val if len(val) else train
                with torch.no_grad():
                    scores = net(Xt[watch]).double().cpu().numpy()
                self.thresholds_ = best_thresholds(y_idx[watch], _sigmoid(scores))
        self.n_epochs_ = len(self.history_)
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        self.layers_ = [(m.weight.detach().cpu().double().numpy(), m.bias.detach().cpu().double().numpy())
                        for m in linears]
        return self

    def _loss_weights(self, y: np.ndarray, multilabel: bool) -> np.ndarray:
        """float32 weights for the loss from ``class_weight``: as scikit-learn computes them (a dict of
        class -> weight, or "balanced": n / (n_classes * count)); multi-label, "balanced" only: each
        label's negatives / positives (BCE's pos_weight)."""
        from sklearn.utils.class_weight import compute_class_weight

        if multilabel:
            if self.class_weight != "balanced":
                raise ValueError(f"multi-label heads take class_weight='balanced' or None, not {self.class_weight!r}")
            positives = y.sum(axis=0)
            return ((len(y) - positives) / np.maximum(positives, 1)).astype(np.float32)
        return compute_class_weight(self.class_weight, classes=self.classes_, y=self.classes_[y]).astype(np.float32)

    def _network(self, d_in: int, n_out: int):
        import torch

        layers, width = [], d_in
        for h in self.hidden:
            layers += [torch.nn.Linear(width, int(h)), torch.nn.ReLU(), torch.nn.Dropout(self.dropout)]
            width = int(h)
        layers.append(torch.nn.Linear(width, n_out))
        return torch.nn.Sequential(*layers)

    def _split(self, y_idx: np.ndarray, groups=None) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.model_selection import train_test_split

        everything = np.arange(len(y_idx))
        units = one_per_group(groups, len(y_idx))
        n_val = int(round(len(units) * self.validation_fraction))
        if y_idx.ndim == 2:  # multi-label: a seeded random split (no stratification over label sets)
            if n_val < 2:
                return everything, np.array([], dtype=int)
            train, val = train_test_split(units, test_size=n_val, random_state=self.random_state)
        else:
            if n_val < int(y_idx.max()) + 1 or np.bincount(y_idx[units]).min() < 2:
                return everything, np.array([], dtype=int)  # too small to hold out: train on all, watch train loss
            train, val = train_test_split(units, test_size=n_val, stratify=y_idx[units],
                                          random_state=self.random_state)
        if groups is not None:
            train, val = _with_near_copies(groups, train), _with_near_copies(groups, val)
        return train, val


def best_thresholds(truth: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per label, the threshold on the grid 0.05..0.95 with the best F1 (0.5 where the label never occurs)."""
    grid = np.linspace(0.05, 0.95, 19)
    out = np.full(truth.shape[1], 0.5)
    for j in range(truth.shape[1]):
        t = truth[:, j] > 0.5
        if not t.any():
            continue
        pred = probs[:, j][:, None] >= grid[None, :]
        tp = (pred & t[:, None]).sum(0)
        f1 = 2 * tp / np.maximum(pred.sum(0) + t.sum(), 1)
        out[j] = grid[int(np.argmax(f1))]
    return out


# ---------------------------------------------------------------------------------------- save / load


def save_head(head: _Head, path: str | os.PathLike, *, fingerprint: str, backbone: str, model: str,
              model_file: str | None = None, cache: str | None = None,
              trained_on: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """Write a fitted head as .safetensors: arrays plus a JSON header; no pickle. ``model_file``: the
    .onnx that made the embeddings, where predict and export-classifier look first without --model.
    ``cache``: the cache it was trained from, where evaluate_head looks for images the head has seen.
    ``trained_on``: (SHA-256 digests as the cache keeps them, uint64 perceptual hashes) of the images it
    was fit and scored on, kept in the file (8 bytes of each digest, 16 bytes an image) so that evaluate
    leaves them out of a test folder once the cache is gone or elsewhere."""
    check_is_fitted(head)
    tensors = {"mean": head.mean_, "scale": head.scale_}
    if trained_on is not None:
        digests, phashes = trained_on
        tensors["trained_digests"] = digest_prefixes(digests)
        tensors["trained_phashes"] = np.unique(np.asarray(phashes, dtype=np.uint64)[np.asarray(phashes) != 0])
    for i, (W, b) in enumerate(head.layers_):
        tensors[f"layer{i}.weight"], tensors[f"layer{i}.bias"] = W, b
    if getattr(head, "multilabel_", False):
        tensors["thresholds"] = head.thresholds_
    if getattr(head, "class_means_", None) is not None:
        tensors["class_means"] = head.class_means_
    header = {
        "multilabel": bool(getattr(head, "multilabel_", False)),
        "format": HEAD_FORMAT,
        "kind": type(head).__name__,
        "params": json.loads(json.dumps(head.get_params(), default=list)),
        "classes": [c.item() if hasattr(c, "item") else c for c in head.classes_],
        "fitted": _fitted_choices(head),
        "fingerprint": fingerprint,
        "backbone": backbone,
        "model": model,
        "model_file": model_file,
        "cache": cache,
        "typical_cosine": getattr(head, "typical_cosine_", None),
    }
    if header["multilabel"]:
        header["thresholds_from"] = THRESHOLDS_FROM
    arrays = {k: np.ascontiguousarray(v, dtype=np.uint64 if v.dtype == np.uint64 else np.float64)
              for k, v in tensors.items()}
    return save_safetensors(arrays, path, header)


_FITTED = ("C_", "cv_folds_", "n_epochs_", "best_epoch_")  # what a fit chose that its parameters do not say


def _fitted_choices(head: _Head) -> dict:
    """Logistic regression's C (chosen by cross-validation unless given); the MLP's epochs trained and the
    epoch whose weights it kept: the attributes of ``_FITTED`` the head has."""
    return {name: getattr(head, name).item() if hasattr(getattr(head, name), "item") else getattr(head, name)
            for name in _FITTED if getattr(head, name, None) is not None}


def digest_prefixes(digests) -> np.ndarray:
    """uint64: the first 8 bytes of each known SHA-256 (hex, str or bytes; empty where unknown), unique:
    what a head file keeps of its training images' bytes (two photos share them once in 2^64)."""
    return np.array(sorted({p for p in digest_prefix_of_each(digests) if p is not None}), dtype=np.uint64)


def digest_prefix_of_each(digests) -> list[int | None]:
    """The first 8 bytes of each SHA-256 (hex, str or bytes) as an int, None where it is not known."""
    return [int(d[:16], 16) if d else None for d in digests]


@dataclass
class LoadedHead:
    head: _Head
    fingerprint: str
    backbone: str
    model: str
    model_file: str | None = None  # the .onnx that made the embeddings (heads since its recording)
    cache: str | None = None  # the cache it was trained from (heads since its recording)
    # what it was fit and scored on (heads since their recording): digest_prefixes of the images' bytes,
    # and their perceptual hashes; evaluate leaves those images out when the cache is not there
    trained_digests: np.ndarray | None = field(default=None, compare=False, repr=False)
    trained_phashes: np.ndarray | None = field(default=None, compare=False, repr=False)
    weights_checked: bool = field(default=False, compare=False)  # its arrays matched their recorded digest

    def summary(self) -> str:
        """One line: kind, classes, what its fit chose, and the embeddings it was trained on."""
        kind = "multi-label " if getattr(self.head, "multilabel_", False) else ""
        classes = self.head.classes_
        return (f"{kind}{type(self.head).__name__} for {len(classes)} classes ({', '.join(str(c) for c in classes)}), "
                f"{self._fit_said()}on {self.model} embeddings (fingerprint {self.fingerprint})"
                + (f", trained from {self.cache}" if self.cache else "")
                + (f", knows the {len(self.trained_digests):,} images it was trained and scored on (evaluate "
                   "leaves them out)" if self.trained_digests is not None else "")
                + (f", marks images unlike its training images (cosine to the nearest class mean under "
                   f"{self.head.typical_cosine_:.3f})" if getattr(self.head, "typical_cosine_", None) is not None
                   else ""))

    def _fit_said(self) -> str:
        head = self.head
        if isinstance(head, LogRegHead):
            if head.C is not None:
                return f"C {head.C:g}, "
            chosen = getattr(head, "C_", None)  # heads since its recording
            folds = getattr(head, "cv_folds_", head.cv)  # heads before its recording searched with head.cv
            if chosen is None:
                return ""
            if not folds:
                return f"C {chosen:g} (not cross-validated: a class had a single picture), "
            return f"C {chosen:g} (chosen by {folds}-fold cross-validation), "
        said = f"hidden {','.join(str(h) for h in head.hidden) or 'none'}, dropout {head.dropout:g}"
        if getattr(head, "best_epoch_", None):
            said += f", weights of epoch {head.best_epoch_} of {head.n_epochs_}"
        return said + ", "

    def check_model(self, fingerprint: str, where: str) -> None:
        if fingerprint != self.fingerprint:
            raise HeadMismatchError(
                f"head was trained on embeddings of {self.backbone} with fingerprint {self.fingerprint}; "
                f"{where} has fingerprint {fingerprint}: embed with the same model, or train a new head"
            )


def load_head(path: str | os.PathLike) -> LoadedHead:
    """Read a head written by :func:`save_head`. Refuses files that are not featx heads."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FeatxError(f"head file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        from .runtime import file_kind

        kind = {"cache": "an embedding cache, not a head (train-head CACHE -o HEAD makes one)",
                "onnx": "a model, not a head: give it as --model"}.get(file_kind(path))
        if kind:
            raise FeatxError(f"{path} is {kind}") from None
        raise FeatxError(f"{path}: not a readable head file ({first_line(e)})") from None
    try:
        header = json.loads(meta.get("featx", "{}"))
    except ValueError as e:
        raise FeatxError(f"{path}: not a usable head file (its featx header is not JSON: {first_line(e)})") from None
    if not isinstance(header, dict):
        header = {}
    if header.get("format") != HEAD_FORMAT:
        from .finetune import export_command

        command = export_command(path)
        if command:
            raise FeatxError(f"{path} is a fine-tuning checkpoint, not a head: {command} makes a model of it, "
                             "given as --model")
        raise FeatxError(f"{path}: not a featx head (format {header.get('format')!r}, expected {HEAD_FORMAT!r})")
    recorded = header.get("tensors_sha256")  # None in a head from featx before 2026-12-07
    if recorded is not None and recorded != tensors_sha256(sorted(arrays.items())):
        raise FeatxError(f"{path}: its arrays are not those featx wrote (their SHA-256 differs: damaged on disk or in "
                         "a copy); train the head again")
    problem = _head_file_problem(header, arrays)
    if problem:
        raise FeatxError(f"{path}: not a usable head file ({problem}); train the head again")
    cls = _HEAD_KINDS[header["kind"]]
    params = header["params"]
    if "hidden" in params:
        params["hidden"] = tuple(params["hidden"])
    head = cls(**params)
    head.classes_ = np.array(header["classes"])
    head.mean_, head.scale_ = arrays["mean"], arrays["scale"]
    n_layers = _count_layers(arrays)
    head.layers_ = [(arrays[f"layer{i}.weight"], arrays[f"layer{i}.bias"]) for i in range(n_layers)]
    head.n_features_in_ = len(head.mean_)
    head.multilabel_ = bool(header.get("multilabel", False))
    if head.multilabel_:
        head.thresholds_ = arrays["thresholds"]
        if header.get("thresholds_from") != THRESHOLDS_FROM:
            _logger.warning("%s: a multi-label head saved before featx chose its label thresholds on the "
                            "network's own scores (these are %s): it names nearly every label; train it again",
                            path, ", ".join(f"{t:.2f}" for t in head.thresholds_[:8]))
    if "class_means" in arrays:  # heads since 2026-12-06: images unlike their training images are marked
        head.class_means_ = arrays["class_means"]
        typical = header.get("typical_cosine")
        head.typical_cosine_ = float(typical) if isinstance(typical, (int, float)) else None
    for name, value in (header.get("fitted") or {}).items():
        if name in _FITTED and isinstance(value, (int, float)):  # a file's header is not trusted to hold more
            setattr(head, name, value)
    return LoadedHead(head, header["fingerprint"], header["backbone"], header["model"], header.get("model_file"),
                      header.get("cache"), arrays.get("trained_digests"), arrays.get("trained_phashes"),
                      weights_checked=recorded is not None)


_HEAD_KINDS = {"LogRegHead": LogRegHead, "MLPHead": MLPHead}  # a head file's "kind" -> its class


def _count_layers(arrays: dict) -> int:
    """How many ``layer{i}.weight`` arrays a head file holds."""
    return sum(1 for k in arrays if re.fullmatch(r"layer\d+\.weight", k))


def _head_file_problem(header: dict, arrays: dict[str, np.ndarray]) -> str | None:
    """What makes a head file's header and arrays unusable (a file written or edited by something else,
    cut, or of another featx), said as expected vs found; None when they fit together. Without this, a
    layer of the wrong width failed on the first prediction with numpy's matmul error, an unknown kind
    with a KeyError."""
    if header.get("kind") not in _HEAD_KINDS:
        return f"kind {header.get('kind')!r}, expected one of {', '.join(_HEAD_KINDS)}"
    missing = [k for k in ("params", "classes", "fingerprint", "backbone", "model") if k not in header]
    if missing:
        return f"its header has no {', '.join(missing)}"
    params, known = header["params"], _HEAD_KINDS[header["kind"]]().get_params()
    if not isinstance(params, dict) or set(params) - set(known):
        return f"parameters {sorted(set(params) - set(known)) if isinstance(params, dict) else params!r} that " \
               f"{header['kind']} does not take"
    n_classes = len(header["classes"]) if isinstance(header["classes"], list) else 0
    if n_classes == 0:
        return "no classes"
    n_layers = _count_layers(arrays)
    needed = ["mean", "scale"] + [f"layer{i}.{part}" for i in range(n_layers) for part in ("weight", "bias")]
    if header.get("multilabel"):
        needed.append("thresholds")
    absent = [k for k in needed if k not in arrays] or ([] if n_layers else ["layer0.weight"])
    if absent:
        return f"no array {', '.join(absent)}"
    if arrays["mean"].ndim != 1:
        return f"mean of shape {arrays['mean'].shape}, expected one value for each embedding dimension"
    width = arrays["mean"].shape[0]
    expected = {"mean": (width,), "scale": (width,), "thresholds": (n_classes,)}
    inputs = width
    for i in range(n_layers):
        W = arrays[f"layer{i}.weight"]
        outputs = n_classes if i == n_layers - 1 else (W.shape[0] if W.ndim == 2 else -1)
        expected[f"layer{i}.weight"], expected[f"layer{i}.bias"] = (outputs, inputs), (outputs,)
        inputs = outputs
    expected["class_means"] = (n_classes, width)
    for name, shape in expected.items():
        if name in arrays and arrays[name].shape != shape:
            return f"{name} of shape {arrays[name].shape}, expected {shape} for {n_classes} classes"
    for name in needed:
        if not np.isfinite(arrays[name]).all():
            return f"{name} holds values that are not finite numbers"
    return None


def head_model_file(loaded: LoadedHead, model: str | os.PathLike | None = None, weights: str | None = None) -> Path:
    """The model file a head runs on: ``model`` as given; else the one its embeddings came from (the
    path recorded in the head, or the models folder's file of its group name, with its fingerprint),
    so a head trained on ResNet-50 embeddings needs no --model; else the default backbone."""
    from .export import ensure_model_file, is_model_file, model_path
    from .runtime import model_file_for

    if model is None and weights is None:
        model = model_file_for(loaded.model, loaded.fingerprint, loaded.model_file)
    elif model is not None and not is_model_file(model) and not model_path(str(model), weights=weights).exists():
        _check_architecture(loaded, str(model))  # before a download and an export its fingerprint would refuse
    return ensure_model_file(model or DEFAULT_BACKBONE, weights=weights)


def _check_architecture(loaded: LoadedHead, name: str) -> None:
    """Refuse backbone ``name`` for ``loaded`` when its embeddings cannot be the head's: not as wide as the
    head's inputs, or of other layers than the backbone the head was trained on. Told from the
    architectures alone (built without weights, in seconds), not after a download and an export.
    Architectures with the same layers (torchvision's and timm's ResNet-50) are left to the fingerprint."""
    from .backbones import load_backbone

    candidate = load_backbone(name, weights="none")
    width, wanted = candidate.embed_dim, loaded.head.n_features_in_
    advice = "leave --model out (the head's own model is the default), or train a head on its embeddings"
    if width != wanted:
        raise HeadMismatchError(f"head was trained on {wanted}-d embeddings of {loaded.backbone} (fingerprint "
                                f"{loaded.fingerprint}); {name} gives {width}-d embeddings: {advice}")
    try:
        trained_on = load_backbone(loaded.backbone, weights="none")
    except FeatxError:  # registered only where the head was trained, say: its fingerprint decides
        return

    def layers(backbone) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in backbone.features.state_dict().values()]

    if layers(candidate) != layers(trained_on):
        raise HeadMismatchError(f"head was trained on embeddings of {loaded.backbone} (fingerprint "
                                f"{loaded.fingerprint}); {name} is another architecture: {advice}")


# ---------------------------------------------------------------------------------------- training


_HEAD_OPTIONS = {  # (head, multi-label) -> the options that head takes, besides --test-size and --seed
    ("logreg", False): ("cv", "C"),
    ("mlp", False): ("cv", "hidden", "dropout", "epochs"),
    ("logreg", True): ("epochs",),  # trained in torch as an MLP without a hidden layer, on one split
    ("mlp", True): ("hidden", "dropout", "epochs"),
}


def check_head_options(head: str, *, multilabel: bool, **given) -> None:
    """Refuse options (None: not given) that ``head`` does not take: `--head mlp --C 0.5` trained an MLP
    and left C unused, `--labels tags.csv --cv 5` scored one split, without a word."""
    if head not in ("logreg", "mlp"):
        raise FeatxError(f"head must be logreg or mlp, got {head!r}")
    takes = _HEAD_OPTIONS[head, multilabel]
    unused = [f"--{name}" for name, value in given.items() if value is not None and name not in takes]
    if unused:
        what = {"logreg": "a logistic-regression head", "mlp": "an MLP head"}[head]
        if multilabel:
            what = "a multi-label " + what.split(" ", 1)[1] + " (--labels: one held-out split, trained in torch)"
        raise FeatxError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to {what}, which "
                         f"takes {', '.join(f'--{name}' for name in takes)}")


def make_head(kind: str, *, C=None, hidden=(1024,), dropout=0.5, epochs=200, seed=0, class_weight=None) -> _Head:
    if kind == "logreg":
        return LogRegHead(C=C, random_state=seed, class_weight=class_weight)
    if kind == "mlp":
        return MLPHead(hidden=tuple(hidden), dropout=dropout, max_epochs=epochs, random_state=seed,
                       class_weight=class_weight)
    raise ValueError(f"head must be logreg or mlp, got {kind!r}")


def stratified_split(labels: Sequence, fraction: float, seed: int, *, groups: np.ndarray | None = None,
                     held_out: str = "test", option: str = "--test-size") -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified (train, held-out) positions of ``labels``; a FeatxError saying what to change
    when the classes cannot be split: fewer than two classes, a class with one image (nothing to hold
    out), or a held-out share smaller than the number of classes (scikit-learn's errors name none of it).
    ``groups`` (int per position, :func:`featx.store.near_copy_groups`): positions of one group go to the
    same side (split as one image, of its first position's class), so no held-out image is a resized
    copy of one trained on."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels).astype(str)
    units = one_per_group(groups, len(labels))
    image = "image" if groups is None or len(units) == len(labels) else "picture (near copies counted as one)"
    names, counts = np.unique(labels[units], return_counts=True)
    absorbed = _near_copies_across_classes(labels, groups, held_out)
    if len(names) < 2:
        found = (f"one class ('{names[0]}', {counts[0]} {image.split(' ')[0]}s)" if len(names)
                 else "no labelled image")
        if absorbed:
            raise FeatxError(f"a classifier needs images of at least two classes, found {found}: every image "
                             f"of {', '.join(map(repr, absorbed))} is a near copy of one filed under another "
                             "class (the same picture in two class folders)")
        raise FeatxError(f"a classifier needs images of at least two classes, found {found}: "
                         "put each class in its own subfolder")
    single = names[counts < 2]
    if len(single):
        listed = ", ".join(f"'{n}'" for n in single[:5]) + (f" and {len(single) - 5} more" if len(single) > 5 else "")
        raise FeatxError(f"{len(single)} class(es) have a single {image}, so none can be held out for {held_out}: "
                         f"{listed}; add images or move them out of the class folders")
    _check_held_out_share(fraction, int(counts.sum()), per_side=len(names), unit=image.split(" ")[0],
                         held_out=held_out, option=option,
                         needs=f"each of the {len(names)} classes needs one there and one to train on")
    train, rest = train_test_split(units, test_size=fraction, stratify=labels[units], random_state=seed)
    if groups is None:
        return train, rest
    return _with_near_copies(groups, train), _with_near_copies(groups, rest)


def _check_held_out_share(fraction: float, n: int, *, per_side: int, unit: str, held_out: str, option: str,
                         needs: str) -> None:
    """Refuse a held-out ``fraction`` (a share, or a count from 1 on) of ``n`` images (or pictures) that
    leaves fewer than ``per_side`` on either side of the split, saying which values would do."""
    n_held = int(np.ceil(fraction * n)) if fraction < 1 else int(fraction)
    if per_side <= n_held <= n - per_side:
        return

    def fits(share: str) -> bool:
        return per_side <= int(np.ceil(float(share) * n)) <= n - per_side

    def shown(share: float, inward: int) -> str:
        """``share`` in as few decimals as still fit: rounded, or else a step or two towards the middle
        (``inward``: +1 or -1) where that moves it by a tenth at most. Of 1,003 pictures 0.1505 to 0.8495
        fit, so the upper end is 0.84 (0.85 does not fit); of 129 with 12 a side, 0.9 (up to 117/129 =
        0.90698); of 10,000 with 2 a side, 0.0002 (0.01 would hide how low it goes); of 150 with 66 a side
        0.55, as 0.56 x 150 is 84.00000000000001 in floats, which scikit-learn's split takes as 85."""
        for decimals in range(2, 8):
            scale = 10 ** decimals
            towards = (math.ceil if inward > 0 else math.floor)(share * scale)
            for value in (round(share, decimals), towards / scale, (towards + inward) / scale):
                text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
                if abs(value - share) <= 0.1 * share and fits(text):
                    return text
        return f"{share:g}"

    if n == 2 * per_side:  # one share alone does
        instead = f"use {option} 0.5, or add images"
    elif n > 2 * per_side:
        instead = (f"use {option} between {shown(per_side / n, +1)} and {shown(1 - per_side / n, -1)}, "
                   "or add images")
    else:
        instead = "add images"
    raise FeatxError(f"{option} {fraction:g} holds out {n_held} of {n} {unit}s for {held_out}, but {needs}: "
                     f"{instead}")


def _near_copies_across_classes(labels: np.ndarray, groups: np.ndarray | None, held_out: str) -> list[str]:
    """Warns of pictures whose near copies are filed under different classes (a split keeps a picture
    on one side, as the class of its first image, so the other class's copies go along); returns the
    classes left with no picture of their own."""
    if groups is None:
        return []
    _, first, group_of = np.unique(groups, return_index=True, return_inverse=True)
    group_class = labels[first][group_of.ravel()]
    elsewhere = np.flatnonzero(labels != group_class)
    if not len(elsewhere):
        return []
    n = len(np.unique(group_of.ravel()[elsewhere]))
    i = elsewhere[0]
    absorbed = np.setdiff1d(labels, labels[first]).tolist()
    _logger.warning("%d picture%s near copies filed under another class (e.g. in '%s' and '%s'): each goes to "
                    "one side of the train/%s split with all its copies, as the class of its first image%s",
                    n, " has" if n == 1 else "s have", group_class[i], labels[i], held_out,
                    f"; {', '.join(map(repr, absorbed))} {'has' if len(absorbed) == 1 else 'have'} no picture "
                    "of its own" if absorbed else "")
    return absorbed


def one_per_group(groups: np.ndarray | None, n: int) -> np.ndarray:
    """The positions a split draws from: all ``n``, or with ``groups`` the first of each group."""
    return np.arange(n) if groups is None else np.unique(groups, return_index=True)[1]


def stratified_folds(labels: Sequence, folds: int, *, groups: np.ndarray | None = None, shuffle: bool = False,
                     seed: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) positions of stratified K folds, increasing; with ``groups``, each group's positions
    in one fold. Folds are drawn on one position per group, of its first position's class, as
    :func:`stratified_split` draws its split; without groups they are scikit-learn's StratifiedKFold's.
    scikit-learn's StratifiedGroupKFold weighs the groups one by one in Python: 9 s for 100,000 rows
    (every image its own group but a few near copies), 90 s a million, before any fit."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    units = one_per_group(groups, len(labels))
    splitter = StratifiedKFold(folds, shuffle=shuffle, random_state=seed if shuffle else None)
    everything = np.arange(len(labels))
    result = []
    for _, test_units in splitter.split(np.zeros((len(units), 1)), labels[units]):
        test = units[test_units] if groups is None else _with_near_copies(groups, units[test_units])
        result.append((np.setdiff1d(everything, test, assume_unique=True), np.sort(test)))
    return result


def _with_near_copies(groups: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``positions`` (one per group) and every other position of their groups, increasing."""
    return np.flatnonzero(np.isin(groups, groups[positions]))


def near_copy_split_groups(phashes: np.ndarray, where, *, say=None) -> tuple[np.ndarray | None, int]:
    """(group per row, rows in a group of near copies) for a split that keeps each group on one side;
    (None, 0) when no row has a near copy. Says how many there are, through ``say`` (a callable taking
    the line; logged at INFO unless given)."""
    from .data import NEAR_COPY_BITS
    from .store import near_copy_counts, near_copy_groups

    groups = near_copy_groups(phashes)
    n_near, n_pictures = near_copy_counts(groups)
    if not n_near:
        return None, 0
    (say or _logger.info)(
        f"{n_near} images of {where} are near copies of another (perceptual hashes within {NEAR_COPY_BITS} of "
        f"64 bits: the same picture resized or re-encoded, or as alike), {n_pictures} "
        f"picture{'s' if n_pictures != 1 else ''} in all: each picture's copies are kept on one side of the split")
    return groups, n_near


def train_head(
    cache: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str | None = None,
    head: str = "logreg",
    test_size: float = 0.2,
    cv: int | None = None,
    C: float | None = None,
    hidden: Sequence[int] | None = None,
    dropout: float | None = None,
    epochs: int | None = None,
    seed: int = 0,
    report_png: str | os.PathLike | None = None,
    labels_csv: str | os.PathLike | None = None,
    class_weight: str | None = None,
    mistakes_csv: str | os.PathLike | None = None,
) -> HeadReport:
    """Fit a head on a cache's labelled embeddings, report on a stratified held-out split, save it.

    The report lists the held-out images it got wrong, the most confident first (files filed under the
    wrong class are among them); ``mistakes_csv`` writes them all. With ``cv``, also K-fold
    cross-validated accuracy, the mistakes are those of every image, each scored by the fold that left it
    out, and the saved head is refit on all data.
    ``class_weight="balanced"``: every class counts as much as any other in training, for folders whose
    classes have very different numbers of images (the small ones are otherwise rarely predicted).
    With ``labels_csv`` (rows ``key,label1;label2``), a multi-label head: sigmoid outputs, BCE,
    per-label thresholds; ``logreg`` is then the linear case (no hidden layer). Only keys in the
    CSV are used.
    ``C`` is logistic regression's (None: chosen by cross-validation); ``hidden`` (default 1024),
    ``dropout`` (0.5) and ``epochs`` (at most 200) the MLP's, ``epochs`` a multi-label head's too. One
    given to a head it does not apply to is refused, not left unused.
    """
    check_head_options(head, multilabel=labels_csv is not None, cv=cv, C=C, hidden=hidden, dropout=dropout,
                       epochs=epochs)
    hidden, dropout, epochs = (1024,) if hidden is None else hidden, 0.5 if dropout is None else dropout, \
        200 if epochs is None else epochs
    if labels_csv is not None and mistakes_csv is not None:
        raise FeatxError(NO_MULTILABEL_MISTAKES)
    check_report_files(output=(output, "head.safetensors"), report_png=report_png, mistakes_csv=mistakes_csv)
    if labels_csv is not None:
        return _train_multilabel(cache, output, labels_csv, model=model, head=head, test_size=test_size,
                                 hidden=hidden, dropout=dropout, epochs=epochs, seed=seed, report_png=report_png,
                                 class_weight=class_weight)
    from sklearn.base import clone

    from .store import check_finite, find_copies, gone_line, load_embeddings, take_rows_in_place

    data = load_embeddings(cache, model, labelled_only=True, present_only=True)
    check_finite(data, cache)
    if data.gone:  # the folder is what the user labels: a photo deleted from it is no longer among its images
        _logger.warning("%s", gone_line(data.gone, data.attrs.get("folder"), cache))
    if len(data.keys) == 0:
        raise FeatxError(f"{cache} has no labelled embeddings for {data.model}: put images in class subfolders")
    copies = find_copies(data.keys, data.labels, data.digests, folder=data.attrs.get("folder"))
    for line in copies.lines(str(cache), folder=data.attrs.get("folder")):
        _logger.warning("%s", line)
    y = np.array(data.class_names, dtype=object)[data.labels[copies.keep]].astype(str)
    groups, n_near = near_copy_split_groups(data.phashes[copies.keep], cache)
    try:
        train, test = stratified_split(y, test_size, seed, groups=groups)
    except FeatxError as e:
        raise FeatxError(f"{cache} ({data.model}): {e}") from None
    names, counts = np.unique(y, return_counts=True)
    smallest = int(counts.min())
    if class_weight is None and counts.max() >= 5 * smallest:
        _logger.info("classes range from %d images ('%s') to %d ('%s'): --balanced (class_weight='balanced') "
                     "keeps the small ones from being drowned out", smallest, names[counts.argmin()],
                     counts.max(), names[counts.argmax()])
    if cv and cv > smallest:  # scikit-learn would only warn, and its folds would miss classes
        raise FeatxError(f"--cv {cv} needs at least {cv} images in every class, the smallest class has {smallest}: "
                         "lower --cv or add images")
    # The cache's matrix is the largest thing in memory (5 GB a million rows): the held-out rows are
    # copied out, the training rows moved to its front in place (in row order) and standardised there.
    # With --cv the kept rows are needed as they are after the fit, so only the split is copied.
    train = np.sort(train)
    X_test, y_train, y_test = data.embeddings[copies.keep[test]], y[train], y[test]
    if cv:
        X = take_rows_in_place(data.embeddings, copies.keep)
        X_train = X[train]
    else:
        X_train = take_rows_in_place(data.embeddings, copies.keep[train])
    data.embeddings = None  # overwritten: nothing below may read it
    estimator = make_head(head, C=C, hidden=hidden, dropout=dropout, epochs=epochs, seed=seed,
                          class_weight=class_weight)
    if head == "logreg" and C is None:  # the slow part on a large cache, silent otherwise
        _logger.info("fitting %d embeddings; C is chosen by %d-fold cross-validation over %d values from %g to %g "
                     "(--C VALUE skips it)", len(y_train), estimator.cv, len(estimator.Cs), min(estimator.Cs),
                     max(estimator.Cs))
    t0 = time.perf_counter()
    estimator.fit(X_train, y_train, groups=None if groups is None else groups[train], overwrite_X=True)
    del X_train
    fit_seconds = time.perf_counter() - t0
    classes = [str(c) for c in estimator.classes_]
    keys = np.array(data.keys, dtype=object)[copies.keep]
    probs = estimator.predict_proba(X_test)
    predicted = np.array(classes, dtype=object)[probs.argmax(axis=1)].astype(str)
    report = single_label_report(head, y_test, predicted, classes, n_train=len(y_train), fit_seconds=fit_seconds,
                                  n_copies=copies.n_copies, n_near_copies=n_near,
                                  mistakes=misclassified(keys[test], y_test, predicted, probs.max(axis=1)))
    report.note_unlike(estimator.unlike_training(X_test), predicted == y_test, estimator.typical_cosine_)
    if cv:
        # every image scored by the fold that left it out: a wrongly filed image anywhere in the folder shows
        out_of_fold = np.zeros((len(y), len(classes)))
        if isinstance(estimator, LogRegHead) and estimator.C is None:
            # C chosen once, on the split above, for every fold and the final fit: a search in each would
            # take the folds + 1 times as long for a nearly equal estimate
            estimator.set_params(C=estimator.C_)
            _logger.info("C %g, chosen on the split, fits each of the %d folds and then every image", estimator.C, cv)
        for fold_train, fold_test in stratified_folds(y, cv, groups=groups, shuffle=True, seed=seed):
            fold = clone(estimator).fit(X[fold_train], y[fold_train],
                                        groups=None if groups is None else groups[fold_train], overwrite_X=True)
            out_of_fold[fold_test] = apply_to_rows(fold.predict_proba, X, fold_test)
            report.cv_accuracy.append(float(np.mean(
                np.array(classes)[out_of_fold[fold_test].argmax(axis=1)] == y[fold_test])))
        predicted = np.array(classes, dtype=object)[out_of_fold.argmax(axis=1)].astype(str)
        report.mistakes = misclassified(keys, y, predicted, out_of_fold.max(axis=1))
        report.mistakes_of = f"of all {len(y)} images, each scored by the fold that left it out"
        estimator.fit(X, y, groups=groups, overwrite_X=True)  # X is not read after this
    output = Path(output)
    save_head(estimator, output, fingerprint=data.fingerprint, backbone=str(data.attrs.get("backbone")),
              model=data.model, model_file=data.attrs.get("model_file"), cache=os.path.abspath(cache),
              trained_on=(data.digests, data.phashes))
    png = Path(report_png) if report_png else output.with_suffix(".confusion.png")
    plot_confusion(report.confusion, classes, png, title=f"{head} on {data.model}: accuracy {report.accuracy:.3f}")
    report.files = [str(output), str(png)]
    plot_mistakes(report, data.attrs.get("folder"), mistakes_png_beside(png), title=f"{head} on {data.model}")
    if mistakes_csv is not None:
        report.write_mistakes(mistakes_csv)
    return report


def read_labels_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """``key,labels`` rows (labels separated by ';'; a header row naming the key's column is skipped).

    Read as a spreadsheet saves it too: a UTF-8 byte-order mark, ';' between the columns (Excel where the
    decimal mark is a comma: the first cell is the key, the rest labels), Windows' '\\' in the keys, and
    spaces around cells. A one-hot table (a header ``key,cat,dog`` and a 0 or 1 under each label, as
    pandas' ``to_csv`` writes a label matrix) gives each key the labels of its 1s. As public datasets ship
    their label files: a header with more columns (NIH ChestX-ray14's ``Image Index,Finding Labels,Patient
    Age,…``) takes its labels from the columns named so (labels, tags, class, category, target, finding
    labels, genres, attributes); labels separated by '|' or ',' inside a cell are split as ';' are; tags
    separated by spaces (Kaggle's Planet: ``image_name,tags`` rows of ``haze primary``) are split where the
    cells are combinations of a few words (fewer than half as many words as cells, or fewer words than cells
    in a column named tags), which a class name with spaces is not; pandas' index column is left out.
    """
    import csv

    try:
        f = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise FeatxError(f"labels file {path}: {'does not exist' if isinstance(e, FileNotFoundError) else e.strerror}") \
            from None
    with f:
        # no comma in a row: ';' separates the columns, or there are no labels
        rows = [[cell.strip() for cell in (row[0].split(";") if len(row) == 1 else row)]
                for row in csv.reader(f) if row]
    if len(rows) > 1 and rows[0][0] in ("", "Unnamed: 0") and len(rows[0]) > 1 and \
            _column_name(rows[0][1]) in _KEY_COLUMNS and all(row[0].isdigit() for row in rows[1:]):
        rows = [row[1:] for row in rows if len(row) > 1]  # pandas' to_csv without index=False: 0, 1, 2 … first
    one_hot = _one_hot_header(rows)
    if one_hot:  # the labels read as "0" and "1" before, every key holding both
        return {row[0].replace("\\", "/"): [label for label, cell in zip(one_hot, row[1:])
                                            if cell.lower() in _ONE_HOT_YES] for row in rows[1:] if row[0]}
    header = rows[0] if rows and _column_name(rows[0][0]) in _KEY_COLUMNS else None
    label_columns = None  # every cell after the key's
    if header is not None and len(header) > 2:
        label_columns = [j for j, name in enumerate(header) if j and _LABEL_COLUMN.fullmatch(_column_name(name))]
        if not label_columns:  # a dataset's table of metadata: its age and view columns are not labels
            raise FeatxError(f"labels file {path}: none of its columns {', '.join(header[1:])} is named as labels "
                             f"(labels, tags, class, category …): rename the one that holds them, e.g. to 'labels'")
    cells: dict[str, list[str]] = {}
    for row in rows[1:] if header is not None else rows:
        key = row[0].replace("\\", "/")
        if key and _column_name(key) not in _KEY_COLUMNS:  # a header again: files concatenated
            cells[key] = [row[j] for j in label_columns if j < len(row)] if label_columns else row[1:]
    labels = {key: [x.strip() for x in _LABEL_SEPARATORS.split(";".join(row)) if x.strip()]
              for key, row in cells.items()}
    if not any(_LABEL_SEPARATORS.search(cell) for row in cells.values() for cell in row):
        named = [header[j] for j in label_columns] if label_columns else header[1:2] if header else []
        tags = _space_separated_tags(labels, named_tags=any(_column_name(n) in ("tags", "tag") for n in named))
        if tags is not None:
            combinations = {label for row in labels.values() for label in row}
            _logger.info("%s: labels read as tags separated by spaces, %d tags in %d combinations (labels with "
                         "spaces in their names: separate them with ';', end a single one with ';')", path,
                         len(tags), len(combinations))
            labels = {key: [tag for label in row for tag in label.split()] for key, row in labels.items()}
    return labels


_KEY_COLUMNS = {"key", "image", "images", "image_name", "image_id", "image_index", "img", "file", "filename",
                "file_name", "fname", "path", "filepath", "file_path", "image_path", "name", "id"}
_LABEL_COLUMN = re.compile(r"(labels?|tags?|class(es)?|categor(y|ies)|targets?|finding_labels|genres?|"
                           r"attributes?|attribute_ids)(_?\d+)?")
_LABEL_SEPARATORS = re.compile(r"[;|,]")
_ONE_HOT_YES, _ONE_HOT_NO = {"1", "1.0", "true"}, {"0", "0.0", "false", ""}


def _column_name(cell: str) -> str:
    """A header cell as compared with the names above: 'Image Index' and 'image-index' are 'image_index'."""
    return re.sub(r"[\s\-]+", "_", cell.strip().lower())


def _space_separated_tags(labels: dict[str, list[str]], *, named_tags: bool) -> set[str] | None:
    """The words of ``labels`` where they are tags written with spaces between them (Kaggle's Planet), else
    None. Tags recombine: Planet's 17 tags come in hundreds of combinations; class names with spaces share
    words less (torchvision's 1,000 ImageNet names hold 1,138 words)."""
    cells = {label for row in labels.values() for label in row}
    if not any(len(label.split()) > 1 for label in cells):
        return None
    words = {word for label in cells for word in label.split()}
    return words if 2 * len(words) <= len(cells) or (named_tags and len(words) < len(cells)) else None


def _one_hot_header(rows: list[list[str]]) -> list[str] | None:
    """The label names of a one-hot table's header (its cells after the key's), or None where ``rows`` are not
    one: two label columns or more, named (not 0 or 1), and under them only 0s and 1s, some 1s."""
    if len(rows) < 2 or len(rows[0]) < 3:
        return None
    header, body = rows[0], rows[1:]
    if any(not name or name.lower() in _ONE_HOT_YES | _ONE_HOT_NO for name in header[1:]):
        return None
    cells = [cell.lower() for row in body for cell in row[1:]]
    if any(len(row) != len(header) for row in body) or any(c not in _ONE_HOT_YES | _ONE_HOT_NO for c in cells):
        return None
    return header[1:] if any(c in _ONE_HOT_YES for c in cells) else None


def keys_as_cached(wanted: dict[str, list[str]], folder: str | None,
                   cached: Iterable[str] = ()) -> dict[str, list[str]]:
    """A labels CSV's keys as the cache keeps them: a labelling tool's export names files './a/b.jpg', by
    their whole path, from the folder's parent ('photos/a/b.jpg', where the folder is photos) or without
    their extension ('a/b', as Kaggle's label files do), and no key of those was found (keys are relative
    to the embedded ``folder``; ``cached``: the cache's keys, by which the last two are told from keys of
    their own). A whole path outside ``folder`` is kept as it is, and said missing as any other key; so is
    a key without extension that several files share (a/b.jpg and a/b.png)."""
    cached = set(cached)
    parent_prefix = Path(folder).name + "/" if folder else None
    by_stem: dict[str, list[str]] = {}
    for cached_key in cached:
        stem, dot, _ = cached_key.rpartition(".")
        if dot and "/" not in _:
            by_stem.setdefault(stem, []).append(cached_key)
    out: dict[str, list[str]] = {}
    for key, labels in wanted.items():
        while key.startswith("./"):
            key = key[2:]
        if parent_prefix and key.startswith(parent_prefix) and key not in cached and \
                key[len(parent_prefix):] in cached:
            key = key[len(parent_prefix):]
        if folder and os.path.isabs(key):
            # as written first (a symlinked class folder is walked under its link's name), then resolved
            # (the folder reached through another link or mount path)
            for relative in (os.path.relpath(os.path.normpath(key), os.path.normpath(folder)),
                             os.path.relpath(os.path.realpath(key), os.path.realpath(folder))):
                if relative != ".." and not relative.startswith("../"):
                    key = Path(relative).as_posix()
                    break
        if key not in cached and len(by_stem.get(key, ())) == 1:
            key = by_stem[key][0]
        out[key] = labels
    return out


def rows_labelled_by_csv(data, rows: Iterable[int], wanted: dict[str, list[str]], cache,
                          labels_csv) -> tuple[list[int], int]:
    """Those of ``rows`` whose keys the labels CSV names, less copies (a label set plays the part of a
    class: the same bytes with the same labels count once), and how many copies; keys of the CSV not
    among them are warned of."""
    from .store import find_copies

    rows = list(rows)
    keys = {data.keys[i] for i in rows}
    rows = [i for i in rows if data.keys[i] in wanted]
    if not rows:
        raise FeatxError(f"no key of {labels_csv} is in {cache} ({data.model}); keys are paths relative to the folder")
    missing = sorted(set(wanted) - keys)
    if missing:  # a typo, or a folder not embedded yet: those rows would silently not count
        _logger.warning("%d keys of %s are not in %s (e.g. %s): embed their folder, or check the paths "
                        "(relative to the embedded folder, '/'-separated)", len(missing), labels_csv, cache, missing[0])
    label_sets = [frozenset(wanted[data.keys[i]]) for i in rows]
    set_ids = {labels: j for j, labels in enumerate(dict.fromkeys(label_sets))}
    copies = find_copies([data.keys[i] for i in rows], [set_ids[s] for s in label_sets],
                         [data.digests[i] for i in rows], folder=data.attrs.get("folder"))
    for line in copies.lines(str(cache), labels_csv=str(labels_csv)):
        _logger.warning("%s", line)
    return [rows[j] for j in copies.keep], copies.n_copies


def label_matrix(label_lists: Iterable[list[str]], names: list[str]) -> np.ndarray:
    """(n, len(names)) 0/1: row r has a 1 in each column its labels name (labels not in ``names`` ignored)."""
    column = {n: j for j, n in enumerate(names)}
    label_lists = list(label_lists)
    Y = np.zeros((len(label_lists), len(names)), dtype=int)
    for r, labels in enumerate(label_lists):
        Y[r, [column[label] for label in labels if label in column]] = 1
    return Y


def _train_multilabel(cache, output, labels_csv, *, model, head, test_size, hidden, dropout, epochs, seed,
                      report_png, class_weight) -> HeadReport:
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split

    from .store import check_finite, gone_line, load_embeddings, take_rows_in_place

    wanted = read_labels_csv(labels_csv)  # a typo in its name is said before a large cache is read
    data = load_embeddings(cache, model, present_only=True)
    check_finite(data, cache)
    wanted = keys_as_cached(wanted, data.attrs.get("folder"), [*data.keys, *data.gone])
    gone = [key for key in data.gone if key in wanted]
    if gone:  # labelled in the CSV, but deleted from the folder since: not "missing from the cache"
        _logger.warning("%s", gone_line(gone, data.attrs.get("folder"), cache))
        deleted = set(gone)
        wanted = {key: labels for key, labels in wanted.items() if key not in deleted}
    rows, n_copies = rows_labelled_by_csv(data, range(len(data.keys)), wanted, cache, labels_csv)
    names = sorted({label for i in rows for label in wanted[data.keys[i]]})
    if len(names) < 2:  # scikit-learn takes a one-column matrix for one yes/no class, and the fit fails
        given = f"one label ('{names[0]}')" if names else "no label"
        images = f"{len(rows)} image{'s' if len(rows) != 1 else ''}"
        raise FeatxError(f"{labels_csv} gives {given} to the {images} of {cache} it names: a multi-label head needs "
                         "two or more (rows are key,label1;label2); for a yes/no label, label the other images too "
                         f"(e.g. 'not-{names[0] if names else 'x'}'), or file them in two class folders")
    Y = label_matrix((wanted[data.keys[i]] for i in rows), names)
    groups, n_near = near_copy_split_groups(data.phashes[rows], cache)
    units = one_per_group(groups, len(rows))
    _check_held_out_share(test_size, len(units), per_side=1, unit="image" if groups is None else "picture",
                         held_out="test", option="--test-size",
                         needs=f"the head needs one of the images {labels_csv} labels there and one to train on")
    train, test = train_test_split(units, test_size=test_size, random_state=seed)
    if groups is not None:
        train, test = _with_near_copies(groups, train), _with_near_copies(groups, test)
    train, rows = np.sort(train), np.asarray(rows, dtype=np.int64)
    Y_train, Y_test = Y[train], Y[test]
    X_test = data.embeddings[rows[test]]  # as in train_head: the training rows are moved, not copied
    X_train = take_rows_in_place(data.embeddings, rows[train])
    data.embeddings = None
    estimator = MLPHead(hidden=tuple(hidden) if head == "mlp" else (), dropout=dropout, max_epochs=epochs,
                        random_state=seed, class_weight=class_weight)
    t0 = time.perf_counter()
    estimator.fit(X_train, Y_train, groups=None if groups is None else groups[train], overwrite_X=True)
    del X_train
    fit_seconds = time.perf_counter() - t0
    estimator.classes_ = np.array(names)
    predicted = estimator.predict(X_test)
    report = multilabel_report(head, Y_test, predicted, names, n_train=len(Y_train), fit_seconds=fit_seconds,
                                n_copies=n_copies, n_near_copies=n_near)
    report.note_unlike(estimator.unlike_training(X_test), (predicted == Y_test).all(axis=1), estimator.typical_cosine_)
    output = Path(output)
    save_head(estimator, output, fingerprint=data.fingerprint, backbone=str(data.attrs.get("backbone")),
              model=data.model, model_file=data.attrs.get("model_file"), cache=os.path.abspath(cache),
              trained_on=([data.digests[i] for i in rows], data.phashes[rows]))
    png = Path(report_png) if report_png else output.with_suffix(".f1.png")
    plot_label_f1(f1_score(Y_test, predicted, average=None, zero_division=0), names, png,
                   title=f"{head} multi-label on {data.model}: micro-F1 {report.micro_f1:.3f}")
    report.files = [str(output), str(png)]
    return report


# ---------------------------------------------------------------------------------------- sklearn transformer


class ImageEmbedder(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: image paths, PIL images or arrays in (as :func:`featx.embed_images` takes
    them), float32 (n, embed_dim) embeddings out.

    Example:
        >>> from sklearn.pipeline import make_pipeline
        >>> from sklearn.linear_model import LogisticRegression
        >>> clf = make_pipeline(ImageEmbedder("efficientnet_lite0"), LogisticRegression()).fit(paths, labels)
    """

    def __init__(self, model: str = DEFAULT_BACKBONE, weights: str | None = None, batch_size: int | None = None,
                 device: str = "auto"):
        self.model = model
        self.weights = weights
        self.batch_size = batch_size
        self.device = device

    def fit(self, X, y=None) -> ImageEmbedder:
        from .export import ensure_model_file

        self.model_file_ = str(ensure_model_file(self.model, weights=self.weights))
        return self

    def transform(self, X) -> np.ndarray:
        from .pipeline import embed_images

        check_is_fitted(self, "model_file_")
        return embed_images(list(X), model=self.model_file_, batch_size=self.batch_size, device=self.device)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.requires_fit = True
        return tags
