"""Similar-image search on a real cache: the same digit drawn at another size finds itself and its class."""

import csv
import logging
import os
import shutil

import h5py
import numpy as np
import pytest

import featx
from featx.samples import write_digits_folder


@pytest.mark.slow
def test_a_redrawn_digit_finds_itself_first_and_its_class_around_it(digits_cache, digits_dir, lite0_onnx, tmp_path,
                                                                   capsys):
    # the first 30 digits again, drawn at 48 pixels instead of the cache's 32: other files, same pictures
    queries = write_digits_folder(tmp_path / "queries", size=48, limit=30)
    (queries / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    results = featx.find_similar([queries], digits_cache, k=5, model=lite0_onnx, rows_per_chunk=500)
    failed = [r for r in results if r.error]
    assert [r.query for r in failed] == [str(queries / "broken.png")] and not failed[0].matches
    found = [r for r in results if not r.error]
    assert len(found) == 30 and all(len(r.matches) == 5 for r in found)
    # the cache key of a query's own picture is its path under the folder: 3/0003.png. By cosine alone it
    # came first for 29 of the 30 (5/0015.png, at 0.950, was not among the first three); known by its
    # perceptual hash, it is the first match of every one, named as the query's picture
    own = [r.query.split("/queries/")[1] for r in found]
    assert all(r.matches[0][0] == key == r.query_picture for r, key in zip(found, own))
    same_class = [m[0].split("/")[0] == key.split("/")[0] for r, key in zip(found, own) for m in r.matches]
    assert np.mean(same_class) >= 0.6  # 0.77 measured; labels drawn at random would give 0.1
    assert all(r.matches[i][1] >= r.matches[i + 1][1] for r in found for i in range(1, 4))  # then best first
    # chunked search (500 rows a chunk) gives what one pass over the whole cache gives
    whole = featx.find_similar([queries / "3"], digits_cache, k=5, model=lite0_onnx)
    by_query = {r.query: r.matches for r in results}
    assert all([k for k, _ in r.matches] == [k for k, _ in by_query[r.query]] for r in whole)

    from featx.cli import main

    assert main(["-q", "similar", str(queries / "3"), "--cache", str(digits_cache), "-k", "2",
                 "--model", str(lite0_onnx)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(queries / "3" / "0003.png") and len(lines) == 3 * len(list((queries / "3").iterdir()))
    assert lines[1].endswith(f"  {digits_dir.resolve() / '3' / '0003.png'}  (same picture as the query)")


def test_a_cache_of_another_model_is_refused_with_its_fingerprints(digits_cache, lite0_onnx, tmp_path, photos_dir,
                                                                    caplog):
    other = tmp_path / "other.h5"
    shutil.copy(digits_cache, other)
    with h5py.File(other, "r+") as f:
        (group,) = [g for g in f.values() if "fingerprint" in g.attrs]
        group.attrs["fingerprint"] = "0123456789abcdef"
    with pytest.raises(featx.FeatxError, match="nope.h5 does not exist"):  # before any model loads
        featx.find_similar([photos_dir / "coffee.png"], tmp_path / "nope.h5", model="resnet18",
                           weights=str(tmp_path / "never-loaded.pth"))
    mine = featx.read_model_info(lite0_onnx).fingerprint
    with pytest.raises(featx.FeatxError, match=f"holds no embeddings of .*{mine}.*0123456789abcdef.*--model"):
        featx.find_similar([photos_dir / "coffee.png"], other, model=lite0_onnx)
    # a cache of two models, without --model: the default backbone's is searched, and that is said
    both = tmp_path / "both.h5"
    shutil.copy(digits_cache, both)
    with h5py.File(both, "r+") as f:
        f.copy("efficientnet_lite0", "resnet50")
        f["resnet50"].attrs["fingerprint"] = "0123456789abcdef"
    with caplog.at_level(logging.WARNING, logger="featx.search"):
        (found,) = featx.find_similar([photos_dir / "coffee.png"], both, k=1)
    assert found.matches and "holds 2 models (efficientnet_lite0, resnet50): searching efficientnet_lite0's" \
        in caplog.text
    with pytest.raises(featx.FeatxError) as refused:  # a group it lacks: the ones it has, as names
        featx.load_embeddings(both, "vgg16")
    assert str(refused.value) == f"{both} has no embeddings for model 'vgg16'; it has efficientnet_lite0, resnet50 " \
        "(--model names one)"


def test_copies_of_a_match_are_listed_with_it_not_as_further_matches(small_digits, lite0_onnx, tmp_path, capsys):
    """The same photo in three folders is one match (its other paths named beside it), and so is the same
    picture saved again larger (other bytes, a near copy), so the k matches are k different pictures."""
    from PIL import Image

    seven = sorted((small_digits / "7").iterdir())[0]
    for folder in ("1", "4"):
        shutil.copy(seven, small_digits / folder / f"copy of {seven.name}")
    resized = f"2/resized {seven.name}"
    Image.open(seven).resize((48, 48)).save(small_digits / resized)
    cache = tmp_path / "c.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    paths = {f"7/{seven.name}", f"1/copy of {seven.name}", f"4/copy of {seven.name}"}
    seven = shutil.copy(seven, tmp_path / "query.png")  # from outside the folder: every cached path matches
    (result,) = featx.find_similar([seven], cache, k=4, model=lite0_onnx, rows_per_chunk=16)
    top, similarity = result.matches[0]
    assert top in paths and similarity > 0.999 and set(result.copies[top]) == paths - {top}
    assert result.near_copies == {top: [resized]}
    data = featx.load_embeddings(cache)
    digests = [data.digests[data.keys.index(key)] for key, _ in result.matches]
    assert len(result.matches) == 4 == len(set(digests)) and not paths & {key for key, _ in result.matches[1:]}
    assert resized not in {key for key, _ in result.matches}
    # printed as paths to open: the cache's folder joined to the keys
    folder = os.path.realpath(small_digits)
    line = result.text().splitlines()[1]
    assert line.startswith(f"  {similarity:.3f}  {os.path.join(folder, top)}  (same picture as the query)  (same file: ")
    assert f"(same file: {', '.join(os.path.join(folder, k) for k in result.copies[top])})" in line
    assert line.endswith(f"  (same picture: {os.path.join(folder, resized)})")
    assert all(os.path.isfile(os.path.join(folder, key)) for key, _ in result.matches)
    whole = featx.find_similar([seven], cache, k=4, model=lite0_onnx)[0]  # one chunk: the same answer
    assert (whole.matches, whole.copies, whole.near_copies) == (result.matches, result.copies, result.near_copies)
    # as a CSV (`featx similar ... -o`): a row per match with its files, and a row for a query not read
    from featx.cli import main

    table = tmp_path / "similar.csv"
    assert main(["-q", "similar", str(seven), str(tmp_path / "gone.png"), "--cache", str(cache), "-k", "4",
                 "--model", str(lite0_onnx), "-o", str(table)]) == 1
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["query"], r["rank"], r["match"]) for r in rows[:4]] == [
        (str(seven), str(rank), os.path.join(folder, key)) for rank, (key, _) in enumerate(result.matches, start=1)]
    assert all(abs(float(r["similarity"]) - sim) < 1e-6 for r, (_, sim) in zip(rows, result.matches))
    assert rows[0]["same_file"].split(";") == [os.path.join(folder, k) for k in result.copies[top]]
    assert rows[0]["same_picture"] == os.path.join(folder, resized) and not rows[1]["same_file"]
    assert rows[4]["query"] == str(tmp_path / "gone.png") and "no such file" in rows[4]["error"] and len(rows) == 5
    # --min-similarity: the matches at least that similar, a query with none left out of the printed list
    cut = (result.matches[0][1] + result.matches[1][1]) / 2
    (closest,) = featx.find_similar([seven], cache, k=4, model=lite0_onnx, min_similarity=cut)
    assert closest.matches == result.matches[:1] and closest.copies == result.copies
    noise = tmp_path / "noise.png"  # a picture like no digit
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    assert featx.find_similar([noise], cache, k=1, model=lite0_onnx)[0].matches[0][1] < cut
    capsys.readouterr()
    assert main(["-q", "similar", str(seven), str(noise), "--cache", str(cache), "-k", "4", "--model",
                 str(lite0_onnx), "--min-similarity", f"{cut:.6f}"]) == 0
    got = capsys.readouterr().out.splitlines()  # the noise's line left out; the copies of one file tie in any order
    assert got[0] == str(seven) and len(got) == 3 and all(os.path.join(folder, key) in got[1] for key in paths)
    assert got[2] == f"1 of 2 queries have a match of cosine {float(f'{cut:.6f}'):g} or more"
    # files deleted from the folder (their rows stay until embed --prune) are no longer named: the next
    # picture takes the freed place
    (small_digits / resized).unlink()
    second = result.matches[1][0]
    (small_digits / second).unlink()
    after = featx.find_similar([seven], cache, k=4, model=lite0_onnx, rows_per_chunk=16)[0]
    assert after.matches[0] == result.matches[0] and after.copies == result.copies and not after.near_copies
    assert [key for key, _ in after.matches[1:3]] == [key for key, _ in result.matches[2:4]]
    assert second not in {key for key, _ in after.matches} and len(after.matches) == 4
    # the cache read where its folder is not (another machine): the keys are all it has, none is left out
    small_digits.rename(tmp_path / "elsewhere")
    away = featx.find_similar([seven], cache, k=4, model=lite0_onnx)[0]
    assert away.near_copies == result.near_copies and away.matches == result.matches
    # ... but the files an embed found deleted, which the cache records, are left out there too
    (tmp_path / "elsewhere").rename(small_digits)
    featx.embed_folder(small_digits, cache, model=lite0_onnx)
    small_digits.rename(tmp_path / "elsewhere")
    away = featx.find_similar([seven], cache, k=4, model=lite0_onnx)[0]
    assert away.matches == after.matches and not away.near_copies


def test_a_match_names_every_file_of_its_picture_however_low_they_rank(small_digits, lite0_onnx, tmp_path):
    """A digit saved again much smaller, or blurred, scores far below other digits against a query (rank
    30 to 60 of 63 here): those files were named beside their picture's match only where they ranked
    above the k-th picture, so a search read whole named none of them and one read in chunks of 16 some.
    Found by perceptual hash, as the query's own picture is, a match names them all, however read."""
    from PIL import Image, ImageFilter

    seven = sorted((small_digits / "7").iterdir())[0]
    with Image.open(seven) as picture:
        picture.resize((8, 8)).save(small_digits / "2" / "small 8.png")
        picture.resize((12, 12)).save(small_digits / "2" / "small 12.png")
        picture.filter(ImageFilter.GaussianBlur(1.5)).save(small_digits / "3" / "blurred.png")
    cache = tmp_path / "c.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0, progress=False)
    query = sorted((small_digits / "7").iterdir())[-1]  # another seven, from the cached folder
    (wide,) = featx.find_similar([query], cache, k=60, model=lite0_onnx)
    k = [key for key, _ in wide.matches].index(f"7/{seven.name}") + 1
    for rows_per_chunk in (16, 16384):
        (found,) = featx.find_similar([query], cache, k=k, model=lite0_onnx, rows_per_chunk=rows_per_chunk)
        assert found.matches[-1][0] == f"7/{seven.name}" and len(found.matches) == k
        assert sorted(found.near_copies[f"7/{seven.name}"]) == ["2/small 12.png", "2/small 8.png", "3/blurred.png"]


def test_a_picture_with_hundreds_of_copies_is_one_match_naming_them_all(small_digits, lite0_onnx, tmp_path):
    """A search sorts only about the best 150 rows of a chunk for a query (sorting all of them was most
    of its time); 300 copies of one file tie at the top, past that: all are still one match, listed
    beside it, and the next two pictures follow, as when every chunk is sorted whole (16 rows a chunk)."""
    seven = sorted((small_digits / "7").iterdir())[0]
    (small_digits / "dup").mkdir()
    for i in range(300):
        shutil.copy(seven, small_digits / "dup" / f"{i:03d}.png")
    cache = tmp_path / "c.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    query = shutil.copy(seven, tmp_path / "query.png")
    (found,) = featx.find_similar([query], cache, k=3, model=lite0_onnx)
    top = found.matches[0][0]
    assert top == f"7/{seven.name}" and len(found.copies[top]) == 300 and len(found.matches) == 3
    (sorted_whole,) = featx.find_similar([query], cache, k=3, model=lite0_onnx, rows_per_chunk=16)
    assert (found.matches, found.copies) == (sorted_whole.matches, sorted_whole.copies)


def test_a_query_from_the_cached_folder_is_not_its_own_match_and_is_not_decoded_again(small_digits, lite0_onnx,
                                                                                       tmp_path):
    """"More like this one" from the collection itself: its own row would come first at 1.000, so it is
    left out, while a copy of it elsewhere in the folder is still a match (named as the same picture).
    An unchanged file's stored embedding serves: here a file made unreadable with its size and mtime kept
    is still searched (as embed would skip it), while a changed one is decoded again and fails."""
    import os

    nine = sorted((small_digits / "9").iterdir())
    shutil.copy(nine[0], small_digits / "2" / "copy.png")
    cache = tmp_path / "c.h5"
    featx.embed_folder(small_digits, cache, model=lite0_onnx, engine="onnx", workers=0)
    outside = shutil.copy(nine[0], tmp_path / "query.png")
    mine, copy, from_outside = featx.find_similar([nine[0], small_digits / "2" / "copy.png", outside], cache, k=3,
                                                  model=lite0_onnx, rows_per_chunk=16)
    assert mine.matches[0][0] == "2/copy.png" and mine.matches[0][1] > 0.999 and not mine.copies
    assert copy.matches[0][0] == f"9/{nine[0].name}" and copy.matches[0][1] > 0.999
    assert f"9/{nine[0].name}" not in {key for key, _ in mine.matches}
    assert {from_outside.matches[0][0], *from_outside.copies[from_outside.matches[0][0]]} == {
        f"9/{nine[0].name}", "2/copy.png"}
    # with the default chunk size, the same answers
    whole = featx.find_similar([nine[0]], cache, k=3, model=lite0_onnx)[0]
    assert [key for key, _ in whole.matches] == [key for key, _ in mine.matches]

    stat = nine[1].stat()
    nine[1].write_bytes(b"\0" * stat.st_size)  # unreadable now, but size and mtime as embedded
    os.utime(nine[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    nine[2].write_bytes(b"\0" * nine[2].stat().st_size)  # changed: its mtime moved on
    kept, changed = featx.find_similar([nine[1], nine[2]], cache, k=2, model=lite0_onnx)
    assert kept.error is None and len(kept.matches) == 2 and f"9/{nine[1].name}" not in dict(kept.matches)
    assert changed.error and "not an image" in changed.error


def test_a_cache_and_its_heads_find_the_model_they_were_made_with(small_digits, tmp_path, photos_dir, capsys):
    """Embedded with another backbone than the default (here random-weight MobileNetV3, exported to a
    folder of the user's), similar, predict and export-classifier take that model without --model: the
    cache records its file and the head carries it on. Given --model, a mismatch is still refused."""
    from featx.cli import main

    model = featx.ensure_model_file("mobilenetv3_small_050", weights="none", models_dir=tmp_path / "mine")
    cache, head = tmp_path / "c.h5", tmp_path / "h.safetensors"
    featx.embed_folder(small_digits, cache, model=model, workers=0)
    featx.train_head(cache, head, head="logreg", C=1.0)
    queries = sorted((small_digits / "4").iterdir())[:2]

    found = featx.find_similar([shutil.copy(q, tmp_path / q.name) for q in queries], cache, k=1)
    assert [r.matches[0][0] for r in found] == [f"4/{q.name}" for q in queries]  # each finds its original
    rows = featx.predict(queries, head=head)
    expected = featx.predict(queries, head=head, model=model)
    assert [r.top for r in rows] == [r.top for r in expected] and all(r.error is None for r in rows)
    assert main(["-q", "export-classifier", "--head", str(head), "-o", str(tmp_path / "clf.onnx")]) == 0
    # what a user needs to run the file without featx: its input as the backbone takes it, its outputs
    said = capsys.readouterr().out.strip()
    info = featx.read_model_info(tmp_path / "clf.onnx")
    (h, w), pre = info.preprocess.input_size, info.preprocess
    assert said == (f"{tmp_path / 'clf.onnx'}: input 'images', uint8 RGB (n, {h}, {w}, 3): each photo resized "
                    f"({pre.interpolation}) so its shorter side is {pre.resize_size}, then centre-cropped to {h}x{w} "
                    f"-> 'probabilities' (n, 10), 'embedding' (n, {info.embed_dim}), 'class_mean_cosine' (n,): "
                    f"under {info.typical_cosine:.3f} (metadata 'featx_typical_cosine') an image is unlike the "
                    "head's training images; class names in metadata 'featx_classes' (README: \"The exported "
                    "classifier, without featx\")"), said
    assert featx.read_model_info(tmp_path / "clf.onnx").backbone == "mobilenetv3_small_050"
    other = featx.ensure_model_file("test_efficientnet", weights="none", models_dir=tmp_path / "mine")
    with pytest.raises(featx.HeadMismatchError):
        featx.predict(queries, head=head, model=other)


def _cache_its_head_and_a_copy(folder, model, tmp_path):
    """``folder`` embedded, a head trained on it, and a copy of the cache to damage."""
    cache, head, copy = tmp_path / "c.h5", tmp_path / "h.safetensors", tmp_path / "damaged.h5"
    featx.embed_folder(folder, cache, model=model, engine="onnx", workers=0)
    featx.train_head(cache, head, C=1.0)
    shutil.copy(cache, copy)
    return cache, head, copy


def test_a_cached_embedding_that_is_not_finite_is_embedded_again_or_left_out_and_said(small_digits, lite0_onnx,
                                                                                     tmp_path, caplog):
    """A damaged cache holding NaN in one row and infinity in another (the rows HDF5 reads back fine):
    `similar` gave a query whose stored row is NaN no match at all, silently, and `predict` raised
    scikit-learn's traceback. Now a query's damaged row is embedded again from its file, damaged rows
    are no match for anything, a folder's prediction marks those two files failed, and each is said."""
    import logging

    from featx.predictions import NOT_FINITE

    cache, head, damaged = _cache_its_head_and_a_copy(small_digits, lite0_onnx, tmp_path)
    with h5py.File(damaged, "r+") as f:
        (group,) = [g for g in f.values() if "fingerprint" in g.attrs]
        keys = [k.decode() for k in group["keys"][:]]
        nan_key, inf_key, model = keys[0], keys[7], group.name[1:]
        group["embeddings"][0] = np.nan
        group["embeddings"][7] = np.inf
    query = small_digits / nan_key
    (clean,) = featx.find_similar([query], cache, k=4, model=lite0_onnx)
    with caplog.at_level(logging.WARNING):
        (found,) = featx.find_similar([query], damaged, k=3, model=lite0_onnx)
    assert found.error is None
    assert [key for key, _ in found.matches] == [key for key, _ in clean.matches if key != inf_key][:3]
    assert np.allclose([s for _, s in found.matches], [s for k, s in clean.matches if k != inf_key][:3], atol=1e-4)
    assert f"1 stored embedding(s) of {model} are not finite numbers" in caplog.text
    assert f"2 stored embedding(s) are not finite numbers (NaN or infinity), e.g. that of {nan_key}: left out" \
        in caplog.text

    (row,) = featx.predict([query], head=head, cache=damaged)
    assert row.error is None and row.top[0][0] == featx.predict([query], head=head, cache=cache)[0].top[0][0]
    rows = {r.key: r for r in featx.predict([small_digits], head=head, cache=damaged)}
    expected = {r.key: r for r in featx.predict([small_digits], head=head, cache=cache)}
    assert rows.keys() == expected.keys()
    bad = {str(small_digits / nan_key), str(small_digits / inf_key)}
    assert {k for k, r in rows.items() if r.error} == bad and all(rows[k].error == NOT_FINITE for k in bad)
    for key in rows.keys() - bad:  # the head ran on the rows left: the same classes, probabilities to rounding
        assert [c for c, _ in rows[key].top] == [c for c, _ in expected[key].top]
        assert np.allclose([p for _, p in rows[key].top], [p for _, p in expected[key].top], atol=1e-6)


def test_rows_whose_checksum_fails_are_searched_past_as_damaged_rows_are(small_digits, lite0_onnx, tmp_path, capsys,
                                                                        monkeypatch, change_a_stored_byte):
    """A chunk of a cache whose bytes changed on disk fails its checksum, and reading it failed the whole
    search. `similar` and `predict` take its rows as damaged, as rows holding NaN: a query of one of them
    is embedded again from its file, the others are searched, a folder's prediction marks them failed, and
    it is said; train-head, which fits on every row, refuses the file in one line."""
    import featx.store
    from featx.cli import main
    from featx.predictions import NOT_FINITE

    monkeypatch.setattr(featx.store, "CHUNK_ROWS", 16)  # 60 digits in four chunks, of which one is damaged
    cache, head, damaged = _cache_its_head_and_a_copy(small_digits, lite0_onnx, tmp_path)
    change_a_stored_byte(damaged, row=20, column=5)
    keys = featx.load_embeddings(cache).keys
    lost = set(keys[16:32])  # the chunk of row 20
    query = small_digits / keys[20]
    (clean,) = featx.find_similar([query], cache, k=60, model=lite0_onnx)
    capsys.readouterr()
    assert main(["similar", str(query), "--cache", str(damaged), "-k", "5", "--model", str(lite0_onnx)]) == 0
    assert f"{damaged}: 16 row(s) of efficientnet_lite0/embeddings fail their checksum (bytes changed on disk " \
           f"after featx wrote them): taken as damaged; `featx embed FOLDER -o {damaged} --repair` embeds the " \
           "damaged rows again, or embed into a new file" in capsys.readouterr().err
    (found,) = featx.find_similar([query], damaged, k=5, model=lite0_onnx)
    expected = [(key, cosine) for key, cosine in clean.matches if key not in lost][:5]
    assert found.error is None and [key for key, _ in found.matches] == [key for key, _ in expected]
    assert np.allclose([c for _, c in found.matches], [c for _, c in expected], atol=1e-4)  # embedded again
    rows = {r.key: r for r in featx.predict([small_digits], head=head, cache=damaged)}
    assert {k for k, r in rows.items() if r.error} == {str(small_digits / key) for key in lost}
    assert all(r.error == NOT_FINITE for r in rows.values() if r.error)
    assert main(["-q", "train-head", str(damaged), "--C", "1", "-o", str(tmp_path / "h2.safetensors")]) == 2
    assert "a checksum of its stored data does not match" in capsys.readouterr().err


def test_a_photos_small_copy_is_its_first_match_whatever_its_cosine(photos_dir, lite0_onnx, tmp_path, capsys):
    """A photo saved again at a sixth of its size is the same picture, but its embedding moves far: on 21
    real photos the cosine of such a copy ranged from 0.36 to 0.99 (benchmarks/near_copies.py), so a
    search by cosine ranked it anywhere, and `--min-similarity 0.95`, the way to find a folder's near
    duplicates, left it out. Known by its perceptual hash, it is the query's first match, named so."""
    from PIL import Image

    from featx.cli import main

    folder = tmp_path / "photos"
    shutil.copytree(photos_dir, folder)
    with Image.open(folder / "china.jpg") as china:
        china.resize((china.width // 6, china.height // 6), Image.LANCZOS).save(folder / "small china.png")
    cache = tmp_path / "c.h5"
    featx.embed_folder(folder, cache, model=lite0_onnx, progress=False)
    (found,) = featx.find_similar([folder / "china.jpg"], cache, k=1, model=lite0_onnx, min_similarity=0.95)
    ((key, similarity),) = found.matches
    assert key == found.query_picture == "small china.png" and similarity < 0.95, found.matches
    # from outside the folder: its file there is the picture's first file, the small copy named beside it
    outside = shutil.copy(folder / "china.jpg", tmp_path / "query.jpg")
    (found,) = featx.find_similar([outside], cache, k=1, model=lite0_onnx, min_similarity=0.95)
    assert found.matches[0][0] == found.query_picture == "china.jpg"
    assert found.near_copies == {"china.jpg": ["small china.png"]}
    (chelsea,) = featx.find_similar([folder / "chelsea.png"], cache, k=2, model=lite0_onnx)  # not its picture
    assert chelsea.query_picture is None and len(chelsea.matches) == 2
    # the folder against itself: the two files of the picture find each other, nothing else is that close
    table = tmp_path / "near.csv"
    sheet = tmp_path / "near.png"
    assert main(["similar", str(folder), "--cache", str(cache), "--min-similarity", "0.95", "--model",
                 str(lite0_onnx), "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[-1] for line in out[1:4:2]] == ["(same picture as the query)"] * 2, out
    assert out[-2] == ("0 of 7 queries have a match of cosine 0.95 or more; 2 more only their own picture under "
                       "another file, at a lower cosine (resized or re-encoded)")
    # drawn too: the two queries with a match, a row each of the query and its match (2.2 x 2.6 inches a
    # tile at 100 dpi), the files' own pixels
    assert out[-1] == f"-> {sheet}"
    with Image.open(sheet) as img:
        assert img.size == (2 * 220, 2 * 260 + 50)
        drawn = np.asarray(img.convert("RGB"))
    assert len(np.unique(drawn.reshape(-1, 3), axis=0)) > 1000  # photos, not blank or grey tiles
    # a sheet of every query and its 3 matches: 7 rows of 4 tiles; none where no query has a match
    results = featx.find_similar([folder], cache, k=3, model=lite0_onnx, sheet=sheet)
    with Image.open(sheet) as img:
        assert img.size == (4 * 220, 7 * 260 + 50) and all(len(r.matches) == 3 for r in results)
    sheet.unlink()
    featx.find_similar([folder / "coffee.png"], cache, k=3, model=lite0_onnx, sheet=sheet, min_similarity=0.99)
    assert not sheet.exists()
    assert main(["-q", "similar", str(folder / "small china.png"), "--cache", str(cache), "-k", "2", "--model",
                 str(lite0_onnx), "-o", str(table)]) == 0
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(os.path.basename(r["match"]), r["query_picture"]) for r in rows][0] == ("china.jpg", "yes")
    assert rows[1]["query_picture"] == "" and len(rows) == 2


def test_look_alikes_through_torch_join_the_rows_numpy_joins(digits_cache):
    """On a GPU `similar --groups` takes its dot products to torch; here torch on the CPU, against numpy (the
    CPU's way) on the 1,797 real digits' embeddings: the same groups and each row's same highest cosine, at
    a cosine no pair lies within 1e-6 of (the two libraries' float sums differed by up to 5e-7)."""
    from featx.search import _alike_components
    from featx.store import unit_rows

    E = unit_rows(featx.load_embeddings(digits_cache).embeddings)
    sims = np.triu(E @ E.T, k=1)
    threshold = next(t for t in np.arange(0.95, 0.96, 0.0001) if not (np.abs(sims - t) < 1e-6).any())
    same = np.arange(len(E))
    same[1] = same[0]  # two rows of one picture: joined whatever their cosine, not a pair of pictures
    ways = {library: _alike_components(E, float(threshold), False, same, "cpu", library)
            for library in ("numpy", "torch")}
    (numpy_groups, numpy_nearest), (torch_groups, torch_nearest) = ways["numpy"], ways["torch"]
    assert 50 < len(set(numpy_groups)) < len(E) - 50  # groups of several rows, and rows alike no other
    assert numpy_groups[0] == numpy_groups[1]
    # the same partition of the rows, whatever each group's number
    assert len(set(zip(numpy_groups, torch_groups))) == len(set(numpy_groups)) == len(set(torch_groups))
    assert np.isfinite(numpy_nearest).sum() > 100 and np.allclose(numpy_nearest, torch_nearest, atol=1e-6)


def test_groups_print_each_look_alike_picture_and_its_files_once(photos_dir, lite0_onnx, tmp_path, capsys):
    """`similar FOLDER --cache` of the folder itself lists each look-alike pair under both of its files; --groups
    names every picture alike another, and every picture stored twice, once: the edited photos with their
    original, a resized copy and a copy of the bytes beside the picture they show. Every file is compared:
    the coffee photo's first file in the folder is its third-size copy, at cosine 0.75 to the edits, and
    its original joins it to them."""
    from PIL import Image, ImageEnhance

    from featx.cli import main

    folder = tmp_path / "photos"
    shutil.copytree(photos_dir, folder)
    coffee, chelsea = Image.open(folder / "coffee.png"), Image.open(folder / "chelsea.png")
    w, h = coffee.size
    coffee.crop((w // 10, h // 20, w, h)).save(folder / "coffee_crop.png")  # alike, not the same picture by hash
    coffee.transpose(Image.FLIP_LEFT_RIGHT).save(folder / "coffee_mirror.png")
    (folder / "a_small").mkdir()
    coffee.resize((w // 3, h // 3)).save(folder / "a_small" / "coffee.jpg", quality=90)  # the same picture
    shutil.copy(folder / "chelsea.png", folder / "chelsea_copy.png")
    ImageEnhance.Brightness(chelsea).enhance(1.4).save(folder / "chelsea_bright.png")
    cache = tmp_path / "photos.h5"
    featx.embed_folder(folder, cache, model=lite0_onnx, engine="onnx", workers=1)

    groups = featx.look_alike_groups(cache)
    path = {name: str(folder / name) for name in ("coffee.png", "coffee_crop.png", "coffee_mirror.png",
                                                  "a_small/coffee.jpg", "chelsea.png", "chelsea_copy.png",
                                                  "chelsea_bright.png")}
    assert [[group.path_of(key) for key, _ in group.pictures] for group in groups] == [
        [path["a_small/coffee.jpg"], path["coffee_crop.png"], path["coffee_mirror.png"]], [path["chelsea.png"]]]
    coffee_group, chelsea_group = groups
    assert chelsea_group.copies == {"chelsea.png": ["chelsea_copy.png"]}
    assert chelsea_group.near_copies == {"chelsea.png": ["chelsea_bright.png"]}
    assert coffee_group.near_copies == {"a_small/coffee.jpg": ["coffee.png"]} and not coffee_group.copies
    assert all(0.85 <= similarity <= 1 for _, similarity in coffee_group.pictures)
    # the other four photos are alike none (distinct photos: cosine 0.30 at most) and stored once; alike
    # none, a picture stored twice is still a group, of one
    strict = featx.look_alike_groups(cache, min_similarity=0.999)
    assert [[key for key, _ in group.pictures] for group in strict] == [["a_small/coffee.jpg"], ["chelsea.png"]]
    assert strict[1] == chelsea_group and strict[0].near_copies == coffee_group.near_copies

    table = tmp_path / "groups.csv"
    assert main(["-q", "similar", "--groups", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert all(out.count(p) == 1 for p in path.values()) and "astronaut" not in out  # each file once
    assert out.splitlines()[-1].startswith("1 group of pictures alike at cosine 0.85 or more (3 pictures), 1 more")
    assert main(["-q", "similar", "--groups", "--cache", str(cache), "-o", str(table)]) == 0
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["group"], r["picture"], r["same_file"], r["same_picture"]) for r in rows] == [
        ("1", path["a_small/coffee.jpg"], "", path["coffee.png"]),
        ("1", path["coffee_crop.png"], "", ""), ("1", path["coffee_mirror.png"], "", ""),
        ("2", path["chelsea.png"], path["chelsea_copy.png"], path["chelsea_bright.png"])]
    assert main(["-q", "similar", str(folder), "--groups", "--cache", str(cache)]) == 2
    assert "give no query images" in capsys.readouterr().err
    # searched against its own cache, the folder lists each look-alike pair under both files: said, with --groups
    assert main(["-q", "similar", str(folder), "--cache", str(cache), "--min-similarity", "0.9"]) == 0
    out = capsys.readouterr().out
    assert out.count(path["coffee_crop.png"]) == 3  # a query itself; a match of the coffee photo and of its mirror
    assert out.splitlines()[-1] == ("a folder searched against its own cache lists each pair under both files: "
                                    f"`featx similar --groups --cache {cache}` prints each group once")
    # `info` of a folder of photos (no classes) says what it holds twice, and where to look
    assert main(["info", str(cache)]) == 0
    assert ("1 of them is a picture stored more than once (3 files: the same bytes, or resized or re-encoded): "
            f"--copies names them; `featx similar --groups --cache {cache}`") in capsys.readouterr().out
