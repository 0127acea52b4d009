"""Heads on real cached embeddings (scikit-learn digits through the default model), and the sklearn contract."""

import csv
import logging
import shutil

import h5py
import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

import featx
from featx.errors import HeadMismatchError
from featx.heads import ImageEmbedder, NotFittedError, LogRegHead, MLPHead, load_head
from featx.store import near_copy_pairs


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

    data = featx.load_embeddings(digits_cache)
    X = np.tile(data.embeddings, (4, 1))  # 7,188 real embeddings, 37 MB
    y = np.tile(np.array(data.class_names)[data.labels], 4)
    for head, bound in ((LogRegHead(C=1.0), 1.6), (LogRegHead(cv=2), 1.6)):
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
    assert peak < 0.8 * X.nbytes, peak / X.nbytes
    assert not np.array_equal(rows, X)  # standardised in place
    copied = LogRegHead(C=1.0).fit(X, y)
    assert np.array_equal(in_place.predict(X), copied.predict(X))
    assert np.allclose(in_place.predict_proba(X), copied.predict_proba(X), atol=1e-6)


@pytest.mark.slow
def test_predict_folder_to_csv_and_files(digits_cache, digits_dir, lite0_onnx, tmp_path):
    head = tmp_path / "h.safetensors"
    featx.train_head(digits_cache, head, head="logreg", C=1.0)
    rows = featx.predict([digits_dir], head=head, model=lite0_onnx, cache=digits_cache, output=tmp_path / "p.csv")
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 1797
    assert table[0]["key"].startswith(f"{digits_dir}/")  # the file as given, not the cache's key
    right = sum(r["key"].split("/")[-2] == r["class_1"] for r in table)
    assert right / 1797 > 0.9
    (tmp_path / "bad.png").write_bytes(b"oops")
    one = featx.predict([digits_dir / "7" / sorted(p.name for p in (digits_dir / "7").iterdir())[0],
                         tmp_path / "bad.png"], head=head, model=lite0_onnx)
    assert one[0].top[0][0] == "7" and one[1].error and "not an image" in one[1].error
    # several inputs, folders among them: each folder's images in walk order, no cache
    mixed = featx.predict([tmp_path / "bad.png", digits_dir / "7", digits_dir / "1"], head=head, model=lite0_onnx)
    sevens, ones = sorted((digits_dir / "7").iterdir()), sorted((digits_dir / "1").iterdir())
    assert [r.key for r in mixed] == [str(tmp_path / "bad.png")] + [str(p) for p in sevens + ones]
    assert mixed[0].error and sum(r.top[0][0] == r.key.split("/")[-2] for r in mixed[1:]) / (len(mixed) - 1) > 0.9


