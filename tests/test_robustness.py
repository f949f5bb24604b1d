"""Bad input fails at once with a message that names the thing and the fix (issue 7, item 4).

One test per bad input. `dico` commands run in-process through `dico.cli.main` (exit code 2 for a bad
config, 1 for bad data, message in the log); library functions are called directly where the CLI
adds nothing.
"""
import copy
import json
import shutil

import pytest
import torch
import yaml

from dico import config as C
from dico.data import load_split
from dico.embeddings import embed_images, skipped_rows
from dico.metrics.inputs import load_candidates, load_references
from dico.metrics.run_metrics import score_split
from dico.features import cache_features
from worlds import TINY_CONFIG, make_world, run_dico

# the tiny worlds' config with a few steps of every training method
CONFIG = C.deep_merge(TINY_CONFIG, {
    "train": {"log_every": 2},
    "xe": {"steps": 4, "batch_size": 12, "val_every": 2, "lr": 2.0e-3},
    "scst": {"rewards": ["cider"], "steps": 2, "batch_images": 2, "k": 2, "val_every": 1},
    "dico": {"steps": 2, "batch_images": 2, "k": 2, "val_every": 1},
})
EVAL_SPEC = {"meteor": False, "spice_jar_dir": None,
             "clip_s": {"model": "clip", "w": 2.5, "prefix": "A photo depicts "},
             "pac_s": {"model": "clip", "w": 2.0, "prefix": "A photo depicts "}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """24/6/6 demo images, a random tiny CLIP, cached features, a 4-step XE captioner, a config file."""
    return make_world(tmp_path_factory.mktemp("robust"), n_train=24, n_val=6, n_test=6, seed=2,
                      features=("train", "val", "test"), config=CONFIG, xe_runs=("xe",))


def _splits_with(world, tmp_path, split: str, index: int, file) -> str:
    """A copy of the split file whose `split`[index] image is `file` (absolute: overrides image_root)."""
    data = json.loads((world["root"] / "splits.json").read_text())
    data["splits"][split][index]["file"] = str(file)
    out = tmp_path / "splits.json"
    out.write_text(json.dumps(data))
    return str(out)


# -- configuration (exit code 2, key and allowed values) ------------------------------------------
@pytest.mark.parametrize("override,message", [
    ({"xe": {"stepz": 5}}, "xe: unknown key 'stepz'; allowed keys: batch_size, captions_per_image, grad_accum"),
    ({"features": {"dtype": "float8"}}, "features.dtype: 'float8' is not allowed; choose one of 'float16', 'float32'"),
    ({"xe": {"steps": "ten"}}, "xe.steps: 'ten' is not of type 'integer'"),
    ({"dico": {"k": 1}}, "dico.k: 1 is less than the minimum of 2"),
    ({"train": {"amp": "fp8"}}, "train.amp: 'fp8' is not allowed; choose one of 'fp16', 'bf16', 'none', 'auto'"),
    ({"evaluate": {"clip_s": {"model": "vit"}}}, "evaluate.clip_s.model: 'vit' is not a clip_models entry (have: clip)"),
    ({"clip_models": {"pac": {"source": "file"}}}, "clip_models.pac: source file needs a path"),
    ({"scst": {"rewards": ["bleu"]}}, "scst.rewards: 'bleu' is not a rewards entry (have: cider, clip_s, pac_s)"),
    ({"features": {"skip_broken_images": "yes"}}, "features.skip_broken_images: 'yes' is not of type 'boolean'"),
], ids=["unknown-key", "enum", "type", "minimum", "amp", "clip-model-name", "file-without-path", "reward-name",
        "skip-flag-type"])
def test_bad_config_value_exits_2_naming_key_and_allowed_values(world, tmp_path, caplog, override, message):
    from dico.config import deep_merge

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(deep_merge(CONFIG, override)))
    code, _, text = run_dico(caplog, "train", "xe", "--config", tmp_path / "bad.yaml", "--splits", "s",
                         "--features-train", "a", "--features-val", "b", "--out-model", "m", "--out-log", "l")
    assert code == 2
    assert "bad.yaml: invalid configuration" in text and message in text


def test_missing_config_file_exits_2(caplog, tmp_path):
    code, _, text = run_dico(caplog, "cache-features", "--config", tmp_path / "nope.yaml", "--splits", "s",
                         "--split", "train", "--out-dir", "o")
    assert code == 2 and "nope.yaml: config file not found" in text


