"""`dico caption`: image files in, captions out, with the pipeline's own code.

The reference is the pipeline itself: `dico generate` on the features `cache_features` cached, for a
trained XE captioner and for the released DiCO (a stand-in release in the official layout, converted by
`dico convert-official`); `dico caption` on the same image files must write the same text, and its
output must score with `dico score` as generate's does. Bad inputs are named (run through the real
command line).
"""
import json
import shutil

import pytest
import torch

import hf_reference as H
from dico import config as C
from dico.clip_weights import save_evaluator
from dico.data import load_split
from dico.demo.clip import build_tiny_clip, tiny_clip_config
from dico.model import CaptionerConfig
from dico.tokenizer import CLIP_BOS, CLIP_EOS, CLIP_PAD, CLIP_VOCAB
from worlds import TINY_CONFIG, make_world, run_dico

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java (the PTB tokenizer of dico score)")

# 120 XE steps: enough for captions that differ from image to image (40 give one caption for most)
CONFIG = C.deep_merge(TINY_CONFIG, {"xe": {"steps": 120, "val_every": 120}})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """24/6/6 demo images, a random tiny CLIP (17 x 64 grid), cached features, an XE captioner, and
    what `dico generate` writes for the test split."""
    w = make_world(tmp_path_factory.mktemp("caption"), n_train=24, n_val=6, n_test=6, seed=3,
                   features=("train", "val", "test"), config=CONFIG, xe_runs=("xe",))
    root = w["root"]
    w["records"] = load_split(root / "splits.json", "test")
    w["images"] = root / "demo" / "images" / "test"
    assert sorted(r.path.parent for r in w["records"]) == [w["images"]] * 6
    w["generated"] = _generate(root, root / "xe" / "model.pt", root / "generated.json")
    return w


def _generate(root, model, out) -> dict:
    """{file name: caption} that `dico generate` writes for the test split from the cached features."""
    from dico import cli

    assert cli.main(["generate", "--config", str(root / "config.yaml"), "--model", str(model), "--splits",
                     str(root / "splits.json"), "--split", "test", "--features",
                     str(root / "features" / "test" / "index.json"), "--out", str(out)]) == 0
    names = {r.image_id: r.path.name for r in load_split(root / "splits.json", "test")}
    return {names[c["image_id"]]: c["caption"] for c in json.loads(out.read_text())}


def _caption(caplog, world, *argv, capsys=None):
    root = world["root"]
    return run_dico(caplog, "caption", "--config", root / "config.yaml", "--backbone-checkpoint", root / "clip.pt",
                    "--device", "cpu", *argv, capsys=capsys)  # argv last: its flags win


def test_captions_equal_generate_string_for_string(world, caplog, capsys, tmp_path):
    out = tmp_path / "captions.json"
    code, stdout, log = _caption(caplog, world, world["images"], "--model", world["root"] / "xe" / "model.pt",
                                 "--out", out, capsys=capsys)
    assert code == 0, log
    written = json.loads(out.read_text())
    assert [c["image_id"] for c in written] == sorted(r.path.name for r in world["records"])
    assert {c["image_id"]: c["caption"] for c in written} == world["generated"]
    assert len(set(world["generated"].values())) >= 4  # the captioner tells the images apart
    for name, caption in world["generated"].items():  # the printed table: one line per image
        assert f"{name}  {caption}" in stdout.splitlines()
    assert "beam 2, max_len 12, hf, post-processing official" in log  # the run's decoding settings


def test_the_captioner_reads_the_cached_features_bit_for_bit(world, caplog, monkeypatch, tmp_path):
    """Same preprocessing and precision as cache_features (fp16 storage, read back as float32): what
    the beam search of `dico caption` gets is the cached features, bit for bit (string equality alone
    would not show it: fp32 features give this captioner the same words)."""
    from dico import captioning
    from dico.features import FeatureStore

    seen = []

    def recording(model, tok, feats, *args):  # the real beam search, its input kept
        seen.append(feats.clone())
        return real(model, tok, feats, *args)

    real = captioning.caption_batch
    monkeypatch.setattr(captioning, "caption_batch", recording)
    code, _, log = _caption(caplog, world, world["images"], "--model", world["root"] / "xe" / "model.pt", "--out",
                            tmp_path / "c.json", "--batch", 4)
    assert code == 0, log
    store = FeatureStore(world["root"] / "features" / "test" / "index.json")
    rows = sorted(range(len(world["records"])), key=lambda i: world["records"][i].path.name)
    assert [len(f) for f in seen] == [4, 2] and seen[0].dtype == torch.float32
    assert torch.equal(torch.cat(seen), store[rows])


