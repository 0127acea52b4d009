"""A saved head applied to images, on real digit embeddings and real photos: predict (rows as they
come, files deleted since left out), evaluate on a folder kept apart (what the head trained on left
out), and a head merged with its backbone into one ONNX classifier."""

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import featx
from featx.heads import load_head
from featx.store import near_copy_pairs


def _multilabel_tags(key: str) -> list[str]:
    """Labels a person could give a digit (its first-level folder): even/odd, 'big' (5-9), 'loop'."""
    d = int(key.split("/")[0])
    return ["even" if d % 2 == 0 else "odd"] + (["big"] if d >= 5 else []) + (["loop"] if d in (0, 6, 8, 9) else [])


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
    copied = next(r.top for r in rows if r.key == str(nine))  # the same row: the head's output, to rounding (its
    assert [c for c, _ in rows[0].top] == [c for c, _ in copied]  # batches differ, and BLAS sums them otherwise)
    assert np.allclose([p for _, p in rows[0].top], [p for _, p in copied], rtol=0, atol=1e-12)
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


def test_predict_says_when_a_folder_holds_no_image_or_its_cache_serves_nothing(digits_cache, digits_dir, lite0_onnx,
                                                                              tmp_path, caplog):
    """A wrong folder (no image in it) gave no row and no word, through a cache or without one; a --cache
    that does not exist, given with more than one folder, was left unused without a word."""
    head = tmp_path / "h.safetensors"
    featx.train_head(digits_cache, head, C=1.0)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no photos here")
    for cache in (tmp_path / "notes.h5", None):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert featx.predict([tmp_path / "notes"], head=head, model=lite0_onnx, cache=cache) == []
        assert f"{tmp_path / 'notes'}: no image files found (featx reads" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rows = featx.predict([digits_dir / "3", digits_dir / "8"], head=head, model=lite0_onnx,
                             cache=tmp_path / "new.h5")
    assert len(rows) == len(list((digits_dir / "3").iterdir())) + len(list((digits_dir / "8").iterdir()))
    assert f"{tmp_path / 'new.h5'} does not exist: the images are embedded without it, and nothing is kept" \
        in caplog.text and not (tmp_path / "new.h5").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_merged_onnx_classifier_gives_featx_probabilities(kind, digits_cache, digits_dir, lite0_onnx, tmp_path):
    import json

    import onnxruntime as ort

    from featx.data import load_image

    head = tmp_path / "h.safetensors"
    featx.train_head(digits_cache, head, head=kind, **({"C": 1.0} if kind == "logreg" else {"epochs": 20}))
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
def test_evaluate_scores_a_test_folder_as_predict_classifies_it_and_lists_its_mistakes(
        digits_dir, cache_from_digits, lite0_onnx, tmp_path, capsys, caplog):
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
    cache_from_digits(train, tmp_path / "train.h5")
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
    with caplog.at_level(logging.WARNING, logger="featx.predictions"):
        assert featx.evaluate_classifier(test, tmp_path / "old.onnx").n_test == 150
    assert "old.onnx records no pictures its classifier was trained on" in caplog.text
    # test photos deleted since: the folder is scored as it is now; the cache scored by itself leaves out
    # the rows of files its last embed found deleted (kept in it until --prune), and says so
    deleted = [p for p in sorted((test / "5").iterdir()) if f"5/{p.name}" not in near][:3]
    for path in deleted:
        path.unlink()
    assert featx.evaluate_head(test, head, cache=tmp_path / "test.h5").n_test == n - 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="featx.predictions"):
        assert featx.evaluate_head(tmp_path / "test.h5", head).n_test == n - 3
    assert f"3 rows of files deleted from {test}, or unreadable now, since they were embedded" in caplog.text
    # options that would be left unused are refused: --cache beside a cache, --cache or --labels for a model
    with pytest.raises(featx.FeatxError, match="test.h5 is not a folder but a cache itself"):
        featx.evaluate_head(tmp_path / "test.h5", head, cache=tmp_path / "other.h5")
    assert main(["-q", "evaluate", str(test), "--model", str(classifier), "--cache", str(tmp_path / "x.h5")]) == 2
    assert "--cache goes with --head" in capsys.readouterr().err
    assert not (tmp_path / "other.h5").exists() and not (tmp_path / "x.h5").exists()