def test_config_that_is_not_yaml_exits_2(caplog, tmp_path):
    (tmp_path / "bad.yaml").write_text("xe: {steps: 5\n")
    code, _, text = run_dico(caplog, "cache-features", "--config", tmp_path / "bad.yaml", "--splits", "s",
                         "--split", "train", "--out-dir", "o")
    assert code == 2 and "bad.yaml: not valid YAML" in text


def test_unknown_run_name_exits_2_listing_the_runs(world, caplog):
    code, _, text = run_dico(caplog, "train", "ppo", "--config", world["root"] / "config.yaml", "--splits", "s",
                         "--features-train", "a", "--features-val", "b", "--out-model", "m", "--out-log", "l")
    assert code == 2 and "unknown run 'ppo'; runs of this config: xe, scst_cider, dico" in text


# -- images ---------------------------------------------------------------------------------------
def _cache_cli(world, caplog, tmp_path, splits, config=None):
    """(exit code, log) of `dico cache-features` of the train split of `splits`."""
    code, _, text = run_dico(caplog, "cache-features", "--config", config or world["root"] / "config.yaml",
                            "--splits", splits, "--split", "train", "--checkpoint", world["root"] / "clip.pt",
                            "--out-dir", tmp_path / "features", "--threads", "1")
    return code, text


def test_missing_image_names_file_split_and_image_root(world, tmp_path, caplog):
    splits = _splits_with(world, tmp_path, "train", 5, tmp_path / "gone.jpg")
    code, text = _cache_cli(world, caplog, tmp_path, splits)
    assert code == 1
    assert f"image {tmp_path / 'gone.jpg'} (split 'train') does not exist; check data.image_root" in text


def test_corrupt_image_names_file_split_and_the_skip_option(world, tmp_path, caplog):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    splits = _splits_with(world, tmp_path, "train", 5, tmp_path / "bad.jpg")
    code, text = _cache_cli(world, caplog, tmp_path, splits)
    assert code == 1
    assert f"image {tmp_path / 'bad.jpg'} (split 'train') cannot be decoded" in text
    assert "set features.skip_broken_images: true to skip and count such images" in text


def test_skip_broken_images_counts_and_lists_them_in_the_feature_index(world, tmp_path, caplog):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    splits = _splits_with(world, tmp_path, "train", 5, tmp_path / "bad.jpg")
    (tmp_path / "skip.yaml").write_text(yaml.safe_dump({**CONFIG, "features": {**CONFIG["features"],
                                                                               "skip_broken_images": True}}))
    code, text = _cache_cli(world, caplog, tmp_path, splits, config=tmp_path / "skip.yaml")
    assert code == 0, text
    image_id = load_split(splits, "train")[5].image_id
    assert f"skipped 1 of 24 images in split 'train' that could not be read" in text
    index = json.loads((tmp_path / "features" / "index.json").read_text())
    assert index["skipped_images"] == [image_id]


def test_an_unreadable_image_folder_is_not_skipped_silently(world, tmp_path):
    """skip_broken_images is for a few broken files, not for a wrong data.image_root."""
    records = load_split(world["root"] / "splits.json", "train")
    wrong = [type(r)(r.image_id, tmp_path / "nowhere" / r.path.name, r.captions) for r in records]
    with pytest.raises(ValueError, match=r"none of the 8 images .* could be read; check data.image_root"):
        cache_features(world["ev"], "clip", world["root"] / "clip.pt", wrong, "train", tmp_path / "f",
                       shard_size=8, batch_size=8, skip_broken=True, log=lambda *a: None)


