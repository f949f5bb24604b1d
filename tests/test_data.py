import hashlib
import json
import random

import pytest

from dico import demo
from dico.data import load_split, normalise_karpathy
from dico.images import load_image


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo.make_demo_data(out, n_train=30, n_val=5, n_test=5, image_size=32, seed=3)
    return out


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_from_its_seed(demo_dir, tmp_path):
    demo.make_demo_data(tmp_path / "again", n_train=30, n_val=5, n_test=5, image_size=32, seed=3)
    assert _digest(demo_dir) == _digest(tmp_path / "again")
    demo.make_demo_data(tmp_path / "other", n_train=30, n_val=5, n_test=5, image_size=32, seed=4)
    assert _digest(demo_dir) != _digest(tmp_path / "other")


def test_demo_has_karpathy_schema_jpegs_and_five_varied_captions(demo_dir):
    data = json.loads((demo_dir / "dataset_demo.json").read_text())
    images = data["images"]
    assert [im["split"] for im in images].count("train") == 30
    for im in images:
        assert set(im) >= {"filepath", "filename", "imgid", "cocoid", "split", "sentids", "sentences"}
        assert len(im["sentences"]) == 5 and len({s["raw"] for s in im["sentences"]}) >= 3
        assert all(s["tokens"] and s["raw"] for s in im["sentences"])
        assert (demo_dir / "images" / im["filepath"] / im["filename"]).read_bytes()[:2] == b"\xff\xd8"  # JPEG
        assert 1 <= len(im["scene"]["shapes"]) <= 3


def test_captions_mention_the_scene_content():
    rng = random.Random(0)
    for _ in range(50):
        scene = demo.random_scene(rng)
        for c in demo.captions(scene, rng):
            for shape in scene.shapes:
                assert shape.colour in c  # every caption names every object's colour


def test_relations_follow_geometry():
    a = demo.Shape("red", "circle", "small", 0.2, 0.5)
    b = demo.Shape("blue", "square", "large", 0.8, 0.45)
    assert demo.relation(a, b) == "left" and demo.relation(b, a) == "right"
    c = demo.Shape("green", "triangle", "small", 0.5, 0.1)
    assert demo.relation(c, a) == "above"


def test_perturbation_changes_one_detail_and_keeps_grammar():
    rng = random.Random(1)
    text = "a small red circle to the left of an orange square on a white background"
    for _ in range(30):
        neg = demo.perturb_caption(text, rng)
        diff = [(x, y) for x, y in zip(text.split(), neg.split()) if x != y]
        assert 1 <= len(diff) <= 2 and len(neg.split()) == len(text.split())
        changed = [y for x, y in diff if x not in ("a", "an")]
        assert len(changed) == 1
        assert changed[0] not in ("little", "tiny") or "small" not in text  # never a synonym
        assert " a o" not in neg and " an r" not in neg and " an b" not in neg
    assert demo.perturb_caption("nothing to swap here", rng) is None


def test_normalise_karpathy_merges_restval(demo_dir, tmp_path):
    data = json.loads((demo_dir / "dataset_demo.json").read_text())
    data["images"][0]["split"] = "restval"
    src = tmp_path / "k.json"
    src.write_text(json.dumps(data))
    counts = normalise_karpathy(src, demo_dir / "images", tmp_path / "splits.json", max_refs=3)
    assert counts == {"train": 30, "val": 5, "test": 5}
    train = load_split(tmp_path / "splits.json", "train")
    assert len(train[0].captions) == 3 and train[0].path.exists()


def test_demo_scenes_survive_normalisation(demo_dir, tmp_path):
    """The split file keeps each demo image's scene (what the stand-ins' retrieval checks captions
    against); a file without scenes (COCO's) gives None."""
    data = json.loads((demo_dir / "dataset_demo.json").read_text())
    normalise_karpathy(demo_dir / "dataset_demo.json", demo_dir / "images", tmp_path / "splits.json")
    val = [im for im in data["images"] if im["split"] == "val"]
    scenes = demo.split_scenes(tmp_path / "splits.json", "val")
    assert [demo.scene_json(sc) for sc in scenes] == [im["scene"] for im in val]
    assert all(demo.describes(s["raw"], sc) for im, sc in zip(val, scenes) for s in im["sentences"])
    for im in data["images"]:
        del im["scene"]
    (tmp_path / "coco.json").write_text(json.dumps(data))
    normalise_karpathy(tmp_path / "coco.json", demo_dir / "images", tmp_path / "coco_splits.json")
    assert demo.split_scenes(tmp_path / "coco_splits.json", "val") is None


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["images"][2].pop("filename"), r"images\[2\]: missing key 'filename'"),
    (lambda d: d["images"][1].update(split="holdout"), r"images\[1\]: unknown split 'holdout'"),
    (lambda d: d["images"][0]["sentences"][1].update(raw=""), r"images\[0\].sentences\[1\]: missing or empty 'raw'"),
    (lambda d: d.update(images=[im for im in d["images"] if im["split"] != "val"]), r"split 'val' is empty"),
    (lambda d: d["images"][3].update(cocoid=d["images"][0]["cocoid"]), r"duplicate image id"),
])
def test_malformed_karpathy_file_errors_say_where(demo_dir, tmp_path, mutate, message):
    data = json.loads((demo_dir / "dataset_demo.json").read_text())
    mutate(data)
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        normalise_karpathy(src, demo_dir / "images", tmp_path / "splits.json")


def test_not_json_is_reported_with_position(tmp_path):
    src = tmp_path / "broken.json"
    src.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON \(line 1"):
        normalise_karpathy(src, tmp_path, tmp_path / "s.json")


def test_broken_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.jpg \(split 'val'\) does not exist"):
        load_image(tmp_path / "nope.jpg", "val")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"bad.jpg \(split 'test'\) cannot be decoded.*skip_broken_images"):
        load_image(bad, "test")