@pytest.mark.slow
def test_evaluate_leaves_out_what_the_head_trained_on_classes_it_lacks_and_scores_a_part_alone(
        digits_dir, cache_from_digits, lite0_onnx, tmp_path, caplog):
    import shutil

    from featx.errors import FeatxError
    from featx.samples import write_digits_folder

    train = tmp_path / "train"  # digits 60 to 359; the test folder is the first 60
    for path in digits_dir.rglob("*.png"):
        if 60 <= int(path.stem) < 360:
            (train / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, train / path.parent.name / path.name)
    cache_from_digits(train, tmp_path / "train.h5")
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
    with caplog.at_level(logging.WARNING, logger="featx.predictions"):
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
    resized_cache = tmp_path / "resized.h5"  # embedded once, for the three evaluations of it below
    with caplog.at_level(logging.WARNING, logger="featx.predictions"):
        report = featx.evaluate_head(resized, head, cache=resized_cache)
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
    with caplog.at_level(logging.WARNING, logger="featx.predictions"):
        assert featx.evaluate_head(test, head, cache=tmp_path / "test.h5").n_test == 60
        assert featx.evaluate_head(resized, head, cache=resized_cache).n_test == 60
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
        assert featx.evaluate_head(resized, tmp_path / "old.safetensors", cache=resized_cache).n_test == 360
    assert "the head file is from before heads kept what they trained on" in caplog.text


@pytest.mark.slow
def test_evaluate_a_multilabel_head_with_the_test_folders_labels(digits_dir, digits_cache, cache_from_digits,
                                                                 lite0_onnx, tmp_path):
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
    cache_from_digits(train, cache)
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




@pytest.mark.slow
def test_readme_snippet_runs_the_exported_classifier_as_featx_does(digits_cache, digits_dir, photos_dir, lite0_onnx,
                                                                    tmp_path, capsys):
    """The README's code for running an export-classifier file with onnxruntime and Pillow alone gives
    featx's embeddings (landscape photos, a portrait one, one whose EXIF says to turn it) and, on digits
    like those the head was trained on, featx's probabilities and first class."""
    import re

    import onnxruntime as ort
    from PIL import Image

    head = tmp_path / "h.safetensors"
    featx.train_head(digits_cache, head, C=1.0)
    classifier = featx.export_classifier(lite0_onnx, head, tmp_path / "classifier.onnx")
    china = Image.open(photos_dir / "china.jpg")
    china.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "portrait.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to view
    china.save(tmp_path / "turned.jpg", quality=95, exif=exif)
    photos = [photos_dir / "coffee.png", photos_dir / "chelsea.png", tmp_path / "portrait.jpg", tmp_path / "turned.jpg"]
    digits = sorted(digits_dir.rglob("*.png"))[::400]

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### The exported classifier, without featx", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"classifier.onnx"' in snippet and '"photo.jpg"' in snippet
    embeddings = featx.embed_images(photos + digits, model=lite0_onnx)
    expected = load_head(head).head.predict_proba(embeddings)
    for image, embedding, want in zip(photos + digits, embeddings, expected):
        code = snippet.replace('"classifier.onnx"', repr(str(classifier))).replace('"photo.jpg"', repr(str(image)))
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
        printed = capsys.readouterr().out.splitlines()
        # a photo is nothing like a digit: the snippet says so, as featx classify does, on a fourth line
        assert printed[3:] == (["unlike the training images: a guess"] if image in photos else [])
        assert printed[0].split()[0] == str(scope["probabilities"].argmax())
        got = scope["session"].run(["embedding"], {"images": scope["pixels"]})[0][0]
        assert scope["cosine"] == pytest.approx(load_head(head).head.class_mean_cosine(got[None])[0], abs=1e-5)
        assert got @ embedding / np.linalg.norm(got) / np.linalg.norm(embedding) > 0.999, image.name
        if image in digits:  # a photo is far from any digit: there the head's probabilities are all or nothing
            assert np.abs(scope["probabilities"] - want).max() < 0.01, image.name
            assert printed[0].split()[0] == str(want.argmax()), image.name
    # the file's own description names its classes, not the backbone's ImageNet ones
    meta = ort.InferenceSession(str(classifier), providers=["CPUExecutionProvider"]).get_modelmeta()
    described = json.loads(meta.custom_metadata_map["featx"])
    assert described["class_names"] == [str(d) for d in range(10)]
    assert described["input"].startswith("uint8 RGB (n, 224, 224, 3)")


