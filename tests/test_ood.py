"""Extra evaluation sets (evaluate.datasets): their split files from a Karpathy file, a COCO captions
file (nocaps) or the second demo set; images fetched by URL over real HTTP; the link to the
captioner's training split; and what the config may not say."""
import http.server
import json
import random
import threading
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dico import config as C
from dico import demo
from dico.cli import main
from dico.data import load_split, normalise_karpathy
from dico.config import eval_set_spec
from dico.eval_sets import check_eval_sets, eval_set_records, fetch_images, prepare_eval_set

ROOT = Path(__file__).resolve().parents[1]


def jpeg(path, colour=(200, 40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path, format="JPEG")
    return path


def flickr_like(root):
    """The layout of Karpathy's dataset_flickr30k.json: no filepath, no cocoid, imgid per image."""
    images = []
    for i, split in enumerate(["train", "test", "val", "test", "train", "test"]):
        images.append({"filename": f"{1000 + i}.jpg", "imgid": i, "split": split, "sentids": [2 * i, 2 * i + 1],
                       "sentences": [{"raw": f"Picture {i} number {k}.", "tokens": [], "imgid": i,
                                      "sentid": 2 * i + k} for k in range(2)]})
        jpeg(root / "flickr30k-images" / f"{1000 + i}.jpg")
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    return path


def nocaps_like(root, n=4, url=None):
    """nocaps val's layout: images (id, file_name, coco_url, domain) and annotations (image_id, caption)."""
    images = [{"id": i, "file_name": f"{i:04x}abcd.jpg", "open_images_id": f"{i:04x}abcd", "domain": "near-domain",
               "coco_url": f"{url}/{i:04x}abcd.jpg" if url else f"https://example.invalid/{i}.jpg"}
              for i in range(n)]
    annotations = [{"image_id": i % n, "id": k, "caption": f"caption {k} of image {i % n}"} for k, i in
                   enumerate(range(3 * n))]
    path = root / "nocaps_val.json"
    path.write_text(json.dumps({"info": {"description": "nocaps"}, "images": images, "annotations": annotations}))
    return path


def test_karpathy_set_keeps_one_split_in_file_order(tmp_path):
    ann = flickr_like(tmp_path)
    name, records = eval_set_records("karpathy", ann, "test")
    raw = json.loads(ann.read_text())["images"]  # the reference: the file read directly
    want = [(im["imgid"], im["filename"], [s["raw"] for s in im["sentences"]]) for im in raw if im["split"] == "test"]
    assert name == "flickr30k"
    assert [(r["image_id"], r["file"], r["captions"]) for r in records] == want
    with pytest.raises(ValueError, match="no images in split 'val'.*evaluate.datasets.<name>.split"):
        eval_set_records("karpathy", _only_test(tmp_path, ann), "val")


def _only_test(tmp_path, ann):
    raw = json.loads(ann.read_text())
    raw["images"] = [im for im in raw["images"] if im["split"] == "test"]
    path = tmp_path / "only_test.json"
    path.write_text(json.dumps(raw))
    return path


def test_coco_set_groups_captions_per_image_and_checks_the_url_key(tmp_path):
    ann = nocaps_like(tmp_path)
    name, records = eval_set_records("coco", ann, max_refs=2, url_key="coco_url")
    raw = json.loads(ann.read_text())
    assert name == "nocaps" and [r["image_id"] for r in records] == [im["id"] for im in raw["images"]]
    for r in records:
        caps = [a["caption"] for a in raw["annotations"] if a["image_id"] == r["image_id"]]
        assert r["captions"] == caps[:2] and len(caps) == 3
        assert r["url"] == raw["images"][r["image_id"]]["coco_url"]
    with pytest.raises(ValueError, match=r"images\[0\] \(id 0\) has no 'flickr_url'.*fetch_images"):
        eval_set_records("coco", ann, url_key="flickr_url")
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] != 2]
    ann.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"images\[2\] \(id 2\) has no caption"):
        eval_set_records("coco", ann)


