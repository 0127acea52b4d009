"""Heads on real cached embeddings (scikit-learn digits through the default model), and the sklearn contract."""

import csv
import json
import logging
import os
import shutil

import h5py
import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

import featx
from featx.errors import HeadMismatchError
from featx.heads import ImageEmbedder, NotFittedError, LogRegHead, MLPHead, load_head


@parametrize_with_checks([LogRegHead(), MLPHead(hidden=(32,), max_epochs=60, patience=5)])
def test_heads_follow_the_scikit_learn_contract(estimator, check):
    check(estimator)


def test_unfitted_head_says_so():
    with pytest.raises(NotFittedError):
        LogRegHead().predict(np.zeros((2, 3)))


def test_C_is_chosen_by_the_cross_validation_scikit_learn_would_run(digits_cache, caplog):
    """LogRegHead's own C search (every fold fit on the one float32 matrix, held-out rows weighing 0)
    scores each C as LogisticRegressionCV does on the same standardised rows and folds, says each
    score as it goes, and picks the lowest held-out log loss."""
    import logging
    import warnings

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    data = featx.load_embeddings(digits_cache)
    X, y = data.embeddings[:600], data.labels[:600]
    with caplog.at_level(logging.INFO, logger="featx"):
        head = LogRegHead(cv=3).fit(X, y)
    said = [m for m in caplog.messages if m.startswith("C ") and ": log loss " in m]
    assert len(said) == len(LogRegHead.Cs) and ", accuracy 0.8" in said[0], said
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    Xs = (X - head.mean_) / head.scale_
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_accuracy = LogisticRegressionCV(Cs=LogRegHead.Cs, cv=folds, max_iter=2000).fit(Xs, y)
        by_log_loss = LogisticRegressionCV(Cs=LogRegHead.Cs, cv=folds, max_iter=2000, scoring="neg_log_loss").fit(Xs, y)
    expected = next(iter(by_accuracy.scores_.values())).T  # (Cs, folds)
    assert head.cv_scores_.shape == expected.shape
    assert np.abs(head.cv_scores_ - expected).max() <= 1 / 200 + 1e-9  # at most one image of a fold's 200
    expected_loss = -next(iter(by_log_loss.scores_.values())).T
    # large Cs stop where L-BFGS's tolerance meets them, along another path: a fold may differ there
    assert np.allclose(head.cv_log_loss_.mean(axis=1), expected_loss.mean(axis=1), rtol=0.05, atol=0.002), \
        (head.cv_log_loss_, expected_loss)
    assert head.C_ == LogRegHead.Cs[np.argmin(head.cv_log_loss_.mean(axis=1))]
    assert f"C {head.C_:g} chosen (the lowest held-out log loss)" in caplog.messages
    assert head.C_ >= 1 and np.mean(head.predict(X) == y) == 1.0  # digits' features separate: little penalty


def test_a_head_on_classes_its_embeddings_separate_is_confident_on_held_out_images(digits_cache):
    """Noughts and ones: every C scores every held-out digit right, so accuracy cannot choose C; the
    smallest C won such ties and called a clear 0 or 1 at 62 % on average. Chosen by log loss, the head
    says what it sees: right, and sure of it."""
    data = featx.load_embeddings(digits_cache)
    rows = np.flatnonzero(np.isin(data.labels, [0, 1]))
    np.random.default_rng(0).shuffle(rows)
    train, test = rows[:120], rows[120:]
    head = LogRegHead().fit(data.embeddings[train], data.labels[train])
    assert (head.cv_scores_.mean(axis=1) == 1.0).all()  # a tie at every C, as the old choice met it
    probs = head.predict_proba(data.embeddings[test])
    truth = np.searchsorted(head.classes_, data.labels[test])
    assert np.mean(probs.argmax(axis=1) == truth) >= 0.98
    assert probs[np.arange(len(test)), truth].mean() >= 0.95, head.C_


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_heads_on_digits_beat_chance_by_far(kind, digits_cache, tmp_path):
    report = featx.train_head(digits_cache, tmp_path / f"{kind}.safetensors", head=kind)
    assert report.n_test == 360 and report.accuracy >= 0.85, report.text()
    assert report.confusion.shape == (10, 10) and report.confusion.sum() == 360
    # printed with its rows named; digits named by their own numbers are not numbered twice ('3 3')
    lines = report.text().split("columns: predicted, numbered as the rows):\n")[1].splitlines()
    assert lines[0].split() == [str(i) for i in range(10)]
    assert all(row.split() == [str(i)] + [str(n) for n in report.confusion[i]] for i, row in enumerate(lines[1:11]))
    assert (tmp_path / f"{kind}.confusion.png").stat().st_size > 10_000
    from PIL import Image

    width, height = Image.open(tmp_path / f"{kind}.confusion.png").size
    assert width == height  # classes of 35 to 37 held-out images: counts alone
    loaded = load_head(tmp_path / f"{kind}.safetensors")
    data = featx.load_embeddings(digits_cache)
    assert list(loaded.head.classes_) == [str(d) for d in range(10)]
    assert loaded.fingerprint == data.fingerprint
    assert np.mean(loaded.head.predict(data.embeddings) == np.array(data.class_names)[data.labels]) > 0.85


def test_fitting_a_head_on_a_cache_takes_little_more_memory_than_its_embeddings(digits_cache):
    """The cache's float32 embeddings are standardised into one new float32 array; before, they were
    converted to float64 and copied again (6x their size more: a large cache did not fit in memory).
    C chosen by cross-validation takes no more (scikit-learn's LogisticRegressionCV took 4x more: a
    float64 copy, and each fold's rows copied again)."""
    import tracemalloc

    import sklearn

    # scikit-learn before 1.9 (1.7 the last for Python 3.10) copies X to float64 inside LogisticRegression's
    # fit, 2.15x X's float32 size, which featx cannot keep it from: measured 2.15x with 1.7.2 and 1.8.0, 0.12x with 1.9.1
    its_copy = 2.2 if tuple(int(part) for part in sklearn.__version__.split(".")[:2]) < (1, 9) else 0.0
    data = featx.load_embeddings(digits_cache)
    X = np.tile(data.embeddings, (4, 1))  # 7,188 real embeddings, 37 MB
    y = np.tile(np.array(data.class_names)[data.labels], 4)
    for head, bound in ((LogRegHead(C=1.0), 1.6 + its_copy), (LogRegHead(cv=2), 1.6 + its_copy)):
        tracemalloc.start()
        try:
            head.fit(X, y)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < bound * X.nbytes, (head, peak / X.nbytes)
        assert np.mean(head.predict(X) == y) > 0.95
    # train-head's training rows are a copy it has no more use for: standardised where they lie, they take
    # no second copy, and the head is the same
    rows = X.copy()
    tracemalloc.start()
    try:
        in_place = LogRegHead(C=1.0).fit(rows, y, overwrite_X=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (0.8 + its_copy) * X.nbytes, peak / X.nbytes
    assert not np.array_equal(rows, X)  # standardised in place
    copied = LogRegHead(C=1.0).fit(X, y)
    assert np.array_equal(in_place.predict(X), copied.predict(X))
    assert np.allclose(in_place.predict_proba(X), copied.predict_proba(X), atol=1e-6)


def test_a_saved_head_has_the_permissions_the_umask_gives_and_replaces_the_old_one_whole(tmp_path):
    """safetensors 0.8 creates its files 0600: a head trained on a shared server was unreadable to the others
    there (featx predict: PermissionError), where the cache it came from was not. It is written under another
    name and renamed, so a kill or a full disk while writing leaves the earlier head whole, and no part file
    (safetensors 0.8 writes through a file of its own; 0.4, which pyproject allows, wrote in place)."""
    from featx.heads import save_head

    X, y = np.random.default_rng(0).normal(size=(20, 8)), np.arange(20) % 2
    path = tmp_path / "h.safetensors"
    modes = []
    for umask, C in ((0o022, 1.0), (0o077, 0.5)):
        previous = os.umask(umask)
        try:
            save_head(LogRegHead(C=C).fit(X, y), path, fingerprint="0123456789abcdef", backbone="resnet50",
                      model="resnet50")
        finally:
            os.umask(previous)
        modes.append(path.stat().st_mode & 0o777)
    assert modes == [0o644, 0o600]  # the user's own umask, whichever it is
    assert load_head(path).head.C == 0.5 and [p.name for p in tmp_path.iterdir()] == ["h.safetensors"]
    import resource
    import signal

    wide = LogRegHead(C=2.0).fit(np.random.default_rng(0).normal(size=(20, 4096)), y)  # 64 KB of weights
    handler, limits = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, limits[1]))  # a full disk, as the OS tells the process
    try:
        with pytest.raises(Exception):
            save_head(wide, path, fingerprint="0123456789abcdef", backbone="resnet50", model="resnet50")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert load_head(path).head.C == 0.5 and [p.name for p in tmp_path.iterdir()] == ["h.safetensors"]