@pytest.mark.slow
def test_predict_leaves_out_deleted_files_and_a_stopped_run_keeps_its_rows(
        digits_cache, small_digits, lite0_onnx, tmp_path, capsys):
    head = tmp_path / "h.safetensors"
    featx.train_head(digits_cache, head, head="logreg", C=1.0)
    cache = tmp_path / "c.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx)
    gone = sorted(small_digits.rglob("*.png"))[:3]
    (small_digits / "3" / "bad.png").write_bytes(b"not an image")
    featx.embed_folder(small_digits, cache, model=lite0_onnx)
    for path in gone + [small_digits / "3" / "bad.png"]:
        path.unlink()
    # a new file first in the folder's order, whose row (a copy's) the cache appends at its end, and a
    # new bad file: the rows still come in the folder's order, the failure in its place
    nine = sorted((small_digits / "9").iterdir())[-1]
    shutil.copy(nine, small_digits / "0" / "00.png")
    (small_digits / "5" / "bad.png").write_bytes(b"not an image")
    rows = list(featx.iter_predictions([small_digits], head=head, model=lite0_onnx, cache=cache))
    # the cache keeps the deleted files' rows and the failure (no --prune), the predictions do not
    assert len(featx.load_embeddings(cache).keys) == 61 and set(featx.load_failures(cache)) == {"3/bad.png", "5/bad.png"}
    assert [r.key for r in rows] == [str(p) for p in sorted(small_digits.rglob("*.png"))]
    assert len(rows) == 59 and [r.key for r in rows if r.error] == [str(small_digits / "5" / "bad.png")]
    assert rows[0].top == next(r.top for r in rows if r.key == str(nine))
    (small_digits / "5" / "bad.png").unlink()
    rows = [r for r in rows if not r.error and r.key != str(small_digits / "0" / "00.png")]
    assert sum(r.top[0][0] == r.key.split("/")[-2] for r in rows) / 57 > 0.9

    def stopped_by_ctrl_c(rows, after):
        for i, row in enumerate(rows):
            if i == after:
                raise KeyboardInterrupt
            yield row

    files = sorted(small_digits.rglob("*.png"))  # the file-list path, batch by batch
    with pytest.raises(KeyboardInterrupt):
        featx.write_predictions(stopped_by_ctrl_c(featx.iter_predictions(files, head=head, model=lite0_onnx,
                                                                          batch_size=16), 40), tmp_path / "p.csv")
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["key"] for r in table] == [str(p) for p in files[:40]] and all(r["class_1"] for r in table)

    from featx.cli import main

    capsys.readouterr()
    # -q after the command is taken as before it (argparse alone refuses it there)
    assert main(["predict", *map(str, files[:5]), "--head", str(head), "--model", str(lite0_onnx), "-q"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [str(p) for p in files[:5]]
    assert main(["-q", "predict", *map(str, files[:5]), "--head", str(head), "--model", str(lite0_onnx),
                 "-o", str(tmp_path / "cli.csv")]) == 0
    assert capsys.readouterr().out.strip() == f"5 rows -> {tmp_path / 'cli.csv'}"
    with open(tmp_path / "cli.csv") as f:
        assert [r["key"] for r in csv.DictReader(f)] == [str(p) for p in files[:5]]
    # a named file that is gone: its row says so, the others are written, and the exit status is 1
    missing = str(tmp_path / "gone.png")
    assert main(["-q", "predict", missing, *map(str, files[:2]), "--head", str(head), "--model", str(lite0_onnx),
                 "-o", str(tmp_path / "cli.csv")]) == 1
    with open(tmp_path / "cli.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["key"] for r in table] == [missing, *map(str, files[:2])] and "no such file" in table[0]["error"]
    assert all(r["class_1"] for r in table[1:])
    assert capsys.readouterr().err.strip() == "featx: 1 image(s) could not be read, 1 of them named (their rows say why)"


def test_head_refuses_another_backbone(tmp_path, lite0_onnx):
    from featx.heads import save_head

    head = LogRegHead(C=1.0).fit(np.random.default_rng(0).normal(size=(20, 1280)), np.arange(20) % 2)
    save_head(head, tmp_path / "h.safetensors", fingerprint="0123456789abcdef", backbone="resnet50", model="resnet50")
    with pytest.raises(HeadMismatchError, match="0123456789abcdef.*" + featx.read_model_info(lite0_onnx).fingerprint):
        featx.predict([tmp_path], head=tmp_path / "h.safetensors", model=lite0_onnx)
    # refused in one line, and yesterday's predictions at -o are left as they were
    from featx.cli import main

    (tmp_path / "predictions.csv").write_text("key,class_1\nold.jpg,cat\n")
    assert main(["-q", "predict", str(tmp_path), "--head", str(tmp_path / "h.safetensors"), "--model", str(lite0_onnx),
                 "-o", str(tmp_path / "predictions.csv")]) == 2
    assert (tmp_path / "predictions.csv").read_text() == "key,class_1\nold.jpg,cat\n"


def test_head_file_with_pickle_is_not_a_head(tmp_path):
    import pickle

    (tmp_path / "h.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(featx.FeatxError, match="not a readable head file"):
        load_head(tmp_path / "h.safetensors")


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
@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_merged_onnx_classifier_gives_featx_probabilities(kind, digits_cache, digits_dir, lite0_onnx, tmp_path):
    import json

    import onnxruntime as ort

    from featx.data import load_image

    head = tmp_path / "h.safetensors"
    featx.train_head(digits_cache, head, head=kind, C=1.0, epochs=20)
    merged = featx.export_classifier(lite0_onnx, head, tmp_path / "clf.onnx")
    session = ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["featx_classes"])
    info = featx.read_model_info(lite0_onnx)
    files = sorted(digits_dir.rglob("*.png"))[::150]
    images = np.stack([load_image(f, info.preprocess) for f in files])
    probs = session.run(["probabilities"], {"images": images})[0]
    expected = load_head(head).head.predict_proba(featx.embed_images(files, model=lite0_onnx))
    assert classes == [str(d) for d in range(10)]
    assert np.abs(probs - expected).max() < 1e-4
    # featx reads its own classifier file: classify gives the head's classes, info names them
    rows = featx.classify(files, model=merged, top=2)
    assert [r.top[0][0] for r in rows] == [classes[i] for i in probs.argmax(1)]
    assert all(abs(r.top[0][1] - p.max()) < 1e-4 for r, p in zip(rows, probs))
    assert "a classifier: probabilities for 10 classes (0, 1, 2, " in featx.describe_file(merged)


@pytest.mark.slow
def test_multilabel_head_from_csv(digits_cache, digits_dir, lite0_onnx, tmp_path, caplog):
    """Real images, labels a person could give digits: even/odd, 'big' (5-9), 'loop' (0, 6, 8, 9)."""
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
        assert (tmp_path / f"{kind}.f1.png").exists()
        assert "1 keys of" in caplog.text and "3/typo.png" in caplog.text
    head = load_head(tmp_path / "mlp.safetensors").head
    assert head.multilabel_ and head.thresholds_.shape == (4,)
    eight = sorted((digits_dir / "8").iterdir())[0]
    row = featx.predict([eight], head=tmp_path / "mlp.safetensors", model=lite0_onnx, top=4)[0]
    assert set(row.labels) == {"even", "big", "loop"}
    merged = featx.export_classifier(lite0_onnx, tmp_path / "mlp.safetensors", tmp_path / "ml.onnx")
    import onnxruntime as ort

    from featx.data import load_image

    probs = ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"images": load_image(eight, featx.read_model_info(lite0_onnx).preprocess)[None]})[0][0]
    assert np.abs(probs - head.predict_proba(featx.embed_images([eight], model=lite0_onnx))[0]).max() < 1e-4


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
    until --prune, so its bytes train under two classes: train-head and info say so, with the fix."""
    import shutil

    cache, head = tmp_path / "c.h5", tmp_path / "h.safetensors"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    fives = sorted((small_digits / "5").iterdir())
    for i, photo in enumerate(fives[:4]):  # exported twice under another name
        shutil.copy2(photo, photo.with_name(f"copy-{i}.png"))
    misfiled = sorted((small_digits / "3").iterdir())[0]
    misfiled.rename(small_digits / "8" / misfiled.name)
    stats = featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    assert (stats.n_moved, stats.n_embedded, stats.n_deleted) == (5, 0, 1)
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        report = featx.train_head(cache, head, C=1.0)
    assert report.n_copies == 4 and report.n_train + report.n_test == 60 + 5 - 4
    assert "4 copies of other images left out" in report.text()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"e.g. 3/{misfiled.name} and 8/{misfiled.name}" in warned and "--prune" in warned
    from featx.cli import main

    assert main(["info", str(cache)]) == 0
    info = capsys.readouterr().out
    assert "4 rows are a copy of another row's file" in info and f"3/{misfiled.name} and 8/{misfiled.name}" in info
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0, prune=True)
    assert featx.summarize_cache(cache)[0].copies.across_classes == []


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


def test_train_head_balanced_is_saved_and_reported(digits_cache, tmp_path, capsys):
    report = featx.train_head(digits_cache, tmp_path / "b.safetensors", C=1.0, class_weight="balanced")
    assert report.balanced_accuracy is not None and "balanced accuracy" in report.text()
    assert load_head(tmp_path / "b.safetensors").head.class_weight == "balanced"
    from featx.cli import main

    assert main(["-q", "train-head", str(digits_cache), "-o", str(tmp_path / "cli.safetensors"), "--C", "1",
                 "--balanced"]) == 0
    assert load_head(tmp_path / "cli.safetensors").head.class_weight == "balanced"
    assert "balanced accuracy" in capsys.readouterr().out


def test_labels_csv_saved_by_a_spreadsheet_reads_as_the_plain_one(tmp_path):
    """Excel writes a byte-order mark and CRLF, separates columns with ';' where the decimal mark is a
    comma, and a Windows user's keys carry backslashes: the labels read are those of the plain file."""
    from featx.heads import read_labels_csv

    plain = "key,labels\ncats/a.jpg,indoor;sleeping\ncats/b.jpg,outdoor\ndogs/c d.jpg,\n"
    (tmp_path / "plain.csv").write_text(plain, encoding="utf-8")
    (tmp_path / "excel.csv").write_bytes(("\ufeffkey;labels\r\ncats\\a.jpg;indoor;sleeping\r\n"
                                          " cats\\b.jpg ; outdoor\r\ndogs\\c d.jpg;\r\n").encode("utf-8"))
    (tmp_path / "excel-comma.csv").write_bytes(("\ufeffkey,labels\r\ncats\\a.jpg,indoor;sleeping\r\n"
                                                "cats/b.jpg,outdoor\r\ndogs/c d.jpg\r\n").encode("utf-8"))
    expected = {"cats/a.jpg": ["indoor", "sleeping"], "cats/b.jpg": ["outdoor"], "dogs/c d.jpg": []}
    for name in ("plain.csv", "excel.csv", "excel-comma.csv"):
        assert read_labels_csv(tmp_path / name) == expected, name


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


def _multilabel_tags(key: str) -> list[str]:
    """Labels a person could give a digit (its first-level folder): even/odd, 'big' (5-9), 'loop'."""
    d = int(key.split("/")[0])
    return ["even" if d % 2 == 0 else "odd"] + (["big"] if d >= 5 else []) + (["loop"] if d in (0, 6, 8, 9) else [])


@pytest.mark.slow
def test_evaluate_scores_a_test_folder_as_predict_classifies_it_and_lists_its_mistakes(
        digits_dir, lite0_onnx, tmp_path, capsys, caplog):
    """A head trained on 500 digits, scored on 150 others kept apart, five of whose 3s were filed under 8 by
    mistake: the score is what predict's top class gives, and every mistake is listed, most confident first."""
    import shutil
    from pathlib import Path

    from PIL import Image

    from featx.cli import main

    def copy(numbers, to):
        for path in sorted(digits_dir.rglob("*.png")):
            if int(path.stem) in numbers:
                (to / path.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, to / path.parent.name / path.name)
        return to

    train, test = copy(range(500), tmp_path / "train"), copy(range(1400, 1550), tmp_path / "test")
    featx.embed_folder(train, tmp_path / "train.h5", model=lite0_onnx)
    head = tmp_path / "head.safetensors"
    featx.train_head(tmp_path / "train.h5", head, C=1.0)
    misfiled = sorted((test / "3").iterdir())[:5]
    for path in misfiled:
        path.rename(test / "8" / path.name)
    mistakes = tmp_path / "mistakes.csv"
    assert main(["evaluate", str(test), "--head", str(head), "--cache", str(tmp_path / "test.h5"),
                 "--mistakes", str(mistakes), "-q"]) == 0
    printed = capsys.readouterr().out

    # a test digit within a few bits of a training digit (another child's near-identical 3) is left out
    trained, tested = featx.load_embeddings(tmp_path / "train.h5"), featx.load_embeddings(tmp_path / "test.h5")
    near = {tested.keys[i] for i, _ in near_copy_pairs(tested.phashes, trained.phashes)}
    rows = featx.predict([test], head=head, model=lite0_onnx)
    wrong = {Path(r.key).relative_to(test).as_posix(): (Path(r.key).parent.name, *r.top[0])
             for r in rows if r.top[0][0] != Path(r.key).parent.name}
    wrong = {k: v for k, v in wrong.items() if k not in near}
    n = 150 - len(near)
    assert len(rows) == 150 and 5 <= len(wrong) <= 30 and len(near) <= 5
    assert f"accuracy {1 - len(wrong) / n:.4f}" in printed and f"on {n} images of" in printed
    with open(mistakes) as f:
        listed = list(csv.DictReader(f))
    assert {r["key"]: (r["class"], r["predicted"]) for r in listed} == {k: (t, c) for k, (t, c, _) in wrong.items()}
    assert all(abs(float(r["probability"]) - wrong[r["key"]][2]) < 1e-4 for r in listed)
    confidence = [float(r["probability"]) for r in listed]
    assert confidence == sorted(confidence, reverse=True)
    assert all(wrong[f"8/{p.name}"][:2] == ("8", "3") for p in misfiled if f"8/{p.name}" not in near)
    top = max(listed[:10], key=lambda r: float(r["probability"]))
    assert f"{top['key']}  {top['class']} -> {top['predicted']}" in printed.split("most confident first:")[1]
    png = tmp_path / "head.test.confusion.png"
    assert Image.open(png).format == "PNG" and str(png) in printed
    # the head merged with its backbone into one classifier file is scored as the head is
    classifier = featx.export_classifier(lite0_onnx, head, tmp_path / "classifier.onnx")
    # (the file keeps the hashes of the head's training pictures: the same near copies are left out)
    merged = featx.evaluate_classifier(test, classifier)
    assert merged.n_test == n and len(featx.read_model_info(classifier).trained_phashes) > 250
    assert [(k, t, p) for k, t, p, _ in merged.mistakes] == [(r["key"], r["class"], r["predicted"]) for r in listed]
    assert (tmp_path / "classifier.test.confusion.png").exists()
    # the same file without that record (written by an earlier featx): nothing is left out, and it is said
    import onnx

    old = onnx.load(str(classifier))
    kept = [p for p in old.metadata_props if p.key != "featx_trained_phashes"]
    del old.metadata_props[:]
    old.metadata_props.extend(kept)
    onnx.save(old, str(tmp_path / "old.onnx"))
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        assert featx.evaluate_classifier(test, tmp_path / "old.onnx").n_test == 150
    assert "old.onnx records no pictures its classifier was trained on" in caplog.text


@pytest.mark.slow
def test_evaluate_leaves_out_what_the_head_trained_on_classes_it_lacks_and_scores_a_part_alone(
        digits_dir, lite0_onnx, tmp_path, caplog):
    import shutil

    from featx.errors import FeatxError
    from featx.samples import write_digits_folder

    train = tmp_path / "train"  # digits 60 to 359; the test folder is the first 60
    for path in digits_dir.rglob("*.png"):
        if 60 <= int(path.stem) < 360:
            (train / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, train / path.parent.name / path.name)
    featx.embed_folder(train, tmp_path / "train.h5", model=lite0_onnx)
    head = tmp_path / "head.safetensors"
    featx.train_head(tmp_path / "train.h5", head, C=1.0)
    test = write_digits_folder(tmp_path / "test", size=40, limit=60)
    threes = len(list((test / "3").iterdir()))
    trained_on = sorted((train / "3").iterdir())[0]
    shutil.copy(trained_on, test / "3" / "from_training.png")  # the same photo in train/ and test/
    (test / "cats").mkdir()
    shutil.copy(test / "1" / sorted(p.name for p in (test / "1").iterdir())[0], test / "cats" / "x.png")
    shutil.copy(test / "cats" / "x.png", test / "loose.png")
    (test / "7" / "cut_short.png").write_bytes((test / "loose.png").read_bytes()[:60])  # a corrupt file
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        report = featx.evaluate_head(test, head, cache=tmp_path / "test.h5")
    assert report.n_test == 60 and report.confusion.sum() == 60
    assert "1 image(s) could not be read, left out (e.g. 7/cut_short.png: " in caplog.text
    assert "1 image(s) directly under the folder have no class" in caplog.text
    assert "'cats' (1)" in caplog.text
    assert f"3/from_training.png and 3/{trained_on.name}" in caplog.text
    # a part of the cache's folder: its files alone, under the class the whole folder gives them
    part = featx.evaluate_head(test / "3", head, cache=tmp_path / "test.h5")
    assert part.n_test == threes and part.confusion.sum(axis=1)[part.classes.index("3")] == threes
    with pytest.raises(FeatxError, match="is the cache the head was trained from"):
        featx.evaluate_head(tmp_path / "train.h5", head)
    # the training digits resized (40 pixels, not 32): new bytes, the same pictures
    resized = write_digits_folder(tmp_path / "resized", size=40, limit=360)
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        report = featx.evaluate_head(resized, head)
    assert report.n_test == 60
    assert ("300 of 360 images are near copies (resized or re-encoded: perceptual hashes within 4 of 64 bits) "
            "of images the head was trained or scored on (recorded in its file) (e.g. ") in caplog.text
    (tmp_path / "empty" / "3").mkdir(parents=True)
    with pytest.raises(FeatxError, match="has no image to score"):
        featx.evaluate_head(tmp_path / "empty", head)
    # the training cache moved away (the head sent to someone else): the head file's own record of the
    # images it trained on leaves out the same ones, without naming their training twins
    assert "knows the 300 images it was trained and scored on" in featx.load_head(head).summary()
    (tmp_path / "train.h5").rename(tmp_path / "elsewhere.h5")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        assert featx.evaluate_head(test, head, cache=tmp_path / "test.h5").n_test == 60
        assert featx.evaluate_head(resized, head).n_test == 60
    assert ("1 of 61 images have the same bytes as images the head was trained or scored on (recorded in its "
            "file) (e.g. 3/from_training.png):") in caplog.text
    assert "300 of 360 images are near copies (resized or re-encoded" in caplog.text
    # a head file from before heads kept that record, its cache gone: said, and nothing is left out
    old = featx.load_head(head)
    from featx.heads import save_head

    save_head(old.head, tmp_path / "old.safetensors", fingerprint=old.fingerprint, backbone=old.backbone,
              model=old.model, cache=old.cache)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        assert featx.evaluate_head(resized, tmp_path / "old.safetensors").n_test == 360
    assert "the head file is from before heads kept what they trained on" in caplog.text


@pytest.mark.slow
def test_evaluate_a_multilabel_head_with_the_test_folders_labels(digits_dir, digits_cache, lite0_onnx, tmp_path):
    import shutil

    from featx.errors import FeatxError
    from featx.samples import write_digits_folder

    train = tmp_path / "train"  # digits 100 to 699; the test folder is the first 100
    for path in digits_dir.rglob("*.png"):
        if 100 <= int(path.stem) < 700:
            (train / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, train / path.parent.name / path.name)
    cache = tmp_path / "caches" / "train.h5"  # not beside the test folder: no cache is left there
    cache.parent.mkdir()
    featx.embed_folder(train, cache, model=lite0_onnx)
    data = featx.load_embeddings(cache)
    with open(tmp_path / "train.csv", "w") as f:
        f.writelines(f"{key},{';'.join(_multilabel_tags(key))}\n" for key in data.keys)
    tags = tmp_path / "tags.safetensors"
    featx.train_head(cache, tags, head="logreg", labels_csv=tmp_path / "train.csv")
    test = write_digits_folder(tmp_path / "test", size=40, limit=100)
    keys = sorted(p.relative_to(test).as_posix() for p in test.rglob("*.png"))
    with open(tmp_path / "test.csv", "w") as f:
        f.writelines(f"{key},{';'.join(_multilabel_tags(key))}\n" for key in keys)
    with pytest.raises(FeatxError, match="multi-label head: give the images' labels"):
        featx.evaluate_head(test, tags, cache=tmp_path / "test.h5")
    report = featx.evaluate_head(test, tags, labels_csv=tmp_path / "test.csv")  # no cache: a temporary one
    assert not list(test.parent.glob("*.h5")) and (tmp_path / "tags.test.f1.png").exists()
    # a test digit within a few bits of a training digit (another child's near-identical 6) is left out
    rows = featx.predict([test / key for key in keys], head=tags, model=lite0_onnx)
    from featx.data import load_batch
    from featx.runtime import read_model_info

    hashes = load_batch([str(test / key) for key in keys], read_model_info(lite0_onnx).preprocess).phashes
    near = {keys[i] for i, _ in near_copy_pairs(hashes, data.phashes)}
    exact = np.mean([set(r.labels) == set(_multilabel_tags(key)) for r, key in zip(rows, keys) if key not in near])
    assert len(near) <= 3 and report.n_test == 100 - len(near)
    assert report.micro_f1 > 0.7 and report.accuracy == pytest.approx(exact)  # 0.79: trained on 600 digits
    assert (tmp_path / "tags.test.f1.png").exists()
    single = tmp_path / "single.safetensors"
    featx.train_head(digits_cache, single, C=1.0)
    with pytest.raises(FeatxError, match="single-label head"):
        featx.evaluate_head(tmp_path / "test.h5", single, labels_csv=tmp_path / "test.csv")
    # its merged classifier gives probabilities per label: one class per image would misread them
    merged = featx.export_classifier(lite0_onnx, tags, tmp_path / "tags.onnx")
    assert "multi-label classifier: probabilities for each of 4 labels (big, even, loop, odd)" in \
        featx.describe_file(merged)
    with pytest.raises(FeatxError, match="multi-label classifier"):
        featx.evaluate_classifier(test, merged)


def test_evaluate_an_imagenet_model_on_folders_named_by_its_classes(photos_dir, lite0_onnx, tmp_path, monkeypatch,
                                                                    capsys, caplog):
    """The bundled photos filed under ImageNet class names (or ImageNet's WordNet IDs), one of them under the
    wrong one; a folder whose name is no ImageNet class is left out, and the plot goes to the working folder,
    not the models folder."""
    import shutil

    from featx.cli import main

    test = tmp_path / "test"
    for cls, photo in [("espresso", "coffee.png"), ("n03877845", "china.jpg"), ("cup", "coffee.png"),
                       ("my cats", "chelsea.png")]:  # n03877845: ImageNet's own folder name for 'palace'
        (test / cls).mkdir(parents=True)
        shutil.copy(photos_dir / photo, test / cls / photo)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "test"]) == 2
    assert "--head HEAD.safetensors) or a model" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        assert main(["evaluate", "test", "--model", str(lite0_onnx), "--report", "imagenet.png", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy 0.6667" in printed and "on 3 images of test" in printed
    assert "1 misclassified" in printed and "cup/coffee.png  cup -> espresso" in printed
    assert "'my cats' (1)" in caplog.text
    assert (tmp_path / "imagenet.png").exists()
    report = featx.evaluate_classifier(test, lite0_onnx)
    assert report.classes == ["cup", "espresso", "palace"] and report.confusion.tolist() == [[0, 1, 0], [0, 1, 0],
                                                                                                [0, 0, 1]]
    assert (lite0_onnx.parent / "efficientnet_lite0.test.confusion.png").exists()
    monkeypatch.setenv("FEATX_MODELS", str(lite0_onnx.parent))  # a name: the models folder's file
    assert featx.evaluate_classifier(test, "efficientnet_lite0").accuracy == report.accuracy
    assert (tmp_path / "efficientnet_lite0.test.confusion.png").exists()


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


def test_evaluate_leaves_out_what_a_multilabel_head_trained_on_not_the_rest_of_its_cache(
        small_digits, lite0_onnx, tmp_path, caplog):
    """A multi-label head trains on the rows its CSV names: a test photo with the bytes of one of them is
    left out, one with the bytes of a cache row the CSV did not name is scored (the head never saw it)."""
    import shutil

    cache = tmp_path / "train.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    keys = featx.load_embeddings(cache).keys
    named, unnamed = keys[::2], keys[1::2]  # the CSV names every other image
    with open(tmp_path / "train.csv", "w") as f:
        f.writelines(f"{key},{';'.join(_multilabel_tags(key))}\n" for key in named)
    head = tmp_path / "tags.safetensors"
    featx.train_head(cache, head, head="logreg", labels_csv=tmp_path / "train.csv")
    assert f"knows the {len(named)} images" in featx.load_head(head).summary()
    test = tmp_path / "test"
    for key in (named[0], unnamed[0]):
        (test / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(small_digits / key, test / key)
    with open(tmp_path / "test.csv", "w") as f:
        f.writelines(f"{key},{';'.join(_multilabel_tags(key))}\n" for key in (named[0], unnamed[0]))
    with caplog.at_level(logging.WARNING, logger="featx.heads"):
        report = featx.evaluate_head(test, head, labels_csv=tmp_path / "test.csv")
    assert report.n_test == 1
    assert f"1 of 2 images have the same bytes as images the head was trained or scored on (recorded in its " \
           f"file) (e.g. {named[0]} and {named[0]})" in caplog.text
    (test / unnamed[0]).unlink()  # what is left is all the head's own: nothing to score, and said so
    with pytest.raises(featx.FeatxError, match=f"^{test} holds only images the head was trained or scored on "
                                               r"\(recorded in its file\): train-head's report scores"):
        featx.evaluate_head(test, head, labels_csv=tmp_path / "test.csv")


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
