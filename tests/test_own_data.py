"""Your own data set (data.source folder, dico.own_data): three captions formats give one split file,
read like COCO's; the split rule of docs/own_data.md, checked against a re-implementation from its
text; adding images moves no old image (fractions); every bad input named with its file, entry and fix.
The whole DAG runs on such a folder in tests/test_workstation.py (one DAG run shared with the GPU slots)."""
import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dico import config as C
from dico.data import SPLITS, load_split, normalise_karpathy
from dico.io import InputError, read_json
from dico.own_data import assign_splits, prepare_folder
from own_data import export_demo_as_folder, write_captions
from worlds import run_dico

ROOT = Path(__file__).resolve().parents[1]
N = 40
DEMO_MODELS = {"clip_models": {"clip": {"source": "demo"}, "pac": {"source": "demo"}}, "features": {"backbone": "clip"}}


# -- the rule of docs/own_data.md, written again from its text ---------------------------------------
def u_of(name: str) -> float:
    """sha256 of "dico-own-data-v1:" + the name (UTF-8), first 8 bytes big-endian, over 2**64."""
    return int(hashlib.sha256(("dico-own-data-v1:" + name).encode()).hexdigest()[:16], 16) / 2**64


def reference_splits(names, val, test) -> dict[str, str]:
    if isinstance(val, int):  # counts: the `test` names of smallest u, then `val` more, the rest train
        ranked = sorted(names, key=lambda n: (u_of(n), n))
        return {n: "test" if i < test else "val" if i < test + val else "train" for i, n in enumerate(ranked)}
    out = {}
    for n in names:  # fractions: thresholds on u
        out[n] = "test" if u_of(n) < test else ("val" if u_of(n) < test + val else "train")
    return out


def splits_of(path) -> dict[str, str]:
    """{file: split} of a split file."""
    return {r["file"]: s for s, recs in read_json(path)["splits"].items() for r in recs}