def test_head_refuses_another_backbone(tmp_path, lite0_onnx, monkeypatch):
    from featx.heads import save_head

    head = LogRegHead(C=1.0).fit(np.random.default_rng(0).normal(size=(20, 1280)), np.arange(20) % 2)
    save_head(head, tmp_path / "h.safetensors", fingerprint="0123456789abcdef", backbone="resnet50", model="resnet50")
    with pytest.raises(HeadMismatchError, match="0123456789abcdef.*" + featx.read_model_info(lite0_onnx).fingerprint):
        featx.predict([tmp_path], head=tmp_path / "h.safetensors", model=lite0_onnx)
    # a backbone name not exported yet, of other width: refused before its download and export (offline
    # here, that download's failure was all it said)
    monkeypatch.setenv("FEATX_MODELS", str(tmp_path / "models"))
    with pytest.raises(HeadMismatchError, match="trained on 1280-d embeddings of resnet50 .*; resnet18 gives 512-d"):
        featx.predict([tmp_path], head=tmp_path / "h.safetensors", model="resnet18")
    # as wide (1280-d) but another architecture: refused as soon, not after exporting it
    with pytest.raises(HeadMismatchError, match="of resnet50 .*; efficientnet_b0 is another architecture"):
        featx.predict([tmp_path], head=tmp_path / "h.safetensors", model="efficientnet_b0")
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())
    # refused in one line, and yesterday's predictions at -o are left as they were
    from featx.cli import main

    (tmp_path / "predictions.csv").write_text("key,class_1\nold.jpg,cat\n")
    assert main(["-q", "predict", str(tmp_path), "--head", str(tmp_path / "h.safetensors"), "--model", str(lite0_onnx),
                 "-o", str(tmp_path / "predictions.csv")]) == 2
    assert (tmp_path / "predictions.csv").read_text() == "key,class_1\nold.jpg,cat\n"


def test_featx_info_says_what_a_heads_fit_chose(digits_cache, tmp_path):
    """A head file keeps what its fit chose and its parameters do not say: the C cross-validation picked
    (to pass as --C on a larger cache, or to compare two heads), and the MLP's epoch whose weights it
    kept. Before, `featx info` and load_head knew neither."""
    from featx.heads import save_head

    data = featx.load_embeddings(digits_cache)
    X, y = data.embeddings[:300], data.labels[:300]
    meta = dict(fingerprint=data.fingerprint, backbone="efficientnet_lite0", model="efficientnet_lite0")
    searched = LogRegHead(cv=3).fit(X, y)
    save_head(searched, tmp_path / "searched.safetensors", **meta)
    loaded = load_head(tmp_path / "searched.safetensors")
    assert loaded.head.C is None and loaded.head.C_ == searched.C_
    assert f"C {searched.C_:g} (chosen by 3-fold cross-validation)" in featx.describe_file(tmp_path / "searched.safetensors")
    save_head(LogRegHead(C=0.5).fit(X, y), tmp_path / "given.safetensors", **meta)
    assert ", C 0.5, " in featx.describe_file(tmp_path / "given.safetensors")
    # a class with 3 pictures: 3 folds, whatever cv says; a class with one: no search (it said 5-fold)
    few = np.flatnonzero(y == 1)  # the 300 rows hold 0s and 1s
    for kept, said in ((3, "C {:g} (chosen by 3-fold cross-validation)"),
                       (1, "C 1 (not cross-validated: a class had a single picture)")):
        rows = np.concatenate([np.flatnonzero(y != 1), few[:kept]])
        save_head(LogRegHead(cv=5).fit(X[rows], y[rows]), tmp_path / "few.safetensors", **meta)
        head = load_head(tmp_path / "few.safetensors").head
        assert said.format(head.C_) in featx.describe_file(tmp_path / "few.safetensors")

    mlp = MLPHead(hidden=(64,), max_epochs=40, patience=4).fit(X, y)
    save_head(mlp, tmp_path / "mlp.safetensors", **meta)
    assert mlp.history_[mlp.best_epoch_ - 1] <= min(mlp.history_) + 1e-6 and mlp.best_epoch_ <= mlp.n_epochs_
    said = featx.describe_file(tmp_path / "mlp.safetensors")
    assert f"hidden 64, dropout 0.5, weights of epoch {mlp.best_epoch_} of {mlp.n_epochs_}," in said, said


def test_a_long_mlp_fit_says_how_it_goes(digits_cache, monkeypatch, caplog):
    """An MLP on a large cache fits for minutes (50,000 rows: 41 s on 2 cores) and said nothing: an
    epoch's validation loss is logged at most every few seconds; a fit of a second says nothing."""
    import featx.heads

    data = featx.load_embeddings(digits_cache)
    with caplog.at_level(logging.INFO, logger="featx.heads"):
        quick = MLPHead(hidden=(64,), max_epochs=5).fit(data.embeddings, data.labels)
    assert "epoch 1: validation loss" not in caplog.text
    monkeypatch.setattr(featx.heads, "MLP_EPOCH_LINE_SECONDS", 0.0)  # as if each epoch took that long
    with caplog.at_level(logging.INFO, logger="featx.heads"):
        MLPHead(hidden=(64,), max_epochs=5).fit(data.embeddings, data.labels)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == quick.n_epochs_ and lines[0].startswith("epoch 1: validation loss ")
    assert lines[-1].endswith(f"the lowest {min(quick.history_):.4f} (epoch {quick.best_epoch_}); stops after 10 "
                              "epochs without a lower one, or at 5")


def test_head_file_with_pickle_is_not_a_head(tmp_path):
    import pickle

    (tmp_path / "h.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(featx.FeatxError, match="not a readable head file"):
        load_head(tmp_path / "h.safetensors")


def test_a_head_file_whose_parts_do_not_fit_together_is_refused_saying_why(digits_cache, photos_dir, tmp_path,
                                                                           capsys):
    """A head file edited, cut or written by something else: a layer of the wrong width failed on the
    first prediction with numpy's matmul error, an unknown kind was a KeyError, classes one short
    predicted from a row that has no class; each is now refused on load, saying what does not fit."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from featx.cli import main

    data = featx.load_embeddings(digits_cache)
    featx.train_head(digits_cache, tmp_path / "good.safetensors", head="mlp", hidden=(16,), epochs=3)
    with safe_open(str(tmp_path / "good.safetensors"), framework="numpy") as f:
        good_header, good_arrays = json.loads(f.metadata()["featx"]), {k: f.get_tensor(k) for k in f.keys()}

    def refusal(change) -> str:
        header, arrays = json.loads(json.dumps(good_header)), dict(good_arrays)
        del header["tensors_sha256"]  # written by something else than featx
        metadata = change(header, arrays)
        if not isinstance(metadata, dict):  # the change was to the header or the arrays
            metadata = {"featx": json.dumps(header)}
        save_file(arrays, str(tmp_path / "bad.safetensors"), metadata=metadata)
        with pytest.raises(featx.FeatxError) as e:
            load_head(tmp_path / "bad.safetensors")
        assert "\n" not in str(e.value) and str(e.value).startswith(f"{tmp_path / 'bad.safetensors'}: not a usable")
        return str(e.value)

    assert "layer0.weight of shape (16, 640), expected (16, 1280) for 10 classes" in refusal(
        lambda h, a: a.update({"layer0.weight": a["layer0.weight"][:, :640].copy()}))
    assert "layer1.weight of shape (10, 16), expected (9, 16) for 9 classes" in refusal(
        lambda h, a: h.update(classes=h["classes"][:9]))
    assert "kind 'SVMHead', expected one of LogRegHead, MLPHead" in refusal(lambda h, a: h.update(kind="SVMHead"))
    assert "no array layer1.bias" in refusal(lambda h, a: a.pop("layer1.bias"))
    assert "class_means of shape (10, 1279)" in refusal(
        lambda h, a: a.update(class_means=a["class_means"][:, 1:].copy()))
    assert "layer1.bias holds values that are not finite numbers" in refusal(
        lambda h, a: a.update({"layer1.bias": np.full(10, np.nan)}))
    assert "parameters ['kernel'] that MLPHead does not take" in refusal(lambda h, a: h["params"].update(kernel="rbf"))
    assert "its featx header is not JSON" in refusal(lambda h, a: {"featx": '{"format": 1, '})
    assert load_head(tmp_path / "good.safetensors").head.predict(data.embeddings[:5]).shape == (5,)
    # bytes of a weight changed on disk (not a shape): the file still reads, and would predict otherwise
    data_bytes = bytearray((tmp_path / "good.safetensors").read_bytes())
    weights = good_arrays["layer0.weight"].tobytes()
    start = data_bytes.find(weights) + len(weights) // 2
    data_bytes[start:start + 64] = bytes(64)
    (tmp_path / "damaged.safetensors").write_bytes(bytes(data_bytes))
    with pytest.raises(featx.FeatxError, match=r"damaged.safetensors: its arrays are not those featx wrote \(their "
                                               r"SHA-256 differs: damaged on disk or in a copy\); train the head again$"):
        load_head(tmp_path / "damaged.safetensors")
    # predict says it in one line and makes no CSV
    assert main(["-q", "predict", str(photos_dir), "--head", str(tmp_path / "bad.safetensors"),
                 "-o", str(tmp_path / "p.csv")]) == 2
    assert "not a usable head file" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()


@pytest.mark.slow
def test_image_embedder_in_a_pipeline_with_cross_validation(digits_dir, lite0_onnx):
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline

    paths = sorted(digits_dir.rglob("*.png"))[::9][:120]
    labels = [p.parent.name for p in paths]
    pipe = make_pipeline(ImageEmbedder(str(lite0_onnx)), LogisticRegression(max_iter=2000))
    scores = cross_val_score(clone(pipe), [str(p) for p in paths], labels, cv=3)
    assert scores.mean() > 0.6


@pytest.mark.slow
def test_multilabel_head_from_csv(digits_cache, digits_dir, photos_dir, lite0_onnx, tmp_path, caplog):
    """Real images, labels a person could give digits: even/odd, 'big' (5-9), 'loop' (0, 6, 8, 9). A
    photo is marked unlike the training images (each label's mean), a digit is not."""
    data = featx.load_embeddings(digits_cache)
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("key,labels\n")
        for key in data.keys:
            d = int(key.split("/")[0])
            labels = ["even" if d % 2 == 0 else "odd"] + (["big"] if d >= 5 else []) + (["loop"] if d in (0, 6, 8, 9) else [])
            f.write(f"{key},{';'.join(labels)}\n")
        f.write("3/typo.png,odd\n")  # a path that is not in the cache: said, not silently dropped
    for kind in ("logreg", "mlp"):
        with caplog.at_level(logging.WARNING, logger="featx.heads"):
            report = featx.train_head(digits_cache, tmp_path / f"{kind}.safetensors", head=kind,
                                      labels_csv=tmp_path / "labels.csv")
        assert report.classes == ["big", "even", "loop", "odd"] and report.micro_f1 >= 0.85, report.text()
        # every label right at once on most images: the thresholds were chosen on the validation split
        # standardised twice (0.05 for every label; exact-match 0.74 and 0.84 where it is now 0.87 and 0.91)
        assert report.accuracy >= 0.86, report.text()
        assert (tmp_path / f"{kind}.f1.png").exists()
        assert "1 keys of" in caplog.text and "3/typo.png" in caplog.text
        assert report.n_unlike <= 0.05 * report.n_test and "unlike the training images" in report.text()
    head = load_head(tmp_path / "mlp.safetensors").head
    assert head.multilabel_ and head.thresholds_.shape == (4,)
    eight = sorted((digits_dir / "8").iterdir())[0]
    row, photo = featx.predict([eight, photos_dir / "china.jpg"], head=tmp_path / "mlp.safetensors",
                               model=lite0_onnx, top=4)
    assert set(row.labels) == {"even", "big", "loop"}
    assert (row.unlike_training, photo.unlike_training) == (False, True)
    merged = featx.export_classifier(lite0_onnx, tmp_path / "mlp.safetensors", tmp_path / "ml.onnx")
    import onnxruntime as ort

    from featx.data import load_image

    probs = ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"images": load_image(eight, featx.read_model_info(lite0_onnx).preprocess)[None]})[0][0]
    assert np.abs(probs - head.predict_proba(featx.embed_images([eight], model=lite0_onnx))[0]).max() < 1e-4