def test_classify_and_predict_draw_their_images_by_the_class_given(photos_dir, small_digits, lite0_onnx, tmp_path,
                                                                    capsys):
    """`--sheet PNG`: the images by the class they were given, the least sure first, where a new folder's
    errors are seen: a row per class where classes have several images (2.2 x 2.6 inches a tile at
    100 dpi), the tiles in turn where each has one or two (the sample photos, a class each). A failed
    file is left out; a picture suffix matplotlib does not write is refused before any work."""
    from PIL import Image

    from featx.cli import main

    photos = tmp_path / "photos"
    shutil.copytree(photos_dir, photos)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff cut")
    sheet = tmp_path / "classes.png"
    assert main(["classify", str(photos), "--model", str(lite0_onnx), "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"-> {sheet}" and any("espresso" in line for line in out)
    with Image.open(sheet) as img:  # six photos, six classes: one row of six
        assert img.size == (6 * 220, 260 + 50)
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 1000  # drawn photos
    head = tmp_path / "head.safetensors"
    cache = tmp_path / "digits.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, progress=False)
    featx.train_head(cache, head, C=1.0)
    rows = featx.predict([small_digits], head=head, cache=cache)
    given = {}
    for row in rows:
        given[row.top[0][0]] = given.get(row.top[0][0], 0) + 1
    assert main(["-q", "predict", str(small_digits), "--head", str(head), "--cache", str(cache), "--sheet",
                 str(sheet)]) == 0
    with Image.open(sheet) as img:  # a row per class given, as many tiles as the largest (8 at most)
        assert img.size == (min(8, max(given.values())) * 220, len(given) * 260 + 50)
    assert main(["classify", str(photos), "--model", str(lite0_onnx), "--sheet", str(tmp_path / "c.csv")]) == 2
    assert "not .csv: give e.g. classes.png" in capsys.readouterr().err
    # of a class given 30 times, the 8 least sure are drawn, the least sure first (kept as the rows pass:
    # a folder of any size is drawn in bounded memory)
    from featx.predictions import PredictionRow

    sure = np.random.default_rng(0).permutation(np.linspace(0.4, 0.99, 30))
    sheet_of = featx.ClassSheet()
    for p in sure:
        sheet_of.add(PredictionRow(str(photos / "coffee.png"), [("cup", float(p))]))
    sheet_of.add(PredictionRow(str(photos / "broken.jpg"), [], "cannot decode"))  # failed: not drawn
    assert sorted(p for _, _, p, _ in sheet_of.least_sure["cup"]) == sorted(sure)[:8]
    assert sheet_of.counts == {"cup": 30}
    # an image unlike the head's training images is less sure than any, however high its probability
    sheet_of.add(PredictionRow(str(photos / "china.jpg"), [("cup", 0.999)], unlike_training=True))
    assert max(sheet_of.least_sure["cup"])[1:] == (str(photos / "china.jpg"), 0.999, True)
    assert sorted(p for _, _, p, _ in sheet_of.least_sure["cup"]) == sorted(sure)[:7] + [0.999]
    assert sheet_of.draw(sheet)
    with Image.open(sheet) as img:
        assert img.size == (8 * 220, 260 + 50)


@pytest.mark.slow
def test_images_unlike_a_heads_training_images_are_marked_whatever_their_probability(
        digits_cache, digits_dir, photos_dir, lite0_onnx, tmp_path, capsys, caplog):
    """A head of handwritten digits calls a photo of a palace one digit, sure of it: its probabilities
    cannot say the photo is nothing it was trained on. predict marks such images (far from every class's
    mean embedding), in its lines and its CSV; the digits themselves are seldom marked. evaluate on digits
    drawn black on white (the head knows white on black) counts most of them unlike, and how each part scored."""
    from PIL import ImageOps, Image
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from featx.cli import main

    head = tmp_path / "digits.safetensors"
    report = featx.train_head(digits_cache, head, C=1.0)
    assert report.n_unlike <= 0.03 * report.n_test and "unlike the training images" in report.text()
    photos = sorted(photos_dir.iterdir())
    digits = sorted(digits_dir.rglob("*.png"))[::90]
    rows = featx.predict(photos + digits, head=head, model=lite0_onnx, output=tmp_path / "p.csv")
    assert all(r.unlike_training for r in rows[:len(photos)])
    assert max(r.top[0][1] for r in rows[:len(photos)]) > 0.95  # the head is sure all the same
    assert sum(r.unlike_training for r in rows[len(photos):]) <= 1
    loaded = load_head(head)
    assert all(r.class_mean_cosine < loaded.head.typical_cosine_ for r in rows[:len(photos)])
    assert f"marks images unlike its training images (cosine to the nearest class mean under " \
           f"{loaded.head.typical_cosine_:.3f})" in loaded.summary()
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["unlike_training"] for t in table] == [str(r.unlike_training).lower() for r in rows]
    assert [float(t["class_mean_cosine"]) for t in table] == pytest.approx([r.class_mean_cosine for r in rows],
                                                                            abs=1e-4)
    assert main(["predict", str(photos_dir / "china.jpg"), str(digits[0]), "--head", str(head), "-q"]) == 0
    china, digit, count = capsys.readouterr().out.splitlines()
    assert china.endswith("(unlike the training images: a guess)") and "unlike" not in digit
    assert count == f"1 image(s) unlike the training images, their classes guesses (e.g. {photos_dir / 'china.jpg'})"
    # a head saved before heads kept their class means: nothing is marked, the columns stay empty, it is said
    with safe_open(str(head), framework="numpy") as f:
        header, arrays = json.loads(f.metadata()["featx"]), {k: f.get_tensor(k) for k in f.keys()}
    del arrays["class_means"], header["typical_cosine"], header["tensors_sha256"]
    save_file(arrays, str(tmp_path / "old.safetensors"), metadata={"featx": json.dumps(header)})
    with caplog.at_level(logging.INFO, logger="featx.predictions"):
        old = featx.predict(photos[:1], head=tmp_path / "old.safetensors", model=lite0_onnx,
                            output=tmp_path / "old.csv")
    assert old[0].unlike_training is None and "saved before featx kept its class means" in caplog.text
    with open(tmp_path / "old.csv") as f:
        assert next(csv.DictReader(f))["unlike_training"] == ""
    # black on white: the head's accuracy falls, and evaluate says most of them are unlike what it knows
    inverted = tmp_path / "inverted"
    for path in sorted(digits_dir.rglob("*.png"))[::6]:
        (inverted / path.parent.name).mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(path).convert("L")).save(inverted / path.parent.name / path.name)
    shifted = featx.evaluate_head(inverted, head)
    assert shifted.n_unlike > 0.5 * shifted.n_test and shifted.accuracy < report.accuracy - 0.1
    assert f"{shifted.n_unlike} of the {shifted.n_test} images are unlike the training images" in shifted.text()
    # the head merged with its backbone into one file marks the same images, in classify and in evaluate
    classifier = featx.export_classifier(lite0_onnx, head, tmp_path / "classifier.onnx")
    assert featx.read_model_info(classifier).typical_cosine == pytest.approx(loaded.head.typical_cosine_)
    classified = featx.classify(photos + digits, model=classifier, top=1, output=tmp_path / "c.csv")
    assert [c.unlike_training for c in classified] == [r.unlike_training for r in rows]
    assert [c.class_mean_cosine for c in classified] == pytest.approx([r.class_mean_cosine for r in rows], abs=1e-4)
    with open(tmp_path / "c.csv") as f:
        assert [t["unlike_training"] for t in csv.DictReader(f)] == [str(r.unlike_training).lower() for r in rows]
    merged = featx.evaluate_classifier(inverted, classifier)
    assert (merged.n_test, merged.n_unlike) == (shifted.n_test, shifted.n_unlike)
    assert "; predict marks such images" in shifted.text() and "; classify marks such images" in merged.text()
    # classify with an ImageNet model has no such columns
    featx.classify(photos[:1], model=lite0_onnx, output=tmp_path / "imagenet.csv")
    with open(tmp_path / "imagenet.csv") as f:
        assert "unlike_training" not in next(csv.reader(f))