class _Server:
    """A real HTTP server on localhost serving a folder, counting requests per path; /missing/* is a
    404, /html/* an HTML page with status 200 (what a moved image often turns into) and /cut/<file> the
    first half of <file> (a complete-looking transfer of a truncated JPEG)."""

    def __init__(self, folder):
        self.hits = {}
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(folder), **kw)

            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                if self.path.startswith(("/html/", "/cut/")):
                    if self.path.startswith("/html/"):
                        body, kind = b"<html><body>This image is no longer available</body></html>", "text/html"
                    else:
                        whole = (Path(folder) / self.path[len("/cut/"):]).read_bytes()
                        body, kind = whole[:len(whole) // 2], "image/jpeg"
                    self.send_response(200)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    for i in range(4):
        jpeg(served / f"{i:04x}abcd.jpg", (60 * i, 90, 30))
    # noise: half of this file still holds the whole JPEG header, so only a full decode finds it cut
    rng = random.Random(0)
    Image.frombytes("RGB", (96, 96), bytes(rng.randrange(256) for _ in range(96 * 96 * 3))).save(
        served / "noise.jpg", format="JPEG")
    s = _Server(served)
    yield s, served
    s.close()


def test_fetch_images_over_http_keeps_what_arrived_and_fetches_only_the_rest(tmp_path, server):
    srv, served = server
    dest = tmp_path / "images"
    jobs = [(f"{srv.url}/{i:04x}abcd.jpg", dest / f"{i:04x}abcd.jpg") for i in range(4)]
    bad = [(f"{srv.url}/missing/x.jpg", dest / "x.jpg"), (f"{srv.url}/html/y.jpg", dest / "y.jpg"),
           (f"{srv.url}/cut/noise.jpg", dest / "z.jpg")]
    with pytest.raises(RuntimeError, match=r"3 of 7 images could not be fetched \(after 2 attempts each\).*"
                                           r"missing/x.jpg.*HTTP Error 404.*html/y.jpg.*cannot identify image.*"
                                           r"cut/noise.jpg.*[Tt]runcated"):
        fetch_images(jobs + bad, workers=3, retries=1, timeout=10, log=lambda *a: None)
    for (_, d), i in zip(jobs, range(4)):  # byte for byte what the server holds
        assert d.read_bytes() == (served / f"{i:04x}abcd.jpg").read_bytes()
    assert not {"x.jpg", "y.jpg", "z.jpg"} & {p.name for p in dest.iterdir()}  # no error page or cut file kept
    assert not list(dest.glob(".*.tmp"))
    assert srv.hits["/missing/x.jpg"] == 2 and srv.hits["/html/y.jpg"] == 2  # retried
    before = dict(srv.hits)
    assert fetch_images(jobs, retries=0, log=lambda *a: None) == 0  # everything there: nothing asked for
    assert srv.hits == before


def test_prepare_nocaps_like_set_fetches_its_images_and_links_the_training_split(tmp_path, server):
    srv, _ = server
    main_splits = tmp_path / "splits.json"
    normalise_karpathy(_karpathy_three_splits(tmp_path), tmp_path / "coco", main_splits)
    ann = nocaps_like(tmp_path, url=srv.url)
    spec = {"name": "nocaps_val", "format": "coco", "annotations": str(ann), "image_root": str(tmp_path / "nc"),
            "split": "test", "max_refs": None, "fetch_images": "coco_url"}
    out = tmp_path / "ood" / "nocaps_val" / "splits.json"
    assert prepare_eval_set(spec, out, main_splits, retries=0, log=lambda *a: None) == 4
    records = load_split(out, "nocaps_val")
    assert [r.path for r in records] == [tmp_path / "nc" / f"{i:04x}abcd.jpg" for i in range(4)]
    assert all(r.path.is_file() for r in records)
    # the captioner's training split, for % novel captions, comes from the linked file
    assert load_split(out, "train") == load_split(main_splits, "train")
    with pytest.raises(KeyError, match="no split 'val'"):
        load_split(out, "val")


def _karpathy_three_splits(root):
    images = [{"filepath": "x", "filename": f"{i}.jpg", "cocoid": i, "split": s,
               "sentences": [{"raw": f"coco caption {i}"}]} for i, s in enumerate(["train", "restval", "val", "test"])]
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def test_missing_images_fail_naming_the_key_and_what_to_do(tmp_path):
    ann = flickr_like(tmp_path)
    (tmp_path / "flickr30k-images" / "1003.jpg").unlink()
    spec = {"name": "flickr30k_test", "format": "karpathy", "annotations": str(ann), "split": "test",
            "image_root": str(tmp_path / "flickr30k-images"), "max_refs": None, "fetch_images": None}
    with pytest.raises(FileNotFoundError, match=r"evaluate.datasets.flickr30k_test.image_root: 1 of 3 images .*"
                                                r"1003.jpg.*point image_root at your copy \(Flickr30k .* on request"):
        prepare_eval_set(spec, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
    coco = {"name": "nocaps_val", "format": "coco", "annotations": str(nocaps_like(tmp_path)), "split": "test",
            "image_root": str(tmp_path / "none"), "max_refs": None, "fetch_images": None}
    with pytest.raises(FileNotFoundError, match=r"4 of 4 images .* set fetch_images to the image field"):
        prepare_eval_set(coco, tmp_path / "out.json")


def test_demo_variants_use_only_unseen_palettes_and_are_deterministic(tmp_path):
    for variant, unseen in (("backgrounds", demo.UNSEEN_BACKGROUNDS), ("colours", demo.UNSEEN_COLOURS)):
        path = demo.make_demo_data(tmp_path / variant, 0, 0, 30, 32, seed=5, variant=variant)
        again = demo.make_demo_data(tmp_path / f"{variant}2", 0, 0, 30, 32, seed=5, variant=variant)
        assert path.read_text() == again.read_text()
        for a, b in zip(sorted((tmp_path / variant).rglob("*.jpg")), sorted((tmp_path / f"{variant}2").rglob("*.jpg"))):
            assert a.read_bytes() == b.read_bytes()
        images = json.loads(path.read_text())["images"]
        assert len(images) == 30 and {im["split"] for im in images} == {"test"}
        used = {im["scene"]["background"] for im in images} if variant == "backgrounds" else {
            sh["colour"] for im in images for sh in im["scene"]["shapes"]}
        assert used and used <= set(unseen)
        seen_words = set(demo.BACKGROUNDS) if variant == "backgrounds" else set(demo.COLOURS)
        text = " ".join(s["raw"] for im in images for s in im["sentences"]).split()
        assert not seen_words & set(text) - set(unseen), "a caption names a training-palette word"
        if variant == "backgrounds":  # the pixels too: a corner is the unseen background's colour
            im = images[0]
            rgb = Image.open(tmp_path / variant / "images" / "test" / im["filename"]).getpixel((0, 0))
            assert max(abs(a - b) for a, b in zip(rgb, unseen[im["scene"]["background"]])) <= 12
    with pytest.raises(ValueError, match="unknown demo variant 'stripes'"):
        demo.make_demo_data(tmp_path / "x", 0, 0, 1, 32, seed=0, variant="stripes")


def test_config_checks_and_the_by_hand_command(tmp_path, monkeypatch):
    base = {"evaluate": {"datasets": {"shapes_ood": {"format": "demo", "demo": {"n_images": 6}}}}}
    config = C.load(ROOT / "config" / "config.yaml", base)
    check_eval_sets(config)
    spec = eval_set_spec(config, "shapes_ood")
    assert config["data"]["demo"]["image_size"] == 48  # the set's images are the size of the demo's
    assert spec["demo"] == {"n_images": 6, "seed": 1, "variant": "backgrounds", "image_size": 48, "refs_per_image": 5}
    assert "label" not in spec and "url" not in spec  # a new title or mirror must not rebuild the set
    bad = {"evaluate": {"datasets": {"f30k": {"format": "karpathy", "member": "x.json"}}}}
    with pytest.raises(C.ConfigError) as err:  # at parse time, by the Snakefile and by every `dico --config`
        C.load(ROOT / "config" / "config.yaml", bad)
    for msg in ("evaluate.datasets.f30k.annotations", "evaluate.datasets.f30k.image_root", "f30k.member: set url"):
        assert msg in str(err.value)
    with pytest.raises(ValueError) as err:
        check_eval_sets(C.deep_merge(config, bad))
    assert "evaluate.datasets.f30k.annotations" in str(err.value)
    with pytest.raises(C.ConfigError, match="evaluate.datasets"):
        C.load(ROOT / "config" / "config.yaml", {"evaluate": {"datasets": {"val": {"format": "demo"}}}})

    demo_config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(C.deep_merge(demo_config, base)))
    out = tmp_path / "ood" / "shapes_ood" / "splits.json"
    assert main(["prepare-splits", "--config", str(tmp_path / "c.yaml"), "--eval-set", "shapes_ood",
                 "--out", str(out)]) == 0
    records = load_split(out, "shapes_ood")
    assert len(records) == 6 and all(r.path.is_file() for r in records)
    assert json.loads(out.read_text())["dataset"] == "demo-unseen-backgrounds"