def test_a_labels_csv_may_name_files_by_their_whole_path_or_from_dot(digits_cache, tmp_path):
    """A labelling tool's export names the files './3/0001.png', '/home/me/digits/3/0001.png', from its
    project folder 'digits/3/0001.png', or, as Kaggle's label files, '3/0001': no key was found ("keys are
    paths relative to the folder"); they are taken as the same rows."""
    data = featx.load_embeddings(digits_cache)
    folder = data.attrs["folder"]
    rows = [(key, "even" if int(key[0]) % 2 == 0 else "odd") + (("big",) if int(key[0]) >= 5 else ())
            for key in data.keys]
    plain, tool = tmp_path / "plain.csv", tmp_path / "tool.csv"
    plain.write_text("".join(f"{key},{';'.join(labels)}\n" for key, *labels in rows))
    tool.write_text("".join(f"{os.path.join(folder, key) if i % 2 else './' + key},{';'.join(labels)}\n"
                            for i, (key, *labels) in enumerate(rows)))
    (tmp_path / "link").symlink_to(folder)  # the folder reached through another path (a link, a mount)
    linked = tmp_path / "linked.csv"
    linked.write_text("".join(f"{tmp_path / 'link' / key},{';'.join(labels)}\n" for key, *labels in rows))
    # written from the folder's parent ('digits/3/0001.png'), or without extensions ('3/0001') under Kaggle
    # Planet's header, tags separated by spaces
    parent = tmp_path / "parent.csv"
    parent.write_text("image_name,tags\n" + "".join(
        f"{os.path.basename(folder) + '/' + key if i % 2 else key.rsplit('.', 1)[0]},{' '.join(labels)}\n"
        for i, (key, *labels) in enumerate(rows)))
    reports = [featx.train_head(digits_cache, tmp_path / f"{labels.stem}.safetensors", labels_csv=labels, epochs=5)
               for labels in (plain, tool, linked, parent)]
    assert all((r.n_train, r.n_test, r.accuracy) == (reports[0].n_train, reports[0].n_test, reports[0].accuracy)
               for r in reports[1:])
    assert reports[0].n_train + reports[0].n_test + reports[0].n_copies == len(data.keys)


def test_a_labels_csv_may_name_files_without_their_extension_where_one_file_has_that_name():
    """Kaggle's label files name images without their extension ('train_0,haze;primary'): no key was found.
    A name that one cached file has less its extension is that file; one that two files share, or a key
    that is itself a file's, is kept as written."""
    from featx.heads import keys_as_cached

    cached = ["cats/a.jpg", "cats/b.jpg", "cats/b.png", "dogs/c.v2.webp", "dogs/d", "dogs/d.jpg"]
    wanted = {"cats/a": ["x"], "cats/b": ["y"], "dogs/c.v2": ["z"], "dogs/d": ["w"], "dogs/e": ["v"]}
    assert keys_as_cached(wanted, "/photos", cached) == {
        "cats/a.jpg": ["x"], "cats/b": ["y"], "dogs/c.v2.webp": ["z"], "dogs/d": ["w"], "dogs/e": ["v"]}


def test_the_test_sizes_a_refused_split_suggests_are_taken():
    """A --test-size refused names the range that would do; its ends, rounded for reading, were once
    outside it (1,003 pictures, 151 a side: 'between 0.15 and 0.85', and 0.85 leaves 150 to train on), and
    where a single share does (4 images, 2 classes) it said 'between 0.5 and 0.5'."""
    from featx.heads import _check_held_out_share

    def suggested(n, per_side):
        with pytest.raises(featx.FeatxError) as refused:
            _check_held_out_share(0.999, n, per_side=per_side, unit="image", held_out="test", option="--test-size",
                                  needs="each class needs one")
        return str(refused.value).split(": use --test-size ")[1].split(", or add images")[0]

    assert suggested(4, 2) == "0.5" and suggested(1003, 151) == "between 0.15 and 0.84"
    for n in range(3, 400, 7):
        for per_side in range(1, n // 2 + 1, max(1, n // 11)):
            ends = suggested(n, per_side).removeprefix("between ").split(" and ")
            for share in ends:  # each is taken: no error
                _check_held_out_share(float(share), n, per_side=per_side, unit="image", held_out="test",
                                      option="--test-size", needs="")
            assert float(ends[0]) <= float(ends[-1]) and all(len(share) <= 8 for share in ends), (n, per_side, ends)


def test_train_head_says_which_classes_cannot_be_split(small_digits, lite0_onnx, tmp_path):
    """A class folder with one photo, a held-out share too small for the classes, --cv above the smallest
    class, a folder of one class: each a one-line error naming the fix, and no head file written."""
    from featx.errors import FeatxError

    cache, head = tmp_path / "c.h5", tmp_path / "h.safetensors"
    for extra in sorted((small_digits / "7").iterdir())[1:]:
        extra.unlink()
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    with pytest.raises(FeatxError, match="1 class\\(es\\) have a single image.*'7'"):
        featx.train_head(cache, head)
    (small_digits / "7").rename(tmp_path / "7")
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0, prune=True)
    with pytest.raises(FeatxError, match="--test-size 0.05 holds out 3 of 54 images.*9 classes"):
        featx.train_head(cache, head, test_size=0.05)
    with pytest.raises(FeatxError, match="--cv 5 needs at least 5 images in every class, the smallest class has 4"):
        featx.train_head(cache, head, cv=5)
    assert not head.exists()
    assert featx.train_head(cache, head, cv=4, C=1.0).n_test == 11 and head.exists()
    from PIL import Image

    width, height = Image.open(tmp_path / "h.confusion.png").size  # held-out classes of 1 and 2 images:
    assert width > 1.8 * height  # counts, and beside them each row as shares of its class
    for other in small_digits.iterdir():
        if other.name != "3":
            other.rename(tmp_path / f"moved-{other.name}")
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0, prune=True)
    with pytest.raises(FeatxError, match="at least two classes, found one class \\('3', 5 images\\)"):
        featx.train_head(cache, tmp_path / "one.safetensors")