def spec(images, captions, val=0.15, test=0.15, **extra) -> dict:
    return {"images": str(images), "captions": str(captions), "name": "shapes", "val": val, "test": test,
            "max_refs": None, **extra}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The demo's images as a folder of N + N // 10 images, and their captions as {image: [captions]}."""
    root = tmp_path_factory.mktemp("own")
    images, captions = export_demo_as_folder(root, n_images=N + N // 10, fmt="json")
    return root, images, captions, read_json(captions)


@pytest.fixture
def data(shapes, tmp_path):
    """A fresh copy of N of the images (the other N // 10 kept aside) and a writer of captions files."""
    root, images, _, refs = shapes
    names = sorted(refs)[:N]
    folder = tmp_path / "images"
    folder.mkdir()
    for n in names:
        shutil.copyfile(images / n, folder / n)
    return folder, {n: refs[n] for n in names}, tmp_path


def test_csv_json_and_jsonl_give_one_split_file_split_by_the_documented_rule(data):
    folder, refs, tmp = data
    outs = []
    for fmt in ("csv", "json", "jsonl"):
        counts = prepare_folder(spec(folder, write_captions(refs, tmp / f"captions.{fmt}")), tmp / f"{fmt}.json")
        outs.append((tmp / f"{fmt}.json").read_bytes())
        assert sum(counts.values()) == N and min(counts.values()) >= 1
    assert outs[0] == outs[1] == outs[2]
    assert splits_of(tmp / "csv.json") == reference_splits(refs, 0.15, 0.15)
    for split in SPLITS:  # every caption kept, in the file's order
        assert {r.path.name: list(r.captions) for r in load_split(tmp / "csv.json", split)} == \
            {n: refs[n] for n, s in reference_splits(refs, 0.15, 0.15).items() if s == split}


def test_the_split_file_is_the_one_the_coco_path_writes_for_the_same_content(data):
    """The same images, captions and split as a Karpathy-format file through `normalise_karpathy`
    (COCO's path) give the same split file, byte for byte."""
    folder, refs, tmp = data
    prepare_folder(spec(folder, write_captions(refs, tmp / "captions.csv")), tmp / "own.json")
    own = read_json(tmp / "own.json")
    karpathy = {"dataset": "shapes", "images": [
        {"filepath": "", "filename": r["file"], "cocoid": r["image_id"], "split": s,
         "sentences": [{"raw": c} for c in r["captions"]]}
        for s in SPLITS for r in own["splits"][s]]}
    (tmp / "dataset_shapes.json").write_text(json.dumps(karpathy))
    normalise_karpathy(tmp / "dataset_shapes.json", str(folder), tmp / "coco_path.json")
    assert (tmp / "coco_path.json").read_bytes() == (tmp / "own.json").read_bytes()
    # and records are in name order, ids the documented 52 bits of the digest
    for s in SPLITS:
        files = [r["file"] for r in own["splits"][s]]
        assert files == sorted(files)
        for r in own["splits"][s]:
            digest = hashlib.sha256(("dico-own-data-v1:" + r["file"]).encode()).digest()
            assert r["image_id"] == int.from_bytes(digest[8:15], "big") >> 4


def test_adding_ten_percent_more_images_moves_no_old_image(shapes, data):
    """The folder grows by N // 10 images (and their captions): every old image keeps its split and id."""
    _, all_images, _, all_refs = shapes
    folder, refs, tmp = data
    prepare_folder(spec(folder, write_captions(refs, tmp / "before.csv")), tmp / "before.json")
    for n in set(all_refs) - set(refs):
        shutil.copyfile(all_images / n, folder / n)
    prepare_folder(spec(folder, write_captions(all_refs, tmp / "after.csv")), tmp / "after.json")
    before, after = splits_of(tmp / "before.json"), splits_of(tmp / "after.json")
    assert len(after) == N + N // 10 and all(after[n] == s for n, s in before.items())
    ids = [{r["file"]: r["image_id"] for recs in read_json(p)["splits"].values() for r in recs}
           for p in (tmp / "before.json", tmp / "after.json")]
    assert all(ids[1][n] == i for n, i in ids[0].items())
    assert after == reference_splits(all_refs, 0.15, 0.15)


names = st.lists(st.text("abcdefghij/._- éÅ", min_size=1, max_size=12), min_size=30, max_size=300, unique=True)


@settings(max_examples=60, deadline=None)
@given(names=names, val=st.floats(0.01, 0.45), test=st.floats(0.01, 0.45))
def test_fractions_are_thresholds_so_a_grown_set_keeps_every_old_split(names, val, test):
    old = names[: len(names) * 10 // 11]
    before, after = assign_splits(old, val, test), assign_splits(names, val, test)
    assert all(after[n] == s for n, s in before.items())
    assert after == reference_splits(names, val, test)


@settings(max_examples=60, deadline=None)
@given(names=names, val=st.integers(1, 10), test=st.integers(1, 10))
def test_counts_are_exact_and_old_images_only_ever_move_towards_train(names, val, test):
    """Counts: the documented weaker guarantee (docs/own_data.md): exact sizes, no old train image
    leaves train, an old image moves only from test to val / train or from val to train."""
    old = names[: len(names) * 10 // 11]
    before, after = assign_splits(old, val, test), assign_splits(names, val, test)
    assert after == reference_splits(names, val, test)
    assert [list(after.values()).count(s) for s in ("val", "test")] == [val, test]
    rank = {"test": 0, "val": 1, "train": 2}
    assert all(rank[after[n]] >= rank[s] for n, s in before.items())


# -- bad input: the file, the entry and the fix -------------------------------------------------------
def bad(spec_, tmp) -> str:
    with pytest.raises(InputError) as e:
        prepare_folder(spec_, tmp / "out.json")
    assert not (tmp / "out.json").exists()
    return str(e.value)


def csv_line(path: Path, image: str) -> int:
    """The line of the first row of `image` in a captions CSV (1 = the header)."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(image + ","))


def test_an_image_without_captions(data):
    folder, refs, tmp = data
    cap = write_captions({n: c for n, c in refs.items() if n != "000003.jpg"}, tmp / "captions.csv")
    msg = bad(spec(folder, cap), tmp)
    assert f"{folder / '000003.jpg'}: has no caption in {cap}; add captions for '000003.jpg' to captions.csv, " \
           f"or move the image out of {folder}" in msg


def test_a_caption_of_a_missing_image_and_a_name_in_the_wrong_case(data):
    folder, refs, tmp = data
    cap = write_captions({**refs, "cat.jpg": ["a cat"], "000001.JPG": ["a shape"]}, tmp / "captions.csv")
    msg = bad(spec(folder, cap), tmp)
    assert f"{cap}: line {csv_line(cap, 'cat.jpg')}: image 'cat.jpg' is not in {folder}; add the image as " \
           f"{folder / 'cat.jpg'}, or remove its captions" in msg
    assert f"line {csv_line(cap, '000001.JPG')}: image '000001.JPG' is not in {folder}; the folder has " \
           "'000001.jpg': write the name as it is (names are case-sensitive)" in msg


def test_an_unreadable_image(data):
    folder, refs, tmp = data
    (folder / "000002.jpg").write_bytes(b"<html>not found</html>")
    msg = bad(spec(folder, write_captions(refs, tmp / "captions.csv")), tmp)
    assert f"{folder / '000002.jpg'}: cannot be read as an image (" in msg and "replace the file, or remove it and " \
           "its captions" in msg


def test_an_image_named_twice(data):
    folder, refs, tmp = data
    text = json.dumps(refs)
    (tmp / "twice.json").write_text(text[:-1] + ', "000001.jpg": ["again"]}')
    msg = bad(spec(folder, tmp / "twice.json"), tmp)
    assert f"{tmp / 'twice.json'}: key '000001.jpg' appears twice in one object; keep one" in msg
    (tmp / "dot.json").write_text(text[:-1] + ', "./000001.jpg": ["again"]}')
    msg = bad(spec(folder, tmp / "dot.json"), tmp)
    assert f"{tmp / 'dot.json'}: key './000001.jpg': image '000001.jpg' is named again (first at key " \
           "'000001.jpg';" in msg and "give each image once, with all its captions in one list" in msg
    lines = write_captions(refs, tmp / "lines.jsonl").read_text() + json.dumps({"000000.jpg": ["again"]}) + "\n"
    (tmp / "lines.jsonl").write_text(lines)
    msg = bad(spec(folder, tmp / "lines.jsonl"), tmp)
    assert f"{tmp / 'lines.jsonl'}: line {N + 1}, key '000000.jpg': image '000000.jpg' is named again (first at " \
           "line 1, key '000000.jpg';" in msg


def test_two_files_whose_names_collide(data):
    folder, refs, tmp = data
    shutil.copyfile(folder / "000001.jpg", folder / "Cat.jpg")
    shutil.copyfile(folder / "000001.jpg", folder / "cat.jpg")
    msg = bad(spec(folder, write_captions({**refs, "Cat.jpg": ["x"], "cat.jpg": ["y"]}, tmp / "c.csv")), tmp)
    assert f"{folder / 'cat.jpg'}: its name collides with {folder / 'Cat.jpg'}" in msg and "rename one of the two" in msg


def test_too_few_images_for_the_splits(data):
    folder, refs, tmp = data
    cap = write_captions(refs, tmp / "captions.csv")
    assert f"{folder}: {N} images, but data.folder.val (20) + data.folder.test (20) leave none for train; lower " \
           "the counts, give fractions, or add images" in bad(spec(folder, cap, val=20, test=20), tmp)
    msg = bad(spec(folder, cap, val=0.001, test=0.2), tmp)
    assert f"{folder}: split val got none of the {N} images" in msg and "change data.folder.val (raise it), give " \
           "counts instead of fractions, or add images" in msg


def test_an_empty_caption_and_a_csv_without_its_header(data):
    folder, refs, tmp = data
    cap = write_captions(refs, tmp / "captions.csv")
    cap.write_text(cap.read_text() + "000004.jpg,  \n")
    n = len(cap.read_text().splitlines())
    assert f"{cap}: line {n}: empty caption for '000004.jpg'; write the caption, or delete the row" in \
        bad(spec(folder, cap), tmp)
    cap.write_text("\n".join(cap.read_text().splitlines()[1:]))
    assert f"{cap}: line 1: the header is '000000.jpg,a small yellow" in bad(spec(folder, cap), tmp)
    assert "not 'image,caption'; make the first line the header image,caption" in bad(spec(folder, cap), tmp)
    (tmp / "comma.csv").write_text("image,caption\n000000.jpg,a cat, asleep\n")
    assert f"{tmp / 'comma.csv'}: line 2: 3 fields, the header has 2; put a caption that holds a comma in double " \
           "quotes" in bad(spec(folder, tmp / "comma.csv"), tmp)


def test_every_problem_is_listed_at_once_through_the_command_line(data, caplog):
    folder, refs, tmp = data
    (folder / "000002.jpg").write_bytes(b"")
    cap = write_captions({**{n: c for n, c in refs.items() if n != "000003.jpg"}, "dog.jpg": ["a dog"]},
                         tmp / "captions.csv")
    cfg = tmp / "cfg.yaml"
    folder_data = {"source": "folder", "folder": {"images": str(folder), "captions": str(cap)}}
    cfg.write_text(yaml.safe_dump({"data": folder_data,
                                   **copy.deepcopy(DEMO_MODELS)}))
    code, _, log = run_dico(caplog, "prepare-splits", "--config", cfg, "--out", tmp / "splits.json")
    assert code == 1 and not (tmp / "splits.json").exists()
    assert f"data set {folder} + {cap}: 3 problem(s)" in log and "InputError" not in log
    assert all(s in log for s in ("'dog.jpg' is not in", "000003.jpg: has no caption", "000002.jpg: cannot be read"))


def test_the_config_names_what_a_folder_data_set_misses(tmp_path):
    base = copy.deepcopy(DEMO_MODELS)  # validate fills defaults in place
    folder = {"images": str(tmp_path / "nowhere"), "captions": str(tmp_path / "c.csv"), "val": 100, "test": 0.1}
    with pytest.raises(C.ConfigError) as e:
        C.validate({**base, "data": {"source": "folder", "folder": folder}})
    assert f"data.folder.images: {tmp_path / 'nowhere'} does not exist" in str(e.value)
    assert "data.folder.val (100) and data.folder.test (0.1): give both as fractions" in str(e.value)
    with pytest.raises(C.ConfigError, match="data.folder.captions: not set"):
        C.validate({**base, "data": {"source": "folder", "folder": {"images": str(tmp_path)}}})
    with pytest.raises(C.ConfigError, match="leaves no image for train"):
        C.validate({**base, "data": {"source": "folder", "folder": {"images": str(tmp_path), "captions": str(tmp_path),
                                                                    "val": 0.5, "test": 0.5}}})
    with pytest.raises(C.ConfigError, match="clip_models.clip: source demo needs data.source demo or folder"):
        C.validate({**base, "data": {"source": "karpathy"}})
    ok = C.validate({**base, "data": {"source": "folder", "folder": {"images": str(tmp_path), "captions": str(tmp_path)}}})
    assert C.folder_spec(ok)["val"] == 0.05 and C.clip_model_spec(ok, "clip")["image_size"] == 48


def test_the_folder_is_searched_by_the_pipeline_s_image_finder_without_torch(tmp_path):
    """dico.own_data lists images with dico.images' one finder (its extensions, any letter case), and the
    data step, whose env (envs/data.yaml) has no torch, imports it without torch."""
    import subprocess
    import sys

    from dico.images import IMAGE_EXTENSIONS
    from dico.own_data import Problems, scan_images

    for ext in IMAGE_EXTENSIONS + (".txt",):
        (tmp_path / f"a{ext.upper()}").write_bytes(b"")
    assert sorted(scan_images(tmp_path, Problems())) == sorted(f"a{e.upper()}" for e in IMAGE_EXTENSIONS)
    out = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; import dico.own_data"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_names_are_matched_and_hashed_in_one_unicode_form(data):
    """A name written in NFD in the captions file (macOS writes names so) is the NFC file on disk, and
    its split is the hash of the NFC name, so a copy of the folder on another system splits the same."""
    import unicodedata

    folder, refs, tmp = data
    nfc = unicodedata.normalize("NFC", "café.jpg")
    shutil.copyfile(folder / "000001.jpg", folder / nfc)
    cap = write_captions({**refs, unicodedata.normalize("NFD", "café.jpg"): ["a shape"]}, tmp / "captions.csv")
    prepare_folder(spec(folder, cap), tmp / "out.json")
    assert splits_of(tmp / "out.json") == reference_splits([*refs, nfc], 0.15, 0.15)
