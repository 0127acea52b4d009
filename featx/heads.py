"""Cheap classifier heads on cached embeddings, as scikit-learn estimators; save/load without pickle.

``LogRegHead``: standardise + multinomial logistic regression (C by cross-validation unless given).
``MLPHead``: standardise + a small torch MLP (Dense-ReLU-Dropout blocks, AdamW, early stopping).
Both keep their learned state as plain arrays, predict with numpy, and save to .safetensors with
a JSON header (class names, backbone fingerprint), so loading a head runs no code from the file.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.exceptions import NotFittedError as _SklearnNotFittedError
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .backbones import DEFAULT_BACKBONE
from .errors import FeatxError, HeadMismatchError, check_output_file

_logger = logging.getLogger(__name__)
HEAD_FORMAT = "featx-head/1"
_NO_MULTILABEL_MISTAKES = ("--mistakes lists images given one wrong class; a multi-label head's report has the F1 of "
                           "each label instead")


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
            self.C_, self.n_iter_ = self.C, 1
            return self
        with lbfgs_blas_single_threaded():
            return self._fit_standardised(Xs, y_idx, groups)

    def _fit_standardised(self, Xs: np.ndarray, y_idx: np.ndarray, groups) -> LogRegHead:
        from sklearn.linear_model import LogisticRegression

        # pictures per class: a picture's near copies share a fold, so they count once
        counts = np.bincount(y_idx[one_per_group(groups, len(y_idx))], minlength=len(self.classes_))
        start = None
        if self.C is None and counts.min() >= 2:
            self.C_, start = self._choose_C(Xs, y_idx, groups, folds=int(min(self.cv, counts.min())))
        else:
            if self.C is None:
                _logger.info("C 1: class '%s' has a single picture, which no fold could both hold out and "
                             "train on", self.classes_[counts.argmin()])
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
        C ties and the smallest won, a head that called clear two-class digits at 62 % where C 1 says
        99.5 %, with the same held-out accuracy. The probabilities are what predict prints, what
        evaluate ranks mistakes by, and what a user thresholds on.

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
        for train, _ in splits:
            weights.append(np.zeros(len(y_idx)))
            weights[-1][train] = compute_sample_weight(self.class_weight, y_idx[train])
        labels = np.arange(len(self.classes_))
        best = (np.inf, None, None)
        self.cv_scores_ = np.zeros((len(self.Cs), len(splits)))
        self.cv_log_loss_ = np.zeros_like(self.cv_scores_)
        for C, scores, losses in zip(self.Cs, self.cv_scores_, self.cv_log_loss_):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)  # said once in the C's line, not per fold
                for i, (model, (_, test), weight) in enumerate(zip(fold_models, splits, weights)):
                    model.set_params(C=C).fit(Xs, y_idx, sample_weight=weight)
                    probs = _on_rows(model.predict_proba, Xs, test)
                    scores[i] = score(y_idx[test], probs.argmax(axis=1))
                    # balanced: each class's held-out images weigh as much as another's, as in the fit
                    losses[i] = log_loss(y_idx[test], probs, labels=labels,
                                         sample_weight=compute_sample_weight("balanced", y_idx[test]) if balanced
                                         else None)
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


def _on_rows(predict, X: np.ndarray, rows) -> np.ndarray:
    """``predict(X[rows])`` a slice of rows at a time, without a copy of X[rows] (a cache's rows, 5 GB
    a million)."""
    rows = np.asarray(rows, dtype=np.intp)
    if len(rows) == 0:
        return predict(X[rows])
    return np.concatenate([predict(X[rows[i:i + _ROWS_AT_A_TIME]]) for i in range(0, len(rows), _ROWS_AT_A_TIME)])


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
                    best, waited = v, 0
                    best_state = {k: t.detach().cpu().clone() for k, t in net.state_dict().items()}
                else:
                    waited += 1
                    if waited >= self.patience:
                        break
            net.load_state_dict(best_state)
        self.n_epochs_ = len(self.history_)
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        self.layers_ = [(m.weight.detach().cpu().double().numpy(), m.bias.detach().cpu().double().numpy())
                        for m in linears]
        if multilabel:
            watch = val if len(val) else train
            self.thresholds_ = best_thresholds(y_idx[watch], self.predict_proba(np.asarray(X)[watch]))
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
    from safetensors.numpy import save_file

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
    header = {
        "multilabel": bool(getattr(head, "multilabel_", False)),
        "format": HEAD_FORMAT,
        "kind": type(head).__name__,
        "params": json.loads(json.dumps(head.get_params(), default=list)),
        "classes": [c.item() if hasattr(c, "item") else c for c in head.classes_],
        "fingerprint": fingerprint,
        "backbone": backbone,
        "model": model,
        "model_file": model_file,
        "cache": cache,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.uint64 if v.dtype == np.uint64 else np.float64)
               for k, v in tensors.items()}, str(path), metadata={"featx": json.dumps(header)})
    return path


def digest_prefixes(digests) -> np.ndarray:
    """uint64: the first 8 bytes of each known SHA-256 (hex, str or bytes; empty where unknown), unique:
    what a head file keeps of its training images' bytes (two photos share them once in 2^64)."""
    return np.array(sorted({p for p in _digest_prefix_of_each(digests) if p is not None}), dtype=np.uint64)


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

    def summary(self) -> str:
        """One line: kind, classes, and the embeddings it was trained on."""
        kind = "multi-label " if getattr(self.head, "multilabel_", False) else ""
        classes = self.head.classes_
        return (f"{kind}{type(self.head).__name__} for {len(classes)} classes ({', '.join(str(c) for c in classes)}), "
                f"on {self.model} embeddings (fingerprint {self.fingerprint})"
                + (f", trained from {self.cache}" if self.cache else "")
                + (f", knows the {len(self.trained_digests):,} images it was trained and scored on (evaluate "
                   "leaves them out)" if self.trained_digests is not None else ""))

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
        raise FeatxError(f"{path}: not a readable head file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    header = json.loads(meta.get("featx", "{}"))
    if header.get("format") != HEAD_FORMAT:
        from .finetune import export_command

        command = export_command(path)
        if command:
            raise FeatxError(f"{path} is a fine-tuning checkpoint, not a head: {command} makes a model of it, "
                             "given as --model")
        raise FeatxError(f"{path}: not a featx head (format {header.get('format')!r}, expected {HEAD_FORMAT!r})")
    cls = {"LogRegHead": LogRegHead, "MLPHead": MLPHead}[header["kind"]]
    params = header["params"]
    if "hidden" in params:
        params["hidden"] = tuple(params["hidden"])
    head = cls(**params)
    head.classes_ = np.array(header["classes"])
    head.mean_, head.scale_ = arrays["mean"], arrays["scale"]
    n_layers = sum(1 for k in arrays if k.startswith("layer") and k.endswith(".weight"))
    head.layers_ = [(arrays[f"layer{i}.weight"], arrays[f"layer{i}.bias"]) for i in range(n_layers)]
    head.n_features_in_ = len(head.mean_)
    head.multilabel_ = bool(header.get("multilabel", False))
    if head.multilabel_:
        head.thresholds_ = arrays["thresholds"]
    return LoadedHead(head, header["fingerprint"], header["backbone"], header["model"], header.get("model_file"),
                      header.get("cache"), arrays.get("trained_digests"), arrays.get("trained_phashes"))


def head_model_file(loaded: LoadedHead, model: str | os.PathLike | None = None, weights: str | None = None) -> Path:
    """The model file a head runs on: ``model`` as given; else the one its embeddings came from (the
    path recorded in the head, or the models folder's file of its group name, with its fingerprint),
    so a head trained on ResNet-50 embeddings needs no --model; else the default backbone."""
    from .export import ensure_model_file
    from .runtime import model_file_for

    if model is None and weights is None:
        model = model_file_for(loaded.model, loaded.fingerprint, loaded.model_file)
    return ensure_model_file(model or DEFAULT_BACKBONE, weights=weights)


# ---------------------------------------------------------------------------------------- training


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
        lines.append(self.per_class.rstrip())
        if self.micro_f1 is None and len(self.classes) <= _MATRIX_PRINTED_UP_TO:
            lines += ["confusion matrix (rows: true, columns: predicted; classes in the order above):",
                      np.array2string(self.confusion, max_line_width=200)]
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


def _single_label_report(head: str, truth: np.ndarray, predicted: np.ndarray, classes: list[str],
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


def _multilabel_report(head: str, truth: np.ndarray, predicted: np.ndarray, names: list[str], **fields) -> HeadReport:
    """Scores of (n, labels) 0/1 predictions: exact-match ratio, macro and micro F1, per-label report."""
    from sklearn.metrics import classification_report, f1_score, multilabel_confusion_matrix

    return HeadReport(
        head=f"{head} (multi-label)", n_test=len(truth), accuracy=float(np.mean((predicted == truth).all(axis=1))),
        macro_f1=float(f1_score(truth, predicted, average="macro", zero_division=0)),
        micro_f1=float(f1_score(truth, predicted, average="micro", zero_division=0)),
        per_class=classification_report(truth, predicted, target_names=names, digits=3, zero_division=0),
        confusion=multilabel_confusion_matrix(truth, predicted), classes=names, **fields)


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
    if len(names) < 2:
        found = f"one class ('{names[0]}', {counts[0]} images)" if len(names) else "no labelled image"
        raise FeatxError(f"a classifier needs images of at least two classes, found {found}: "
                         "put each class in its own subfolder")
    single = names[counts < 2]
    if len(single):
        listed = ", ".join(f"'{n}'" for n in single[:5]) + (f" and {len(single) - 5} more" if len(single) > 5 else "")
        raise FeatxError(f"{len(single)} class(es) have a single {image}, so none can be held out for {held_out}: "
                         f"{listed}; add images or move them out of the class folders")
    n = int(counts.sum())
    n_held = int(np.ceil(fraction * n)) if fraction < 1 else int(fraction)
    if not (len(names) <= n_held <= n - len(names)):
        raise FeatxError(f"{option} {fraction:g} holds out {n_held} of {n} {image.split(' ')[0]}s for {held_out}, "
                         f"but each of the {len(names)} classes needs one there and one to train on: "
                         f"use {option} between {len(names) / n:.2g} and {1 - len(names) / n:.2g}, or add images")
    train, rest = train_test_split(units, test_size=fraction, stratify=labels[units], random_state=seed)
    if groups is None:
        return train, rest
    return _with_near_copies(groups, train), _with_near_copies(groups, rest)


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
        f"64 bits: the same picture resized or re-encoded, or as alike), {n_pictures} pictures in all: each "
        "picture's copies are kept on one side of the split")
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
    hidden: Sequence[int] = (1024,),
    dropout: float = 0.5,
    epochs: int = 200,
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
    """
    if labels_csv is not None and mistakes_csv is not None:
        raise FeatxError(_NO_MULTILABEL_MISTAKES)
    _check_report_files(output=(output, "head.safetensors"), report_png=report_png, mistakes_csv=mistakes_csv)
    if labels_csv is not None:
        return _train_multilabel(cache, output, labels_csv, model=model, head=head, test_size=test_size,
                                 hidden=hidden, dropout=dropout, epochs=epochs, seed=seed, report_png=report_png,
                                 class_weight=class_weight)
    from sklearn.base import clone

    from .store import find_copies, load_embeddings, take_rows_in_place

    data = load_embeddings(cache, model, labelled_only=True)
    if len(data.keys) == 0:
        raise FeatxError(f"{cache} has no labelled embeddings for {data.model}: put images in class subfolders")
    copies = find_copies(data.keys, data.labels, data.digests)
    for line in copies.lines(str(cache)):
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
    report = _single_label_report(head, y_test, predicted, classes, n_train=len(y_train), fit_seconds=fit_seconds,
                                  n_copies=copies.n_copies, n_near_copies=n_near,
                                  mistakes=_mistakes(keys[test], y_test, predicted, probs.max(axis=1)))
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
            out_of_fold[fold_test] = _on_rows(fold.predict_proba, X, fold_test)
            report.cv_accuracy.append(float(np.mean(
                np.array(classes)[out_of_fold[fold_test].argmax(axis=1)] == y[fold_test])))
        predicted = np.array(classes, dtype=object)[out_of_fold.argmax(axis=1)].astype(str)
        report.mistakes = _mistakes(keys, y, predicted, out_of_fold.max(axis=1))
        report.mistakes_of = f"of all {len(y)} images, each scored by the fold that left it out"
        estimator.fit(X, y, groups=groups, overwrite_X=True)  # X is not read after this
    output = Path(output)
    save_head(estimator, output, fingerprint=data.fingerprint, backbone=str(data.attrs.get("backbone")),
              model=data.model, model_file=data.attrs.get("model_file"), cache=os.path.abspath(cache),
              trained_on=(data.digests, data.phashes))
    png = Path(report_png) if report_png else output.with_suffix(".confusion.png")
    plot_confusion(report.confusion, classes, png, title=f"{head} on {data.model}: accuracy {report.accuracy:.3f}")
    report.files = [str(output), str(png)]
    if mistakes_csv is not None:
        report.write_mistakes(mistakes_csv)
    return report


def _check_report_files(*, output=None, report_png=None, mistakes_csv=None) -> None:
    """The files a fit or a score writes at its end, refused before it starts when one is a folder;
    ``output``: (path, an example file name)."""
    if output is not None:
        check_output_file(output[0], example=output[1])
    check_output_file(report_png, example="confusion.png")
    check_output_file(mistakes_csv, example="mistakes.csv")


def _mistakes(keys, truth: np.ndarray, predicted: np.ndarray, confidence) -> list[tuple[str, str, str, float]]:
    """(key, class, predicted class, its probability) of each image predicted wrong, the most confident
    first: a file filed under the wrong class is among them. ``confidence``: (n,) the predicted
    class's probability."""
    wrong = np.flatnonzero(predicted != truth)
    return sorted(((str(keys[i]), str(truth[i]), str(predicted[i]), float(confidence[i])) for i in wrong),
                  key=lambda m: -m[3])


def read_labels_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """``key,labels`` rows (labels separated by ';'; a header row whose first cell is 'key' is skipped).

    Read as a spreadsheet saves it too: a UTF-8 byte-order mark, ';' between the columns (Excel where the
    decimal mark is a comma: the first cell is the key, the rest labels), Windows' '\\' in the keys, and
    spaces around cells.
    """
    import csv

    out: dict[str, list[str]] = {}
    try:
        f = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise FeatxError(f"labels file {path}: {'does not exist' if isinstance(e, FileNotFoundError) else e.strerror}") \
            from None
    with f:
        for row in csv.reader(f):
            if len(row) == 1:  # no comma in the row: ';' separates the columns, or there are no labels
                row = row[0].split(";")
            key = row[0].strip().replace("\\", "/") if row else ""
            if not key or key == "key":
                continue
            out[key] = [x.strip() for x in ";".join(row[1:]).split(";") if x.strip()]
    return out


def _rows_labelled_by_csv(data, rows: Iterable[int], wanted: dict[str, list[str]], cache,
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
                         [data.digests[i] for i in rows])
    for line in copies.lines(str(cache), labels_csv=str(labels_csv)):
        _logger.warning("%s", line)
    return [rows[j] for j in copies.keep], copies.n_copies


def _label_matrix(label_lists: Iterable[list[str]], names: list[str]) -> np.ndarray:
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

    from .store import load_embeddings, take_rows_in_place

    wanted = read_labels_csv(labels_csv)  # a typo in its name is said before a large cache is read
    data = load_embeddings(cache, model)
    rows, n_copies = _rows_labelled_by_csv(data, range(len(data.keys)), wanted, cache, labels_csv)
    names = sorted({label for i in rows for label in wanted[data.keys[i]]})
    Y = _label_matrix((wanted[data.keys[i]] for i in rows), names)
    groups, n_near = near_copy_split_groups(data.phashes[rows], cache)
    units = one_per_group(groups, len(rows))
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
    report = _multilabel_report(head, Y_test, predicted, names, n_train=len(Y_train), fit_seconds=fit_seconds,
                                n_copies=n_copies, n_near_copies=n_near)
    output = Path(output)
    save_head(estimator, output, fingerprint=data.fingerprint, backbone=str(data.attrs.get("backbone")),
              model=data.model, model_file=data.attrs.get("model_file"), cache=os.path.abspath(cache),
              trained_on=([data.digests[i] for i in rows], data.phashes[rows]))
    png = Path(report_png) if report_png else output.with_suffix(".f1.png")
    _plot_label_f1(f1_score(Y_test, predicted, average=None, zero_division=0), names, png,
                   title=f"{head} multi-label on {data.model}: micro-F1 {report.micro_f1:.3f}")
    report.files = [str(output), str(png)]
    return report


def _plot_label_f1(f1: np.ndarray, names: list[str], path: Path, *, title: str) -> None:
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


# ---------------------------------------------------------------------------------------- prediction


@dataclass
class PredictionRow:
    key: str
    top: list[tuple[str, float]]
    error: str | None = None
    labels: list[str] | None = None  # multi-label heads: every label at or above its threshold

    def line(self) -> str:
        from .pipeline import Classification  # classify's line, and a multi-label head's chosen labels

        chosen = f"  labels: {';'.join(self.labels) or '-'}" if self.labels is not None and not self.error else ""
        return Classification(self.key, self.top, self.error).line() + chosen


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
    from .pipeline import embed_folder, encode_files, encode_files_through_cache, expand_inputs
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

    def rows_of(keys: list[str], embeddings: np.ndarray) -> Iterator[PredictionRow]:
        for key, probs in zip(keys, loaded.head.predict_proba(embeddings)):
            best = np.argsort(-probs)[:top]
            chosen = [classes[j] for j in np.flatnonzero(probs >= loaded.head.thresholds_)] if multilabel else None
            yield PredictionRow(key, [(classes[i], float(probs[i])) for i in best], labels=chosen)

    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        folder = str(inputs[0])
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(cache) if cache else Path(tmp) / "predict.h5"
            stats = embed_folder(folder, out, model=model_file, device=device, progress=progress,
                                 **({"batch_size": batch_size} if batch_size else {}))
            group, gone = Path(model_file).stem, set(stats.deleted)
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
        encoded = ((path, emb, error) for path, emb, error, _ in
                   encode_files_through_cache(engine, paths, cache, group, batch_size=batch_size, progress=progress))
    else:
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

    from .store import find_copies, load_embeddings, model_fingerprints

    _check_report_files(report_png=report_png, mistakes_csv=mistakes_csv)
    loaded = load_head(head)
    multilabel = bool(getattr(loaded.head, "multilabel_", False))
    if multilabel and labels_csv is None:
        raise FeatxError(f"{head} is a multi-label head: give the images' labels with --labels CSV (key,label1;label2)")
    if labels_csv is not None and not multilabel:
        raise FeatxError(f"{head} is a single-label head: its classes are the folder's first-level subfolders, "
                         "not a labels CSV")
    if multilabel and mistakes_csv is not None:
        raise FeatxError(_NO_MULTILABEL_MISTAKES)
    wanted = read_labels_csv(labels_csv) if multilabel else None  # before the folder is embedded
    source, part = Path(data), None
    if source.is_dir():
        with tempfile.TemporaryDirectory() as tmp:  # without a cache, the folder's embeddings are not kept
            source = Path(cache) if cache is not None else Path(tmp) / f"{source.name}.h5"
            group, part = _embed_for_head(loaded, Path(data), source, model, weights, device=device, progress=progress)
            embeddings = load_embeddings(source, group)
    else:
        groups = model_fingerprints(source)
        matching = [g for g, fp in groups.items() if fp == loaded.fingerprint]
        if not matching:
            held = ", ".join(f"{g} (fingerprint {fp})" for g, fp in groups.items()) or "no embeddings"
            raise HeadMismatchError(f"head was trained on {loaded.model} embeddings (fingerprint "
                                    f"{loaded.fingerprint}); {source} holds {held}: `featx evaluate FOLDER --head "
                                    f"{head} --cache {source}` embeds a folder with the head's model")
        group = loaded.model if loaded.model in matching else matching[0]
        embeddings = load_embeddings(source, group)
    rows = [i for i, key in enumerate(embeddings.keys) if part is None or part(key)]
    failed = sorted(key for key in embeddings.failures if part is None or part(key))
    if failed:  # recorded in the cache when embedded: not scored, but not passed over in silence
        kept = f"; `featx info {source} --failures` lists them" if part is None or cache is not None else ""
        _logger.warning("%d image(s) could not be read, left out (e.g. %s: %s)%s", len(failed), failed[0],
                        embeddings.failures[failed[0]], kept)
    classes = [str(c) for c in loaded.head.classes_]
    if multilabel:
        rows, n_copies = _rows_labelled_by_csv(embeddings, rows, wanted, data, labels_csv)
        unknown = sorted({label for i in rows for label in wanted[embeddings.keys[i]]} - set(classes))
        if unknown:
            _logger.warning("%d label(s) of %s are not the head's, left out of the scores: %s", len(unknown),
                            labels_csv, ", ".join(unknown[:10]))
    else:
        names = embeddings.class_names
        truth = [names[embeddings.labels[i]] if embeddings.labels[i] >= 0 else None for i in rows]
        rows = [rows[j] for j in _rows_of_known_classes(truth, classes, Path(data), of="the head")]
        copies = find_copies([embeddings.keys[i] for i in rows], embeddings.labels[rows],
                             [embeddings.digests[i] for i in rows])
        # a temporary cache is named by its folder: its path would be gone before the line is read
        for line in copies.lines(str(data) if part is not None and cache is None else str(source)):
            _logger.warning("%s", line)
        rows, n_copies = [rows[j] for j in copies.keep], copies.n_copies
    rows = _rows_not_trained_on(loaded, embeddings, rows, Path(data))
    probs = _on_rows(loaded.head.predict_proba, embeddings.embeddings, rows)
    keys = [embeddings.keys[i] for i in rows]
    where = str(data) if part is not None else source.name
    data_name = Path(data).name if part is not None else source.stem
    png = Path(report_png) if report_png else Path(head).with_name(
        f"{Path(head).stem}.{data_name}.{'f1' if multilabel else 'confusion'}.png")
    if not multilabel:
        best = probs.argmax(axis=1)
        return _score_classes(Path(head).name, keys, [embeddings.class_names[embeddings.labels[i]] for i in rows],
                              [classes[j] for j in best], probs[np.arange(len(rows)), best], where=where, png=png,
                              mistakes_csv=mistakes_csv, n_copies=n_copies)
    from sklearn.metrics import f1_score

    truth = _label_matrix((wanted[k] for k in keys), classes)
    predicted = (probs >= loaded.head.thresholds_).astype(int)
    report = _multilabel_report(Path(head).name, truth, predicted, classes, n_copies=n_copies, evaluated_on=where)
    _plot_label_f1(f1_score(truth, predicted, average=None, zero_division=0), classes, png,
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
    from .export import ensure_model_file
    from .pipeline import iter_classify
    from .runtime import read_model_info

    _check_report_files(report_png=report_png, mistakes_csv=mistakes_csv)
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
    beside = Path(model_file) if Path(model).suffix == ".onnx" else Path(Path(model_file).name)
    png = Path(report_png) if report_png else beside.with_name(f"{beside.stem}.{folder.name}.confusion.png")
    return _score_classes(Path(model_file).name, [keys[i] for i in known], [truth[i] for i in known],
                          [rows[i].top[0][0] for i in known], [rows[i].top[0][1] for i in known], where=str(folder),
                          png=png, mistakes_csv=mistakes_csv)


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
                   *, where: str, png: Path, mistakes_csv, n_copies: int = 0) -> HeadReport:
    """The report on one class per image: scores, the confusion matrix over the classes met (a model of
    1,000 classes is drawn on those the folder has or it predicted, in name order), its PNG, and the
    mistakes, the most confident first (all of them in ``mistakes_csv``)."""
    shown = sorted(set(truth) | set(predicted))  # the order of scikit-learn's report, printed above the matrix
    truth, predicted = np.array(truth, dtype=object).astype(str), np.array(predicted, dtype=object).astype(str)
    mistakes = _mistakes(keys, truth, predicted, confidence)
    report = _single_label_report(name, truth, predicted, shown, n_copies=n_copies, evaluated_on=where,
                                  mistakes=mistakes)
    plot_confusion(report.confusion, shown, png, title=f"{name} on {where}: accuracy {report.accuracy:.3f}")
    report.files.append(str(png))
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
    prefix, gone = (stats.subfolder + "/" if stats.subfolder else ""), set(stats.deleted)
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
        prefixes = _digest_prefix_of_each([embeddings.digests[i] for i in rows])
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


def _digest_prefix_of_each(digests) -> list[int | None]:
    """The first 8 bytes of each SHA-256 (hex, str or bytes) as an int, None where it is not known."""
    return [int(d[:16], 16) if d else None for d in digests]


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

    from .export import TRAINED_PHASHES_KEY, encode_phashes

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
    graph = helper.make_graph(
        nodes, "featx_head",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", k])],
        initializer=inits,
    )
    head_model = helper.make_model(graph, opset_imports=list(backbone.opset_import), ir_version=backbone.ir_version)
    head_model = compose.add_prefix(head_model, "head/")
    merged = compose.merge_models(backbone, head_model, io_map=[("embedding", "head/embedding")],
                                  outputs=["head/probabilities", "embedding"])
    for out in merged.graph.output:
        if out.name == "head/probabilities":
            out.name = "probabilities"
    for node in merged.graph.node:
        node.output[:] = ["probabilities" if o == "head/probabilities" else o for o in node.output]
    del merged.metadata_props[:]
    merged.metadata_props.extend(p for p in backbone.metadata_props if p.key != TRAINED_PHASHES_KEY)
    trained = _pictures_trained_on(loaded, backbone_info.trained_phashes)
    if trained is not None:  # evaluate leaves them out of a test folder, as it does for the head itself
        entry = merged.metadata_props.add()
        entry.key, entry.value = TRAINED_PHASHES_KEY, encode_phashes(trained)
    entry = merged.metadata_props.add()
    entry.key, entry.value = "featx_classes", json.dumps([str(c) for c in h.classes_])
    if getattr(h, "multilabel_", False):  # its probabilities are per label, not one class's share
        entry = merged.metadata_props.add()
        entry.key, entry.value = "featx_multilabel", "1"
    onnx.checker.check_model(merged)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    onnx.save(merged, str(tmp))
    os.replace(tmp, output)
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


# ---------------------------------------------------------------------------------------- any featx file


def describe_file(path: str | os.PathLike, *, list_failures: bool = False) -> str:
    """What a featx file holds, told by its content: an embedding cache (models, classes with counts,
    failures; every failed file with ``list_failures``), an exported model, or a head. It lives here,
    in the last stage, because only here may every earlier stage's files be read."""
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
        summaries = summarize_cache(path)
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