@pytest.mark.slow
def test_resized_copies_stay_on_one_side_of_the_split_so_random_labels_score_as_chance(digits_dir, lite0_onnx,
                                                                                      tmp_path, caplog):
    """300 digits filed under two classes at random, each beside a copy of itself saved at another size
    (new bytes: not a copy by SHA-256). Nothing can be learned, so an honest held-out score is chance.
    Split image by image, a held-out copy's twin sits in training under the same random class, and a
    head that memorised it scores far above chance; kept together, the score is chance, and the
    5-fold cross-validation too."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "random"
    for path in sorted(digits_dir.rglob("*.png"))[:300]:
        label = folder / "ab"[rng.integers(2)]
        label.mkdir(parents=True, exist_ok=True)
        img = Image.open(path)
        img.save(label / path.name)
        img.resize((40, 40), Image.BILINEAR).save(label / f"{path.stem}-40px.png")
    cache = tmp_path / "c.h5"
    featx.embed_folder(folder, cache, model=lite0_onnx, engine="onnx")
    with caplog.at_level(logging.INFO, logger="featx.heads"):
        report = featx.train_head(cache, tmp_path / "h.safetensors", C=100.0, cv=5)
    assert report.n_copies == 0 and report.n_near_copies >= 590 and report.n_test + report.n_train == 600
    assert f"{report.n_near_copies} near copies kept on the side of their picture" in report.text()
    assert "near copies of another (perceptual hashes within 4 of 64 bits: the same picture resized" in caplog.text
    assert 0.35 < report.accuracy < 0.65 and 0.35 < np.mean(report.cv_accuracy) < 0.65
    summary = featx.summarize_cache(cache)[0]  # what featx info says
    assert (summary.near_copies, summary.unhashed) == (report.n_near_copies, 0)
    assert f"{report.n_near_copies} images are near copies of another" in summary.text()
    # what the score would be with the copies split apart (the same head, image by image)
    from featx.heads import make_head, stratified_split

    data = featx.load_embeddings(cache)
    y = np.array(data.class_names)[data.labels]
    train, test = stratified_split(y, 0.2, 0)
    leaked = make_head("logreg", C=100.0).fit(data.embeddings[train], y[train]).score(data.embeddings[test], y[test])
    assert leaked > 0.75


def test_near_copies_filed_under_two_classes_are_said_and_every_class_named_in_the_matrix(small_digits, lite0_onnx,
                                                                                           tmp_path, caplog):
    """A folder 'copies' holding the 3s again at another size (new bytes, the same pictures): a split
    keeps each picture whole, as the class of its first image, so 'copies' has no picture of its own
    and may be held out entirely. That is said; the printed confusion matrix names its rows, as the
    head's classes include one the held-out images may not (scikit-learn's report then leaves it out,
    and the matrix said "classes in the order above"). A folder of one class and its copies is refused
    saying so."""
    from PIL import Image

    threes = sorted((small_digits / "3").glob("*.png"))
    for folder in (small_digits / "copies", tmp_path / "two" / "copies"):
        folder.mkdir(parents=True)
        for path in threes:
            Image.open(path).resize((40, 40), Image.BILINEAR).save(folder / path.name)
    shutil.copytree(small_digits / "3", tmp_path / "two" / "3")
    cache = tmp_path / "c.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx")
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        report = featx.train_head(cache, tmp_path / "h.safetensors", C=1.0)
    assert (f"{len(threes)} pictures have near copies filed under another class (e.g. in '3' and 'copies'): each "
            "goes to one side of the train/test split") in caplog.text
    assert "'copies' has no picture of its own" in caplog.text
    text = report.text()
    assert "copies" in report.classes and "classes in the order above" not in text
    rows = text.split("columns: predicted, numbered as the rows):\n")[1].splitlines()[1:len(report.classes) + 1]
    for i, (name, row) in enumerate(zip(report.classes, rows)):
        assert row.split() == [str(i), name] + [str(n) for n in report.confusion[i]]
    featx.embed_folder(tmp_path / "two", tmp_path / "two.h5", model=lite0_onnx, engine="onnx")
    with pytest.raises(featx.FeatxError, match=r"found one class \('3', \d pictures\): every image of 'copies' is a "
                                               "near copy of one filed under another class"):
        featx.train_head(tmp_path / "two.h5", tmp_path / "h2.safetensors", C=1.0)


def test_scipys_blas_runs_one_thread_while_a_head_fits_and_gets_its_threads_back():
    """scipy's L-BFGS-B is slowed several times over by its own OpenBLAS' threads (digits: 13.6 s to choose
    C, 1.2 s on one thread); numpy's BLAS, which does the matrix products, keeps its threads, and the
    user's settings are back after the fit."""
    from pathlib import Path

    import scipy.optimize  # noqa: F401  (scipy's BLAS is loaded, so that it is listed)
    from threadpoolctl import threadpool_info

    from featx.heads import lbfgs_blas_single_threaded

    def blas_threads():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before = blas_threads()
    scipys = [path for path in before if Path(path).parent.name == "scipy.libs"]
    if not scipys:
        pytest.skip("scipy shares numpy's BLAS here (not pip's wheels): nothing is changed")
    with lbfgs_blas_single_threaded():
        inside = blas_threads()
    assert all(inside[path] == 1 for path in scipys)
    assert all(inside[path] == before[path] for path in before if path not in scipys)
    assert blas_threads() == before


def test_a_class_of_one_picture_takes_C_1_and_says_why(digits_cache, caplog):
    """Two images of a class that are near copies of each other are one picture: no fold can hold it out
    and train on it. scikit-learn warned that its least populated class had 1 member and cross-validated
    anyway; now C is 1, said in one line."""
    import warnings

    data = featx.load_embeddings(digits_cache)
    X, y = data.embeddings[:400], data.labels[:400].copy()
    y[:2] = 9  # a class of two images (the first 400 rows hold no 9)
    groups = np.arange(400)
    groups[1] = 0  # and they are one picture
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="featx.heads"):
            head = LogRegHead().fit(X, y, groups=groups)
    assert head.C_ == 1.0 and not hasattr(head, "cv_scores_")
    assert "C 1: class '9' has a single picture, which no fold could both hold out and train on" in caplog.messages


def test_folds_keep_each_picture_whole_and_every_class_in_each(digits_cache):
    """The folds of the C search, --cv and advise's probe on the digits' real near copies (75 images, 29
    pictures): every image is held out exactly once, a picture's copies in one fold, each fold holds every
    class in proportion; without copies they are scikit-learn's StratifiedKFold's."""
    from sklearn.model_selection import StratifiedKFold

    from featx.heads import stratified_folds
    from featx.store import near_copy_counts, near_copy_groups

    data = featx.load_embeddings(digits_cache)
    groups = near_copy_groups(data.phashes)
    assert near_copy_counts(groups)[0] >= 20  # 75 images, 29 pictures
    folds = stratified_folds(data.labels, 5, groups=groups, shuffle=True, seed=0)
    held_out = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(held_out), np.arange(len(data.labels)))
    for train, test in folds:
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(data.labels)))
        assert not set(groups[train]) & set(groups[test])
        per_class = np.bincount(data.labels[test], minlength=10)
        assert per_class.min() >= 30 and per_class.max() <= 42, per_class  # 1,797 / 5 / 10 = 36 each
    plain = stratified_folds(data.labels, 5)
    reference = StratifiedKFold(5).split(np.zeros((len(data.labels), 1)), data.labels)
    assert all(np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(plain, reference))


def test_cross_validation_fits_each_fold_at_the_C_chosen_once(small_digits, lite0_onnx, tmp_path, caplog):
    """train-head --cv without --C: C is searched once, on the split, and each fold and the saved head are
    fit at it. A search in each fold as well took the folds + 1 times as long and logged its C scores
    6 times over."""
    import re

    cache = tmp_path / "c.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    with caplog.at_level(logging.INFO, logger="featx.heads"):
        report = featx.train_head(cache, tmp_path / "h.safetensors", cv=3)
    searched = [m for m in caplog.messages if re.match(r"C \S+: log loss", m)]
    assert len(searched) == len(LogRegHead.Cs), searched
    chosen = float(re.search(r"C (\S+) chosen \(", caplog.text).group(1))
    assert f"C {chosen:g}, chosen on the split, fits each of the 3 folds and then every image" in caplog.text
    assert load_head(tmp_path / "h.safetensors").head.get_params()["C"] == pytest.approx(chosen)
    assert len(report.cv_accuracy) == 3 and np.mean(report.cv_accuracy) > 0.5, report.text()