def test_pacscore_format_batches_and_single_files(world, caplog, tmp_path):
    """Names without the extension (pacscore's layout); batches of 4 + 2 and files named one by one
    give the same captions as one batch of the folder."""
    out = tmp_path / "pacs.json"
    files = sorted(world["images"].glob("*.jpg"), reverse=True)
    code, _, log = _caption(caplog, world, *files, "--model", world["root"] / "xe" / "model.pt", "--out", out,
                            "--format", "pacscore", "--batch", 4)
    assert code == 0, log
    written = json.loads(out.read_text())
    assert list(written) == [f.stem for f in files]  # the order given
    assert written == {name.rsplit(".", 1)[0]: c for name, c in world["generated"].items()}


def test_decoding_comes_from_the_checkpoints_run_not_from_the_config(world, caplog, tmp_path):
    """A --config whose decoding differs (beam 4, max_len 20, no post-processing) changes nothing: the
    checkpoint's run decides, as generate decoded with the run's own config."""
    import yaml

    other = C.deep_merge(CONFIG, {"decoding": {"beam_size": 4, "max_len": 20, "postprocess": "none"}})
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    out = tmp_path / "captions.json"
    code, _, log = _caption(caplog, world, world["images"], "--model", world["root"] / "xe" / "model.pt", "--out",
                            out, "--config", tmp_path / "other.yaml")
    assert code == 0 and "beam 2, max_len 12, hf, post-processing official" in log, log
    assert {c["image_id"]: c["caption"] for c in json.loads(out.read_text())} == world["generated"]


def test_decoding_flags_override_the_runs_settings(world, caplog, tmp_path):
    """--beam 1 --max-len 4 is greedy decoding of at most 3 words: the captions change and are short."""
    out = tmp_path / "short.json"
    code, _, log = _caption(caplog, world, world["images"], "--model", world["root"] / "xe" / "model.pt",
                            "--out", out, "--beam", 1, "--max-len", 4)
    assert code == 0 and "beam 1, max_len 4" in log
    short = {c["image_id"]: c["caption"] for c in json.loads(out.read_text())}
    assert all(len(c.split()) <= 3 for c in short.values()) and short != world["generated"]


@needs_java
def test_the_output_scores_with_dico_score_as_generates_does(world, caplog, tmp_path):
    """`dico score` reads the caption file as is (ids are file names; its images are found by them) and
    gives exactly the numbers of generate's file (ids are COCO ids); so does the pacscore format
    against references in pacscore's layout."""
    root = world["root"]
    out, pacs = tmp_path / "captions.json", tmp_path / "pacs.json"
    for fmt, path in (("coco", out), ("pacscore", pacs)):
        code, _, log = _caption(caplog, world, world["images"], "--model", root / "xe" / "model.pt", "--out", path,
                                "--format", fmt)
        assert code == 0, log
    pacs_refs = tmp_path / "refs.json"  # pacscore's layout names images without the extension
    pacs_refs.write_text(json.dumps({r.path.stem: list(r.captions) for r in world["records"]}))
    scores = {}
    for name, captions, refs in (("caption", out, root / "splits.json"), ("generate", root / "generated.json",
                                 root / "splits.json"), ("pacscore", pacs, pacs_refs)):
        code, _, log = run_dico(caplog, "score", "--captions", captions, "--refs", refs, "--split", "test",
                                "--images", root / "demo" / "images", "--clip", root / "clip.pt",
                                "--metrics", "bleu,rouge,cider,clip-s,refclip-s", "--out", tmp_path / f"{name}.json")
        assert code == 0, log
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["caption"]["n_images"] == scores["generate"]["n_images"] == scores["pacscore"]["n_images"] == 6
    assert scores["caption"]["metrics"] == scores["generate"]["metrics"] == scores["pacscore"]["metrics"]
    assert all(scores["caption"]["metrics"][k] is not None
               for k in ("BLEU-4", "ROUGE-L", "CIDEr", "CLIP-S", "RefCLIP-S"))


# -- the released DiCO ---------------------------------------------------------------------------------
def test_official_release_captions_equal_convert_official_then_generate(world, caplog, tmp_path):
    """A release in the official layout (zip of an HF save_pretrained folder, the real transformers
    classes, the 49,409-token vocabulary) whose grid is the tiny CLIP's 17 x 64: `dico caption
    --official` converts it in memory and writes what `dico convert-official` + `dico generate` write."""
    root = world["root"]
    cfg = CaptionerConfig(feat_dim=64, vocab_size=CLIP_VOCAB, pad_id=CLIP_PAD, bos_id=CLIP_BOS, eos_id=CLIP_EOS,
                          d_model=32, enc_layers=1, dec_layers=1, n_heads=2, d_ff=64, max_enc_positions=17,
                          max_dec_positions=24)
    release = H.write_release(tmp_path / "dico-ViTL14.zip", cfg, seed=5, zip=True)
    code, _, log = run_dico(caplog, "convert-official", "--src", release, "--out", tmp_path / "official.pt",
                            "--backbone", "clip")
    assert code == 0, log
    expected = _generate(root, tmp_path / "official.pt", tmp_path / "generated.json")
    out = tmp_path / "captions.json"
    code, _, log = _caption(caplog, world, world["images"], "--official", release, "--out", out)
    assert code == 0, log
    assert {c["image_id"]: c["caption"] for c in json.loads(out.read_text())} == expected