def test_embed_images_names_a_broken_image(world, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    paths = [r.path for r in load_split(world["root"] / "splits.json", "test")][:3] + [tmp_path / "bad.jpg"]
    with pytest.raises(ValueError, match=r"bad.jpg \(split 'test'\) cannot be decoded .*features.skip_broken_images: true"):
        embed_images(world["ev"], paths, split="test", progress=False)


def test_skipped_image_is_left_out_of_every_metric(world, tmp_path):
    """A skipped image (NaN embedding row) is dropped from BLEU..CIDEr, CLIP-S/PAC-S and diversity alike:
    the metrics equal those of the split without it, and the JSON lists it."""
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    records = load_split(world["root"] / "splits.json", "test")
    broken = [*records[:2], type(records[2])(records[2].image_id, tmp_path / "bad.jpg", records[2].captions),
              *records[3:]]
    lines = []
    embs = embed_images(world["ev"], [r.path for r in broken], split="test", progress=False, skip_broken=True,
                        log=lines.append)
    assert skipped_rows(embs) == [2] and lines[0].startswith("skipped 1 of 6 images")
    captions = {r.image_id: r.captions[0] for r in records}
    got = score_split(captions, broken, EVAL_SPEC, {"clip": world["ev"]}, {"clip": embs})
    kept = [r for i, r in enumerate(records) if i != 2]
    want = score_split(captions, kept, EVAL_SPEC, {"clip": world["ev"]}, {"clip": embs[[0, 1, 3, 4, 5]]})
    assert got["metrics"] == want["metrics"] and got["diversity"] == want["diversity"]
    assert got["skipped_images"] == [records[2].image_id] and got["n_scored"] == 5
    assert "left out of every metric" in got["reasons"]["skipped_images"]


# -- captions and references ----------------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    ('[{"image_id": 1, "caption": "a"},', r"caps.json: not valid JSON \(line 1, column 34: Expecting value\)"),
    ('{"image_id": 1, "caption": "a"}', r"caps.json: entry 'image_id' is a int, not a caption string; give a COCO "
                                        r"results list"),
    ('[{"image_id": 1, "caption": "a"}, {"image_id": 2, "text": "b"}]',
     r'caps.json: entry \[1\] is not an \{"image_id": int or str, "caption": str\} object'),
    ('[{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]',
     r"caps.json: entry \[1\]: image_id 1 has a second caption; keep one caption per image"),
], ids=["not-json", "not-a-list", "missing-caption", "duplicate-id"])
def test_malformed_captions_json_names_the_entry(tmp_path, content, message):
    (tmp_path / "caps.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_candidates(tmp_path / "caps.json")


def test_malformed_captions_via_evaluate_exits_1(world, tmp_path, caplog):
    (tmp_path / "caps.json").write_text('[{"image_id": 1}]')
    code, _, text = run_dico(caplog, "evaluate", "--config", world["root"] / "config.yaml", "--captions",
                         tmp_path / "caps.json", "--splits", world["root"] / "splits.json", "--clip-model",
                         f"clip={world['root'] / 'clip.pt'}", "--out", tmp_path / "m.json")
    assert code == 1 and 'caps.json: entry [0] is not an {"image_id": int or str, "caption": str} object' in text


def test_malformed_karpathy_references_name_the_entry(tmp_path):
    (tmp_path / "refs.json").write_text(json.dumps({"images": [
        {"cocoid": 1, "split": "test", "sentences": [{"raw": "a cat"}]},
        {"cocoid": 2, "split": "test", "sentences": [{"tokens": ["a", "dog"]}]}]}))
    with pytest.raises(ValueError, match=r"refs.json: images\[1\].sentences\[0\] has no 'raw' caption string"):
        load_references(tmp_path / "refs.json", "test")


def test_malformed_coco_annotations_name_the_entry(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a"}, {"id": 3}]}))
    with pytest.raises(ValueError, match=r'ann.json: annotations\[1\] is not an \{"image_id", "caption": str\} object'):
        load_references(tmp_path / "ann.json")


def test_karpathy_file_missing_a_key_names_the_entry_via_prepare_splits(tmp_path, caplog):
    (tmp_path / "k.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train"}]}))
    code, _, text = run_dico(caplog, "prepare-splits", "--karpathy-json", tmp_path / "k.json", "--image-root", "x",
                         "--out", tmp_path / "s.json")
    assert code == 1 and "k.json: images[0]: missing key 'sentences'" in text


# -- Java -----------------------------------------------------------------------------------------
def test_java_missing_says_how_to_install_it(world, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    records = load_split(world["root"] / "splits.json", "test")
    embs = embed_images(world["ev"], [r.path for r in records], progress=False)
    with pytest.raises(RuntimeError, match=r"Java not found on PATH: .* install openjdk \(apt-get install "
                                           r"default-jre-headless, or the eval conda env"):
        score_split({r.image_id: "a cat" for r in records}, records, EVAL_SPEC, {"clip": world["ev"]}, {"clip": embs})


# -- checkpoints ----------------------------------------------------------------------------------
def _generate(world, caplog, tmp_path, model, features="test", split="test"):
    """(exit code, log) of `dico generate` of `model` on `split`."""
    code, _, text = run_dico(caplog, "generate", "--config", world["root"] / "config.yaml", "--model", model,
                             "--splits", world["root"] / "splits.json", "--split", split, "--features",
                             world["root"] / "features" / features / "index.json", "--out", tmp_path / "caps.json")
    return code, text


def test_generate_runs_on_the_good_inputs(world, tmp_path, caplog):  # the baseline of the tests below
    code, text = _generate(world, caplog, tmp_path, world["root"] / "xe" / "model.pt")
    assert code == 0, text
    assert len(json.loads((tmp_path / "caps.json").read_text())) == 6


def test_truncated_captioner_checkpoint_says_it_was_probably_killed(world, tmp_path, caplog):
    data = (world["root"] / "xe" / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])
    code, text = _generate(world, caplog, tmp_path, tmp_path / "model.pt")
    assert code == 1
    assert "model.pt is not a readable captioner checkpoint" in text
    assert "was the job killed while writing it? Delete it and rerun its training rule" in text