def test_copies_count_once_and_a_file_moved_between_classes_without_prune_is_named(small_digits, lite0_onnx,
                                                                                    tmp_path, caplog, capsys):
    """The same photo twice in a class would sit on both sides of the split and score what it trained on:
    copies (same bytes, same class) count once. A file moved to another class folder keeps its old row
    until --prune, so its bytes were taught under two classes: train-head now leaves out rows of files
    the last embed found deleted, and says so; info names the pair and the deleted rows, with the fix.
    The same bytes filed under two classes, both there, are named by train-head."""
    import shutil

    cache, head = tmp_path / "c.h5", tmp_path / "h.safetensors"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    fives = sorted((small_digits / "5").iterdir())
    for i, photo in enumerate(fives[:4]):  # exported twice under another name
        shutil.copy2(photo, photo.with_name(f"copy-{i}.png"))
    threes = sorted((small_digits / "3").iterdir())
    misfiled, twice = threes[0], threes[1]
    misfiled.rename(small_digits / "8" / misfiled.name)
    shutil.copy2(twice, small_digits / "8" / f"also-{twice.name}")  # filed under 3 and 8, both there
    stats = featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    assert (stats.n_moved, stats.n_embedded, stats.n_deleted) == (6, 0, 1)
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        report = featx.train_head(cache, head, C=1.0)
    assert report.n_copies == 4 and report.n_train + report.n_test == 60 + 6 - 1 - 4
    assert "4 copies of other images left out" in report.text()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert (f"1 row of files deleted from {small_digits}, or unreadable now, since it was embedded "
            f"(e.g. 3/{misfiled.name}) left out") in warned
    assert f"e.g. 3/{twice.name} and 8/also-{twice.name}" in warned and f"3/{misfiled.name} and" not in warned
    from featx.cli import main

    assert main(["info", str(cache)]) == 0
    info = capsys.readouterr().out
    assert "4 rows are a copy of another row's file" in info and f"3/{misfiled.name} and 8/{misfiled.name}" in info
    assert f"(`featx embed {small_digits} -o {cache} --prune` drops the rows of paths that are gone)" in info
    assert ("1 row is of a file the last embed found deleted from the folder or unreadable: left out by train-head, "
            "map and evaluate") in info
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0, prune=True)
    [summary] = featx.summarize_cache(cache)
    assert summary.copies.across_classes == [(f"3/{twice.name}", f"8/also-{twice.name}")] and summary.gone == 0