# -- bad inputs ----------------------------------------------------------------------------------------
def _broken(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder / "broken.jpg"


def test_an_unreadable_image_is_named_and_nothing_is_written(world, caplog, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(world["images"], folder)
    bad = _broken(folder)
    out = tmp_path / "captions.json"
    code, _, log = _caption(caplog, world, folder, "--model", world["root"] / "xe" / "model.pt", "--out", out)
    assert code == 1 and f"image {bad} cannot be decoded" in log and "--skip-broken-images" in log, log
    assert not out.exists() and "Traceback" not in log
    code, _, log = _caption(caplog, world, folder, "--model", world["root"] / "xe" / "model.pt", "--out", out,
                            "--skip-broken-images")
    assert code == 0 and "left out 1 images" in log and str(bad) in log
    assert {c["image_id"]: c["caption"] for c in json.loads(out.read_text())} == world["generated"]


def _tiny_clip(path, patch_size):
    cfg = tiny_clip_config(embed_dim=32, image_size=32, patch_size=patch_size, vision_width=64, vision_layers=1,
                           text_width=64, text_layers=1, context_length=32)
    save_evaluator(build_tiny_clip(cfg, seed=0), path)
    return path


@pytest.mark.parametrize("case", ["no-path", "empty-folder", "not-an-image", "same-name", "model-missing",
                                  "not-a-captioner", "backbone-not-in-config", "backbone-weights-missing",
                                  "other-backbone", "out-is-a-folder"])
def test_bad_inputs_are_named(world, caplog, tmp_path, case):
    root = world["root"]
    model, images, extra = root / "xe" / "model.pt", [world["images"]], []
    if case == "no-path":
        images, message = [tmp_path / "nowhere"], f"PATH {tmp_path / 'nowhere'}: no such file or folder"
    elif case == "empty-folder":
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "notes.txt").write_text("x")
        images, message = [tmp_path / "docs"], f"PATH {tmp_path / 'docs'}: no image files (.jpg .jpeg"
    elif case == "not-an-image":
        images, message = [root / "splits.json"], f"PATH {root / 'splits.json'}: not an image file"
    elif case == "same-name":
        shutil.copytree(world["images"], tmp_path / "copy")
        images = [world["images"], tmp_path / "copy"]
        message = (f"PATH: {world['images'] / '000030.jpg'} and {tmp_path / 'copy' / '000030.jpg'} would both be "
                   "named '000030.jpg'")
    elif case == "model-missing":
        model, message = tmp_path / "model.pt", f"--model {tmp_path / 'model.pt'}: no such file; give a captioner"
    elif case == "not-a-captioner":
        model, message = root / "clip.pt", f"--model {root / 'clip.pt'}: not a dico-captioner-v1 checkpoint; give"
    elif case == "backbone-not-in-config":
        payload = torch.load(root / "xe" / "model.pt", weights_only=False)
        payload["backbone"]["name"] = "vit_h"
        torch.save(payload, tmp_path / "model.pt")
        model = tmp_path / "model.pt"
        message = (f"--model {model} reads grid features of backbone 'vit_h', but {root / 'config.yaml'} has no "
                   "clip_models entry 'vit_h' (has: clip); pass the --config of the run that trained it")
    elif case == "backbone-weights-missing":
        extra = ["--backbone-checkpoint", tmp_path / "none.pt"]
        message = f"backbone weights {tmp_path / 'none.pt'} (clip_models.clip of {root / 'config.yaml'}) not found"
    elif case == "other-backbone":  # patch 16: a 5 x 64 grid
        extra = ["--backbone-checkpoint", _tiny_clip(tmp_path / "clip16.pt", 16)]
        message = "reads 17 x 64 grid features of backbone 'clip', but the backbone weights given give 5 x 64"
    else:
        extra = ["--out", tmp_path]
        message = f"--out {tmp_path}: is a folder"
    out = tmp_path / "captions.json"
    code, _, log = _caption(caplog, world, *images, "--model", model, "--out", out, *extra)
    assert code == 1 and message in log, log
    assert "Traceback" not in log and not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--beam", "0"], "argument --beam: '0' is not a positive whole number"),
    (["--format", "csv"], "argument --format: invalid choice: 'csv'"),
    (["--official", "x.zip"], "argument --official: not allowed with argument --model"),
])
def test_bad_flags_are_refused_by_the_parser(world, caplog, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        _caption(caplog, world, world["images"], "--model", world["root"] / "xe" / "model.pt", *argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