def test_truncated_clip_checkpoint_names_the_file(world, tmp_path, caplog):
    data = (world["root"] / "clip.pt").read_bytes()
    (tmp_path / "clip.pt").write_bytes(data[: len(data) // 3])
    code, _, text = run_dico(caplog, "cache-features", "--config", world["root"] / "config.yaml", "--splits",
                         world["root"] / "splits.json", "--split", "val", "--checkpoint", tmp_path / "clip.pt",
                         "--out-dir", tmp_path / "f")
    assert code == 1 and f"{tmp_path / 'clip.pt'} is not a readable PyTorch checkpoint (truncated or corrupt?)" in text


def test_corrupt_last_checkpoint_is_set_aside_and_training_restarts(world, tmp_path, capsys):
    from dico.train import train_xe

    work = tmp_path / "work"
    work.mkdir()
    (work / "last.pt").write_bytes(b"PK\x03\x04 half a zip")
    spec = C.run_spec(C.validate(copy.deepcopy(CONFIG)), "xe")
    feats = {s: str(world["root"] / "features" / s / "index.json") for s in ("train", "val")}
    train_xe(spec, world["root"] / "splits.json", feats, work, tmp_path / "model.pt", tmp_path / "log.jsonl",
             device="cpu", log=print)
    out = capsys.readouterr().out
    assert "last.pt unreadable" in out and "moved to" in out and "starting from scratch" in out
    assert (work / "last.corrupt").exists() and (tmp_path / "model.pt").exists()


def test_last_checkpoint_of_other_settings_is_not_resumed(world, tmp_path):
    """A last.pt written with another model width (config edited between runs) is not loaded into the new
    model: the run starts over and says why."""
    from dico.train import train_xe

    feats = {s: str(world["root"] / "features" / s / "index.json") for s in ("train", "val")}
    lines = []
    for d_model in (32, 48):
        cfg = C.validate(copy.deepcopy({**CONFIG, "model": {**CONFIG["model"], "d_model": d_model}}))
        lines.clear()
        train_xe(C.run_spec(cfg, "xe"), world["root"] / "splits.json", feats, tmp_path / "work",
                 tmp_path / "model.pt", tmp_path / "log.jsonl", device="cpu", log=lines.append)
    assert any("was written with different settings; starting this run from scratch" in line for line in lines)
    assert torch.load(tmp_path / "model.pt", weights_only=False)["model_config"]["d_model"] == 48


def test_init_checkpoint_whose_architecture_differs_from_the_config_is_rejected(world, tmp_path):
    from dico import config as C
    from dico.train import train_finetune

    cfg = C.validate(copy.deepcopy({**CONFIG, "model": {**CONFIG["model"], "d_model": 64}}))
    feats = {s: str(world["root"] / "features" / s / "index.json") for s in ("train", "val")}
    embs = {"val": embed_images(world["ev"], [r.path for r in load_split(world["root"] / "splits.json", "val")],
                                progress=False)}
    with pytest.raises(ValueError, match=r"model.d_model is 64 in the config but 32 in the checkpoint"):
        train_finetune(C.run_spec(cfg, "scst_cider"), world["root"] / "splits.json", feats,
                       world["root"] / "xe" / "model.pt", tmp_path / "work", tmp_path / "model.pt",
                       tmp_path / "log.jsonl", device="cpu", evaluators={"clip": world["ev"]},
                       image_embs={"clip": embs}, log=lambda *a: None)


# -- features -------------------------------------------------------------------------------------
def test_features_of_another_backbone_are_rejected(world, tmp_path, caplog):
    other = tmp_path / "features" / "test"
    shutil.copytree(world["root"] / "features" / "test", other)
    index = json.loads((other / "index.json").read_text())
    (other / "index.json").write_text(json.dumps({**index, "backbone": "clip_l14"}))
    code, _, text = run_dico(caplog, "generate", "--config", world["root"] / "config.yaml", "--model",
                         world["root"] / "xe" / "model.pt", "--splits", world["root"] / "splits.json", "--split",
                         "test", "--features", other / "index.json", "--out", tmp_path / "caps.json")
    assert code == 1
    assert "was trained on features of backbone 'clip' (17x64), but the features given are from 'clip_l14'" in text
    assert "use the features of the same features.backbone or retrain" in text


def test_features_of_another_split_are_rejected(world, tmp_path, caplog):
    code, text = _generate(world, caplog, tmp_path, world["root"] / "xe" / "model.pt", features="val")
    assert code == 1
    assert "features of split 'test' do not match the split file's images (different data or order); rerun " \
           "cache_features" in text


# -- empty splits ---------------------------------------------------------------------------------
def test_empty_split_in_the_karpathy_file_is_named(tmp_path, caplog):
    images = [{"filename": f"{i}.jpg", "cocoid": i, "split": s, "sentences": [{"raw": "a cat"}]}
              for i, s in enumerate(["train", "val"])]
    (tmp_path / "k.json").write_text(json.dumps({"images": images}))
    code, _, text = run_dico(caplog, "prepare-splits", "--karpathy-json", tmp_path / "k.json", "--image-root", "x",
                         "--out", tmp_path / "s.json")
    assert code == 1 and "k.json: split 'test' is empty; every one of train, val, test needs images" in text


def test_empty_split_in_the_split_file_is_named(world, tmp_path, caplog):
    data = json.loads((world["root"] / "splits.json").read_text())
    data["splits"]["val"] = []
    (tmp_path / "s.json").write_text(json.dumps(data))
    code, _, text = run_dico(caplog, "cache-features", "--config", world["root"] / "config.yaml", "--splits",
                         tmp_path / "s.json", "--split", "val", "--checkpoint", world["root"] / "clip.pt",
                         "--out-dir", tmp_path / "f")
    assert code == 1 and "s.json: split 'val' is empty; it needs at least one image" in text


def test_nothing_to_score_is_an_error_not_a_zero(world):
    with pytest.raises(ValueError, match="no images to score"):
        score_split({}, [], EVAL_SPEC, {"clip": world["ev"]}, {"clip": torch.zeros(0, 32)})


def test_references_without_the_requested_split_are_an_error(tmp_path):
    (tmp_path / "refs.json").write_text(json.dumps({"images": [
        {"cocoid": 1, "split": "train", "sentences": [{"raw": "a cat"}]}]}))
    with pytest.raises(ValueError, match=r"refs.json: no images in split 'test'; its splits are train: pass one"):
        load_references(tmp_path / "refs.json", "test")


def test_training_leaves_skipped_images_out(world, tmp_path):
    """features.skip_broken_images end to end in training: an unreadable train image (zero features, NaN
    embedding) is never sampled, so no NaN reward reaches the loss; an unreadable val image is not scored."""
    from dico import config as C
    from dico.train import train_finetune

    root = world["root"]
    data = json.loads((root / "splits.json").read_text())
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    for split in ("train", "val"):
        data["splits"][split][1]["file"] = str(tmp_path / "bad.jpg")
    (tmp_path / "splits.json").write_text(json.dumps(data))
    feats, embs = {}, {}
    for split in ("train", "val"):
        records = load_split(tmp_path / "splits.json", split)
        cache_features(world["ev"], "clip", root / "clip.pt", records, split, tmp_path / split, shard_size=8,
                       batch_size=8, skip_broken=True, log=lambda *a: None)
        feats[split] = str(tmp_path / split / "index.json")
        embs[split] = embed_images(world["ev"], [r.path for r in records], progress=False, skip_broken=True,
                                   log=lambda *a: None)
    scst = {**CONFIG["scst"], "rewards": ["clip_s"], "steps": 12, "batch_images": 6}
    cfg = C.validate(copy.deepcopy({**CONFIG, "scst": scst}))
    train_finetune(C.run_spec(cfg, "scst_clip_s"), tmp_path / "splits.json", feats, root / "xe" / "model.pt",
                   tmp_path / "work", tmp_path / "model.pt", tmp_path / "log.jsonl", device="cpu",
                   evaluators={"clip": world["ev"]}, image_embs={"clip": embs}, log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["reward_mean"] == r["reward_mean"] for r in rows if r["phase"] == "train")  # no NaN
    assert all(r["CLIP-S"] == r["CLIP-S"] for r in rows if r["phase"] == "val")