def test_of_a_file_renamed_since_its_embed_the_row_kept_is_the_name_that_opens(small_digits, lite0_onnx, tmp_path):
    """A photo renamed after its embed keeps its old name's row until --prune, beside the new name's: the
    two are copies, one counted. The one counted was the older row, so the report's mistakes (and the
    map) named a file that no longer opens; now the name still in the folder is kept."""
    from featx.store import find_copies

    cache = tmp_path / "c.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    renamed = [photo.rename(photo.with_name(f"renamed-{photo.name}")) for photo in sorted(small_digits.glob("*/*"))[::3]]
    stats = featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    assert (stats.n_moved, stats.n_deleted) == (len(renamed), len(renamed))
    data = featx.load_embeddings(cache)
    copies = find_copies(data.keys, data.labels, data.digests, folder=data.attrs["folder"])
    kept = {data.keys[i] for i in copies.keep}
    assert copies.n_copies == len(renamed) and len(kept) == 60
    assert all((small_digits / key).exists() for key in kept)
    report = featx.train_head(cache, tmp_path / "h.safetensors", C=1.0, cv=3)
    assert all((small_digits / mistake[0]).exists() for mistake in report.mistakes)


def test_multilabel_copies_count_once_and_conflicting_labels_are_named(small_digits, lite0_onnx, tmp_path, caplog):
    """Multi-label heads take their classes from a CSV: the same bytes with the same labels count once,
    the same bytes with other labels (a tagging slip) are named with the CSV."""
    import shutil

    fives = sorted((small_digits / "5").iterdir())
    for i, photo in enumerate(fives[:3]):
        shutil.copy(photo, photo.with_name(f"copy-{i}.png"))
    three = sorted((small_digits / "3").iterdir())[0]
    shutil.copy(three, small_digits / "8" / "a three.png")  # same bytes, filed and tagged as an 8
    cache = tmp_path / "c.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    with open(tmp_path / "labels.csv", "w") as f:
        for key in featx.load_embeddings(cache).keys:
            d = int(key.split("/")[0])
            f.write(f"{key},{'even' if d % 2 == 0 else 'odd'}{';big' if d >= 5 else ''}\n")
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        report = featx.train_head(cache, tmp_path / "h.safetensors", head="logreg", epochs=50,
                                  labels_csv=tmp_path / "labels.csv")
    assert report.n_copies == 3 and report.n_train + report.n_test == 60 + 1
    assert "3 copies of other images left out" in report.text()
    assert "3 rows are a copy of another row's file (same SHA-256 and labels)" in caplog.text
    assert f"other labels in {tmp_path / 'labels.csv'}, e.g. 3/{three.name} and 8/a three.png" in caplog.text


@pytest.mark.parametrize("make", [lambda cw: LogRegHead(C=1.0, class_weight=cw),
                                  lambda cw: MLPHead(hidden=(256,), max_epochs=100, class_weight=cw)],
                         ids=["logreg", "mlp"])
def test_balanced_heads_find_the_class_a_folder_has_few_of(make, digits_cache):
    """A photo folder's classes are rarely the same size: with 6 images of '8' among 906, an unweighted
    head misses most held-out 8s; class_weight='balanced' finds clearly more of them (real embeddings)."""
    from sklearn.metrics import recall_score

    data = featx.load_embeddings(digits_cache)
    y = np.array(data.class_names)[data.labels]
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        others, eights = rng.permutation(np.flatnonzero(y != "8")), rng.permutation(np.flatnonzero(y == "8"))
        train, test = np.concatenate([others[:900], eights[:6]]), np.concatenate([others[900:], eights[6:]])
        recall = {cw: recall_score(y[test], make(cw).fit(data.embeddings[train], y[train]).predict(
            data.embeddings[test]), labels=["8"], average=None)[0] for cw in (None, "balanced")}
        assert recall["balanced"] >= recall[None] + 0.05, recall


def test_balanced_c_search_weighs_each_classs_held_out_images_the_same(digits_cache):
    """With --balanced, C is chosen by a held-out log loss in which each class counts as much as another,
    as in the fit: each fold's is the mean of the classes' own mean log losses. Here 25 eights among 600
    other digits, the eights the worst predicted: counted image by image, they would hardly count."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from featx.heads import stratified_folds

    data = featx.load_embeddings(digits_cache)
    y = np.array(data.class_names)[data.labels]
    rng = np.random.default_rng(0)
    rows = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y != "8"))[:600],
                                   rng.permutation(np.flatnonzero(y == "8"))[:25]]))
    X, y = data.embeddings[rows], y[rows]
    head = LogRegHead(class_weight="balanced").fit(X, y)
    Xs, y_idx = (X - head.mean_) / head.scale_, np.searchsorted(head.classes_, y)
    classes = np.arange(len(head.classes_))
    for c in (2, 3):  # C 0.01 and 0.1: regularised enough for a cold fit to reach the same optimum
        per_class_mean, per_image = [], []
        for train, test in stratified_folds(y_idx, head.cv, shuffle=True, seed=head.random_state):
            probs = LogisticRegression(C=head.Cs[c], class_weight="balanced", max_iter=2000).fit(
                Xs[train], y_idx[train]).predict_proba(Xs[test])
            truth = y_idx[test]
            per_class_mean.append(np.mean([log_loss(truth[truth == k], probs[truth == k], labels=classes)
                                           for k in classes]))
            per_image.append(log_loss(truth, probs, labels=classes))
        recorded = head.cv_log_loss_[c].mean()
        assert recorded == pytest.approx(np.mean(per_class_mean), abs=2e-3), (head.Cs[c], recorded, per_class_mean)
        assert abs(recorded - np.mean(per_image)) > 0.008, (head.Cs[c], recorded, per_image)


def test_train_head_balanced_is_saved_and_reported(digits_cache, tmp_path, capsys):
    report = featx.train_head(digits_cache, tmp_path / "b.safetensors", C=1.0, class_weight="balanced")
    assert report.balanced_accuracy is not None and "balanced accuracy" in report.text()
    assert load_head(tmp_path / "b.safetensors").head.class_weight == "balanced"
    from featx.cli import main

    # the cache named --cache, as similar, predict and evaluate name it (it was an unrecognised argument)
    assert main(["-q", "train-head", "--cache", str(digits_cache), "-o", str(tmp_path / "cli.safetensors"), "--C", "1",
                 "--balanced"]) == 0
    assert load_head(tmp_path / "cli.safetensors").head.class_weight == "balanced"
    assert "balanced accuracy" in capsys.readouterr().out


def test_labels_csv_saved_by_a_spreadsheet_or_as_a_label_matrix_reads_as_the_plain_one(tmp_path):
    """Excel writes a byte-order mark and CRLF, separates columns with ';' where the decimal mark is a
    comma, and a Windows user's keys carry backslashes; a label matrix has a column per label: the
    labels read are those of the plain file."""
    from featx.heads import read_labels_csv

    plain = "key,labels\ncats/a.jpg,indoor;sleeping\ncats/b.jpg,outdoor\ndogs/c d.jpg,\n"
    (tmp_path / "plain.csv").write_text(plain, encoding="utf-8")
    (tmp_path / "excel.csv").write_bytes(("\ufeffkey;labels\r\ncats\\a.jpg;indoor;sleeping\r\n"
                                          " cats\\b.jpg ; outdoor\r\ndogs\\c d.jpg;\r\n").encode("utf-8"))
    (tmp_path / "excel-comma.csv").write_bytes(("\ufeffkey,labels\r\ncats\\a.jpg,indoor;sleeping\r\n"
                                                "cats/b.jpg,outdoor\r\ndogs/c d.jpg\r\n").encode("utf-8"))
    # a label matrix as pandas writes it (one-hot columns): before, each key had the labels "0" and "1"
    (tmp_path / "one-hot.csv").write_text("key,indoor,outdoor,sleeping\ncats/a.jpg,1,0,1\ncats/b.jpg,0,1,0\n"
                                          "dogs/c d.jpg,0,0,0\n", encoding="utf-8")
    (tmp_path / "one-hot-excel.csv").write_bytes(("\ufeffimage;indoor;outdoor;sleeping\r\n"
                                                  "cats\\a.jpg;1.0;0.0;1.0\r\ncats\\b.jpg;False;True;False\r\n"
                                                  "dogs\\c d.jpg;0;;0\r\n").encode("utf-8"))
    # as public datasets ship them: NIH ChestX-ray14's table ('|' between labels, columns of metadata: their
    # ages and counts were labels before), and pandas' to_csv with its index column
    (tmp_path / "nih.csv").write_text("Image Index,Finding Labels,Follow-up #,Patient Age\n"
                                      "cats/a.jpg,indoor|sleeping,0,58\ncats/b.jpg,outdoor,1,58\ndogs/c d.jpg,,0,81\n")
    (tmp_path / "pandas.csv").write_text(",image,labels\n0,cats/a.jpg,indoor;sleeping\n1,cats/b.jpg,outdoor\n"
                                         "2,dogs/c d.jpg,\n")
    expected = {"cats/a.jpg": ["indoor", "sleeping"], "cats/b.jpg": ["outdoor"], "dogs/c d.jpg": []}
    for name in ("plain.csv", "excel.csv", "excel-comma.csv", "one-hot.csv", "one-hot-excel.csv", "nih.csv",
                 "pandas.csv"):
        assert read_labels_csv(tmp_path / name) == expected, name
    (tmp_path / "metadata.csv").write_text("image,age,view\na.jpg,58,PA\n")
    with pytest.raises(featx.FeatxError, match="none of its columns age, view is named as labels"):
        read_labels_csv(tmp_path / "metadata.csv")
    # Kaggle's Planet: tags separated by spaces, read as one label per combination before; class names
    # with spaces (ImageNet's) stay whole
    tags = [["clear", "primary"], ["haze", "primary", "water"], ["cloudy"], ["clear", "primary", "road"],
            ["haze", "primary"], ["clear", "water"], ["partly_cloudy", "primary"], ["clear", "primary", "water"]]
    (tmp_path / "planet.csv").write_text("image_name,tags\n" + "".join(f"train_{i},{' '.join(t)}\n"
                                                                       for i, t in enumerate(tags)))
    assert read_labels_csv(tmp_path / "planet.csv") == {f"train_{i}": t for i, t in enumerate(tags)}
    names = ["golden retriever", "Labrador retriever", "sea lion", "tabby", "tiger cat"]
    (tmp_path / "names.csv").write_text("key,tags\n" + "".join(f"{i}.jpg,{n}\n" for i, n in enumerate(names)))
    assert read_labels_csv(tmp_path / "names.csv") == {f"{i}.jpg": [n] for i, n in enumerate(names)}
    # labels that are numbers, in the key,a;b form, stay labels
    (tmp_path / "numbers.csv").write_text("key,labels\na.jpg,1;0\nb.jpg,0\n", encoding="utf-8")
    assert read_labels_csv(tmp_path / "numbers.csv") == {"a.jpg": ["1", "0"], "b.jpg": ["0"]}


def test_a_labels_csv_a_multilabel_head_cannot_learn_from_is_refused_saying_why(digits_cache, tmp_path):
    """No label at all, one label (a yes/no tag: scikit-learn took the one-column matrix for two classes
    and the fit failed with an IndexError), or a --test-size that leaves no image on one side (a
    scikit-learn ValueError): each a traceback before, now one line saying what to change."""
    data = featx.load_embeddings(digits_cache)
    first = {}
    for key in data.keys:  # one image of each digit: no two are near copies
        first.setdefault(key.split("/")[0], key)
    keys = list(first.values())[:4]
    cases = [("none", [""] * 4, r"gives no label to the 4 images of"),
             ("one", ["blurry", "", "blurry", ""], r"gives one label \('blurry'\) to the 4 images of .*'not-blurry'"),
             ("every", ["blurry"] * 4, r"gives one label \('blurry'\)")]
    for name, labels, said in cases:
        (tmp_path / f"{name}.csv").write_text("".join(f"{k},{v}\n" for k, v in zip(keys, labels)))
        with pytest.raises(featx.FeatxError, match=said):
            featx.train_head(digits_cache, tmp_path / "h.safetensors", labels_csv=tmp_path / f"{name}.csv")
    (tmp_path / "two.csv").write_text("".join(f"{k},{'even' if i % 2 == 0 else 'odd'}\n" for i, k in enumerate(keys)))
    with pytest.raises(featx.FeatxError, match=r"--test-size 0.99 holds out 4 of 4 images .* between 0.25 and 0.75"):
        featx.train_head(digits_cache, tmp_path / "h.safetensors", labels_csv=tmp_path / "two.csv", test_size=0.99)
    report = featx.train_head(digits_cache, tmp_path / "h.safetensors", labels_csv=tmp_path / "two.csv",
                              test_size=0.25)
    assert (report.n_train, report.n_test) == (3, 1) and load_head(tmp_path / "h.safetensors").head.multilabel_


def test_a_multilabel_head_saved_with_the_old_thresholds_is_named(digits_cache, tmp_path, caplog):
    """Multi-label heads saved before the thresholds were chosen on the network's scores name nearly every
    label (all thresholds 0.05); loading one says so and what to do, a head trained now loads silently."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    data = featx.load_embeddings(digits_cache)
    rows = [f"{key},{'even' if int(key[0]) % 2 == 0 else 'odd'}{';big' if int(key[0]) >= 5 else ''}\n"
            for key in data.keys[::6]]
    (tmp_path / "tags.csv").write_text("".join(rows))
    featx.train_head(digits_cache, tmp_path / "new.safetensors", head="logreg", labels_csv=tmp_path / "tags.csv")
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        load_head(tmp_path / "new.safetensors")
    assert "train it again" not in caplog.text
    with safe_open(str(tmp_path / "new.safetensors"), framework="numpy") as f:
        header, arrays = json.loads(f.metadata()["featx"]), {k: f.get_tensor(k) for k in f.keys()}
    del header["thresholds_from"], header["tensors_sha256"]  # as the old heads were written
    arrays["thresholds"] = np.full_like(arrays["thresholds"], 0.05)
    save_file(arrays, str(tmp_path / "old.safetensors"), metadata={"featx": json.dumps(header)})
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        load_head(tmp_path / "old.safetensors")
    assert "old.safetensors: a multi-label head saved before" in caplog.text and "0.05, 0.05" in caplog.text
    assert "train it again" in caplog.text
    # featx info says which of the two it can check for damage inside its arrays
    assert "no digest" not in featx.describe_file(tmp_path / "new.safetensors")
    assert featx.describe_file(tmp_path / "old.safetensors").splitlines()[-1] == (
        "  it keeps no digest of its weights (an earlier featx's, or another tool's): damage inside them cannot be "
        "told; trained again it has one")


def test_an_option_the_head_does_not_take_is_refused_not_left_unused(digits_cache, tmp_path, capsys):
    """`--head mlp --C 0.5` trained an MLP and left C unused; `--labels tags.csv --cv 5` scored one split;
    `--head logreg --epochs 50` ran logistic regression as ever: each without a word. Now each is refused
    in one line naming what the head takes, before the cache is read; options it takes run as before."""
    from featx.cli import main

    data = featx.load_embeddings(digits_cache)
    (tmp_path / "tags.csv").write_text("".join(f"{key},{'even' if int(key[0]) % 2 == 0 else 'odd'}\n"
                                               for key in data.keys[::4]))
    head, tags = str(tmp_path / "h.safetensors"), ["--labels", str(tmp_path / "tags.csv")]
    for given, said in ((["--head", "mlp", "--C", "0.5"], "--C does not apply to an MLP head, which takes --cv, "
                         "--hidden, --dropout, --epochs"),
                        (["--head", "logreg", "--epochs", "50", "--hidden", "64"], "--hidden, --epochs do not apply "
                         "to a logistic-regression head, which takes --cv, --C"),
                        ([*tags, "--cv", "5"], "--cv does not apply to a multi-label logistic-regression head (--labels: "
                         "one held-out split, trained in torch), which takes --epochs"),
                        ([*tags, "--head", "mlp", "--C", "1"], "--C does not apply to a multi-label MLP head")):
        assert main(["-q", "train-head", str(digits_cache), "-o", head, *given]) == 2
        assert capsys.readouterr().err.startswith(f"featx: error: {said}")
        assert not os.path.exists(head)
    assert main(["-q", "train-head", str(digits_cache), "-o", head, *tags, "--epochs", "5"]) == 0
    assert main(["-q", "train-head", str(digits_cache), "-o", head, "--head", "mlp", "--hidden", "64", "--epochs", "5",
                 "--dropout", "0.2"]) == 0
    assert load_head(head).head.get_params()["hidden"] == (64,)


def test_train_head_and_map_take_the_cache_first_or_as_cache(capsys):
    """similar, predict and evaluate name the cache --cache; `featx train-head --cache c.h5` was refused as an
    unrecognised argument. Both forms are read now (test_train_head_balanced_is_saved_and_reported runs
    one); none, or two different ones, are refused as the command is read."""
    from featx.cli import main

    for args, said in [(["train-head", "-o", "h.safetensors"], "the following arguments are required: cache (or "
                                                               "--cache CACHE)"),
                       (["map", "a.h5", "--cache", "b.h5"], "two caches given, a.h5 and --cache b.h5: give one")]:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and said in capsys.readouterr().err, args


def test_numbers_that_make_no_sense_are_refused_as_the_command_is_read(capsys):
    """--top 0 printed empty rows and --top -2 every class but two; --workers -1 and a held-out share
    of 1.5 ran on: each is refused by the parser with the option's name, before any model loads."""
    from featx.cli import main

    for args, said in [(["classify", "x.jpg", "--top", "0"], "argument --top: expected a whole number of at least 1"),
                       (["classify", "x.jpg", "--top", "-2"], "argument --top: expected a whole number of at least 1"),
                       (["embed", "photos", "-o", "c.h5", "--workers", "-1"], "argument --workers: expected a whole"),
                       (["train-head", "c.h5", "-o", "h.safetensors", "--test-size", "1.5"],
                        "argument --test-size: expected a fraction between 0 and 1, got '1.5'"),
                       (["similar", "x.jpg", "--cache", "c.h5", "-k", "two"], "argument -k: expected a whole number"),
                       (["bench", "--batch-sizes", "1,x"], "argument --batch-sizes: expected positive numbers")]:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and said in capsys.readouterr().err, args
    with pytest.raises(featx.FeatxError, match="top=0: ask for at least one class"):  # the API says it too
        featx.classify(["x.jpg"], top=0)


@pytest.mark.slow
def test_train_head_lists_its_mistakes_and_with_cv_finds_every_misfiled_file(digits_cache, digits_dir, lite0_onnx,
                                                                             tmp_path, capsys):
    """Five 3s filed under 8 in a copy of the digits (its rows taken from the cache by content, nothing
    decoded): with --cv each image is scored by the fold that left it out, so all five are listed."""
    import shutil

    from featx.cli import main

    noisy = tmp_path / "noisy"
    shutil.copytree(digits_dir, noisy)
    misfiled = sorted((noisy / "3").iterdir())[:5]
    for path in misfiled:
        path.rename(noisy / "8" / path.name)
    cache = tmp_path / "noisy.h5"
    shutil.copy(digits_cache, cache)
    stats = featx.embed_folder(noisy, cache, model=lite0_onnx, new_folder=True, prune=True)
    assert stats.n_embedded == 0
    mistakes = tmp_path / "mistakes.csv"
    assert main(["-q", "train-head", str(cache), "-o", str(tmp_path / "h.safetensors"), "--C", "1", "--cv", "3",
                 "--mistakes", str(mistakes)]) == 0
    printed = capsys.readouterr().out
    with open(mistakes) as f:
        listed = list(csv.DictReader(f))
    assert {f"8/{p.name}" for p in misfiled} <= {r["key"] for r in listed if (r["class"], r["predicted"]) == ("8", "3")}
    confidence = [float(r["probability"]) for r in listed]
    assert confidence == sorted(confidence, reverse=True)
    cv_accuracy = float(printed.split("3-fold cross-validation accuracy: ")[1].split()[0])
    assert 1 - len(listed) / 1797 == pytest.approx(cv_accuracy, abs=0.002)  # the folds' mistakes, all of them
    assert f"{len(listed)} misclassified (of all 1797 images, each scored by the fold that left it out)" in printed
    # without --cv: the held-out images' mistakes
    report = featx.train_head(cache, tmp_path / "h2.safetensors", C=1.0)
    assert len(report.mistakes) == round((1 - report.accuracy) * report.n_test)
    data, saved = featx.load_embeddings(cache), load_head(tmp_path / "h2.safetensors").head
    rows = [data.keys.index(key) for key, *_ in report.mistakes]
    assert list(saved.predict(data.embeddings[rows])) == [predicted for _, _, predicted, _ in report.mistakes]
    assert all(data.class_names[data.labels[i]] == true != predicted
               for i, (_, true, predicted, _) in zip(rows, report.mistakes))
    with pytest.raises(featx.FeatxError, match="multi-label"):
        featx.train_head(cache, tmp_path / "h3.safetensors", labels_csv=mistakes, mistakes_csv=tmp_path / "m.csv")


def test_an_output_given_as_a_folder_or_a_bad_option_is_refused_in_one_line_before_any_work(
        digits_cache, digits_dir, lite0_onnx, tmp_path, capsys):
    """Each file a command writes at its end (a head after its fit, a model after its export) is checked
    at its start: a folder there cost the work and ended in a traceback."""
    from featx.cli import main

    head = tmp_path / "head.safetensors"
    featx.train_head(digits_cache, head, C=1.0)
    folder, unwritten = tmp_path / "out", tmp_path / "h2.safetensors"
    folder.mkdir()
    cache, digits, three = str(digits_cache), str(digits_dir), str(digits_dir / "3")
    for argv, example in (
            (["train-head", cache, "--C", "1", "-o", folder], "head.safetensors"),
            (["train-head", cache, "--C", "1", "-o", unwritten, "--report", folder], "confusion.png"),
            (["train-head", cache, "--C", "1", "-o", unwritten, "--mistakes", folder], "mistakes.csv"),
            (["predict", three, "--head", head, "--model", lite0_onnx, "-o", folder], "predictions.csv"),
            (["classify", three, "--model", lite0_onnx, "-o", folder], "predictions.csv"),
            (["map", cache, "-o", folder], "map.png"),
            (["export-classifier", "--head", head, "--model", lite0_onnx, "-o", folder], "classifier.onnx"),
            (["export", "efficientnet_lite0", "--weights", "none", "-o", folder], "efficientnet_lite0.onnx"),
            (["finetune", digits, "--model", "no_such_model", "-o", folder], "finetuned.safetensors"),
            (["evaluate", digits, "--head", head, "--model", lite0_onnx, "--mistakes", folder], "mistakes.csv")):
        assert main([str(a) for a in argv]) == 2, argv
        assert capsys.readouterr().err.strip() == f"featx: error: {folder} is a folder; give a file name, e.g. " \
                                                  f"{folder / example}"
    assert not list(folder.iterdir()) and not unwritten.exists()
    # a picture named with a suffix matplotlib does not write: refused as it was at the end, after the work
    for argv, example in ((["train-head", cache, "--C", "1", "-o", unwritten, "--report", "r.txt"], "confusion.png"),
                          (["map", cache, "-o", "map.csv"], "map.png"),
                          (["similar", three, "--cache", cache, "--sheet", "s.html"], "similar.png"),
                          (["info", cache, "--copies", "--sheet", "c.pdf.txt"], "copies.png")):
        assert main([str(a) for a in argv]) == 2, argv
        picture = argv[argv.index("--report" if "--report" in argv else "--sheet" if "--sheet" in argv else "-o") + 1]
        kinds = ".png, .jpg, .pdf, .svg (or another kind matplotlib writes)"
        assert capsys.readouterr().err.strip() == (
            f"featx: error: {picture}: a picture is written as {kinds}, not .{picture.rsplit('.', 1)[1]}: give e.g. "
            f"{example}")
    assert not unwritten.exists()
    assert main(["train-head", cache, "--labels", str(tmp_path / "labels.cvs"), "-o", str(unwritten)]) == 2
    assert capsys.readouterr().err.strip() == f"featx: error: labels file {tmp_path / 'labels.cvs'}: does not exist"
    # values that scikit-learn refused with a traceback (--C 0), or that trained the wrong way (--lr -1)
    for argv, said in ((["train-head", cache, "--C", "0"], "--C: expected a number above 0, got '0'"),
                       (["train-head", cache, "--head", "mlp", "--hidden", "512,0"], "--hidden: expected layer sizes"),
                       (["train-head", cache, "--head", "mlp", "--dropout", "1"], "--dropout: expected a number from 0"),
                       (["finetune", digits, "--lr", "-1"], "--lr: expected a number above 0, got '-1'")):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "-o", str(unwritten)])
        assert exit_.value.code == 2 and said in capsys.readouterr().err
    assert not unwritten.exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no one can create a file")
def test_an_output_where_no_file_can_be_created_is_refused_in_one_line_before_any_work(
        digits_cache, digits_dir, lite0_onnx, tmp_path, capsys, monkeypatch):
    """A folder that cannot take the output (no permission, a read-only mount; /proc even for root, whom
    permission bits do not stop) is found by writing there first, not after the fit, the export or the
    benchmark, which ended in a traceback and lost the work; the models folder's error says FEATX_MODELS."""
    from featx.cli import main

    head = tmp_path / "head.safetensors"
    featx.train_head(digits_cache, head, C=1.0)
    cache, three, nowhere = str(digits_cache), str(digits_dir / "3"), "/proc/featx-test"
    for argv in (["train-head", cache, "--C", "1", "-o", f"{nowhere}/head.safetensors"],
                 ["train-head", cache, "--C", "1", "-o", tmp_path / "h.safetensors", "--report", f"{nowhere}/c.png"],
                 ["map", cache, "-o", f"{nowhere}/map.png"],
                 ["predict", three, "--head", head, "--model", lite0_onnx, "-o", f"{nowhere}/p.csv"],
                 ["export", "efficientnet_lite0", "--weights", "none", "-o", f"{nowhere}/m.onnx"],
                 ["embed", three, "--model", lite0_onnx, "-o", "/proc/c.h5"],
                 ["bench", "--weights", "none", "--out", nowhere],
                 ["demo", "--dir", nowhere]):
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("featx: error: cannot ") and "No such file" in err[0], err
    # a path through a file: said as such, wherever the tests run
    assert main(["map", cache, "-o", str(head / "map.png")]) == 2
    assert capsys.readouterr().err.strip() == f"featx: error: cannot create {head / 'map.png'}: {head} is a file, " \
                                              "not a folder"
    monkeypatch.setenv("FEATX_MODELS", nowhere)
    assert main(["classify", three]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"featx: error: cannot create {nowhere}/efficientnet_lite0.onnx") and "FEATX_MODELS" in err
    assert not (tmp_path / "h.safetensors").exists()


def test_a_head_of_many_classes_reports_its_most_confused_pairs_and_draws_a_bounded_png(digits_cache, tmp_path):
    """Each digit split into 5 classes at random (a folder of 50 look-alike classes): the report names the
    pairs most often confused, where numpy would print the matrix's corners around '...', and the PNG stays
    a few thousand pixels a side (drawn in full, 300 classes took 86 s, and 1,000 a 55,000-pixel square)."""
    from PIL import Image

    cache = tmp_path / "fifty.h5"
    shutil.copy(digits_cache, cache)
    with h5py.File(cache, "r+") as f:
        g = f["efficientnet_lite0"]
        digit = g["labels"][:]
        g["labels"][:] = digit * 5 + np.random.default_rng(0).integers(0, 5, len(digit))
        del g["class_names"]
        g["class_names"] = np.array([f"{d}{part}" for d in range(10) for part in "abcde"], dtype=object)
    report = featx.train_head(cache, tmp_path / "h.safetensors", C=1.0)
    text = report.text()
    assert "confusion matrix" not in text and "..." not in text
    lines = text.split("most confused classes (50 classes; the confusion PNG has them all):\n")[1].splitlines()[:10]
    off = report.confusion - np.diag(np.diag(report.confusion))
    pairs = [line.strip().split(": ")[0].split(" -> ") for line in lines]
    counts = [int(line.split(": ")[1].split()[0]) for line in lines]
    assert counts == sorted(off.ravel())[::-1][:10] and counts[0] > 0
    assert all(a[0] == b[0] for a, b in pairs)  # look-alikes: the same digit, another of its five classes
    with Image.open(tmp_path / "h.confusion.png") as png:
        assert max(png.size) <= 2 * 22 * 110
    # featx info names the first 30 classes, how many more, and the smallest (train-head needs two a class)
    counts = {name: int(n) for name, n in zip([f"{d}{p}" for d in range(10) for p in "abcde"],
                                               np.bincount(h5py.File(cache, "r")["efficientnet_lite0"]["labels"][:]))}
    smallest = sorted(counts.items(), key=lambda kind: (kind[1], kind[0]))[:5]
    line = [line for line in featx.describe_file(cache).splitlines() if " classes of " in line][0]
    assert line.startswith(f"  50 classes of {min(counts.values())} to {max(counts.values())} images: 0a (")
    assert line.endswith("… and 20 more; the smallest: " + ", ".join(f"{name} ({n})" for name, n in smallest))


def test_train_head_and_evaluate_draw_their_most_confident_mistakes(small_digits, lite0_onnx, tmp_path, capsys):
    """The mistakes list gives paths; a misfiled photo is seen at a glance: train-head and evaluate draw
    the most confident mistakes as thumbnails from their files, beside the confusion matrix, one tile a
    mistake (six a row). A file that no longer reads is a grey tile; a cache read where its folder is not
    draws none and says nothing of it."""
    from PIL import Image

    from featx.cli import main
    from featx.reports import MISTAKES_DRAWN

    for path in sorted((small_digits / "3").iterdir())[:3]:  # misfiled: confident mistakes
        path.rename(small_digits / "8" / path.name)
    cache = tmp_path / "c.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, progress=False)
    head = tmp_path / "h.safetensors"
    assert main(["train-head", str(cache), "--C", "1", "--cv", "2", "-o", str(head)]) == 0
    assert f"-> {tmp_path / 'h.mistakes.png'}" in capsys.readouterr().out
    report = featx.train_head(cache, head, C=1.0, cv=2)
    png = tmp_path / "h.mistakes.png"
    assert report.files == [str(head), str(tmp_path / "h.confusion.png"), str(png)]
    drawn = min(len(report.mistakes), MISTAKES_DRAWN)
    assert drawn >= 3
    with Image.open(png) as img:  # a tile of 2.2 x 2.6 inches at 100 dpi for each, six to a row
        assert img.size == (220 * min(drawn, 6), 260 * -(-drawn // 6) + 50)
        seen = np.asarray(img.convert("RGB"))
    # the files drawn, not placeholders: with the mistaken files gone, every tile is the grey one
    for key, *_ in report.mistakes[:drawn]:
        (small_digits / key).unlink()
    report = featx.train_head(cache, head, C=1.0, cv=2)
    with Image.open(png) as img:
        placeholders = np.asarray(img.convert("RGB"))
    grey = (placeholders == 200).all(axis=2).mean()
    assert grey > 0.3 and (seen == 200).all(axis=2).mean() < grey / 3
    # evaluate of a test folder (the next 60 digits, two misfiled) draws its mistakes too, beside its matrix
    from featx.samples import write_digits_folder

    test = write_digits_folder(tmp_path / "test", size=32, limit=120)
    for path in sorted(test.rglob("*.png")):
        if int(path.stem) < 60:
            path.unlink()
    for path in sorted((test / "5").iterdir())[:2]:
        path.rename(test / "0" / path.name)
    report = featx.evaluate_head(test, head, model=lite0_onnx)
    assert report.mistakes and report.files[-1] == str(tmp_path / "h.test.mistakes.png")
    assert os.path.isfile(report.files[-1])
    # the cache where its folder is not: the scores, no thumbnails
    png.unlink()
    small_digits.rename(tmp_path / "elsewhere")
    report = featx.train_head(cache, head, C=1.0, cv=2)
    assert report.mistakes and not png.exists() and report.files == [str(head), str(tmp_path / "h.confusion.png")]


def test_the_cosine_that_marks_an_image_unlike_the_training_ones_leaves_each_training_image_out(digits_cache):
    """A head keeps each class's mean direction and the cosine to the nearest mean that 99% of its training
    images reach, each scored against its own class's mean taken without it (as a new image would be: with
    itself in, a class of 5 lifts its own images' scores and new ones are marked too often). Checked
    against the plain leave-one-out loop on real embeddings, a class of one image among them."""
    data = featx.load_embeddings(digits_cache)
    X, y = data.embeddings[:240], data.labels[:240].copy()
    keep = (y != 3) | (np.cumsum(y == 3) == 1)  # class 3 keeps one image: scored against the other classes only
    X, y = X[keep], y[keep]
    head = LogRegHead(C=1.0).fit(X, y)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    means = {c: unit[y == c].mean(axis=0) for c in np.unique(y)}
    best = []
    for i in range(len(X)):
        scores = []
        for c, mean in means.items():
            if c == y[i]:
                others = (y == c) & (np.arange(len(X)) != i)
                if not others.any():
                    continue
                mean = unit[others].mean(axis=0)
            scores.append(unit[i] @ mean / np.linalg.norm(mean))
        best.append(max(scores))
    assert head.typical_cosine_ == pytest.approx(np.quantile(best, 0.01), abs=1e-5)
    assert np.allclose(head.class_mean_cosine(X), [max(u @ m / np.linalg.norm(m) for m in means.values())
                                                   for u in unit], atol=1e-5)
    # five digits a class: the other digits, new to the head, are seldom marked; with each training image
    # in its own class's mean (a naive cut-off) several times as many would be
    few = np.concatenate([np.flatnonzero(data.labels == c)[:5] for c in range(10)])
    rest = np.setdiff1d(np.arange(len(data.keys)), few)
    small = LogRegHead(C=1.0).fit(data.embeddings[few], data.labels[few])
    marked = small.unlike_training(data.embeddings[rest]).mean()
    naive = np.quantile(small.class_mean_cosine(data.embeddings[few]), 0.01)
    assert marked < 0.08 and (small.class_mean_cosine(data.embeddings[rest]) < naive).mean() > 2 * marked
