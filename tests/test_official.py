"""dico.official against the real `transformers` classes.

The "official" captioner is built from transformers' own BertModel / GPT2LMHeadModel / CLIPVisionModel
(tests/hf_reference.py, never from dico.model) and saved in the release's layout; the converted
checkpoint must give the same logits. Our checkpoints exported to that layout must load strictly in
those classes with the same logits, and a vision tower exported from an OpenAI-format CLIP must give
HF CLIPVisionModel's last_hidden_state = our grid features. Pickles holding more than tensors are
refused unless pinned or trusted.
"""
import argparse
import json
import zipfile

import pytest
import torch

import hf_reference as H
from dico import official
from dico.cli import main
from dico.io import sha256_file
from dico.model import Captioner, CaptionerConfig
from dico.tokenizer import CLIP_BOS, CLIP_EOS, CLIP_PAD, CLIP_VOCAB, CaptionTokenizer
from dico.checkpoint import captioner_payload, load_captioner

D, ENC, DEC, HEADS, FEAT = 64, 2, 2, 4, 32  # the official sizes (512, 3+3, 8, 1024) scaled down
CFG = CaptionerConfig(feat_dim=FEAT, vocab_size=CLIP_VOCAB, pad_id=CLIP_PAD, bos_id=CLIP_BOS, eos_id=CLIP_EOS,
                      d_model=D, enc_layers=ENC, dec_layers=DEC, n_heads=HEADS, d_ff=4 * D,
                      max_enc_positions=40, max_dec_positions=48)
TOKENS = 37  # the grid write_release gives for 40 encoder positions: 6 x 6 patches + CLS
CAPTIONS = torch.tensor([[CLIP_BOS, 320, 1929, 530, 12, 269], [CLIP_BOS, 786, 49, CLIP_EOS, CLIP_PAD, CLIP_PAD],
                         [CLIP_BOS, 49407, 3, 1, 0, 49000]])


def _feats(n=3, tokens=TOKENS, seed=0):
    return torch.randn(n, tokens, FEAT, generator=torch.Generator().manual_seed(seed))


def _convert_cli(src, out, *extra):
    assert main(["convert-official", "--src", str(src), "--out", str(out), *extra]) == 0
    return load_captioner(out)


@pytest.mark.parametrize("layout", ["folder-bin", "zip-bin", "zip-safetensors"])
def test_release_of_transformers_modules_converts_to_the_same_logits(tmp_path, layout):
    kind, weights = layout.split("-")
    src = H.write_release(tmp_path / ("dico-ViTL14.zip" if kind == "zip" else "dico-ViTL14"), CFG, seed=3,
                          zip=kind == "zip", weights="model.safetensors" if weights == "safetensors" else
                          "pytorch_model.bin")
    ours, tok, payload = _convert_cli(src, tmp_path / "runs" / "dico_official" / "model.pt")
    assert payload["tokenizer"] == {"clip_ids": None} and tok.vocab_size == CLIP_VOCAB
    assert payload["backbone"] == {"name": "clip_l14", "dim": FEAT, "tokens": TOKENS}
    assert payload["run"] == "dico_official" and payload["spec"]["hf_generation"] == {}
    modules = H.build_hf_captioner(CFG, seed=3)
    feats = _feats()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(feats), H.hf_memory(modules, feats), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(feats, CAPTIONS), H.hf_logits(modules, feats, CAPTIONS), atol=1e-5, rtol=0)


def test_wrong_checkpoints_fail_naming_the_key():
    good = H.official_state_dict(H.build_hf_captioner(CFG))

    sd = dict(good)  # a Conv1D weight stored as a Linear one (not transposed)
    sd["decoder.transformer.h.1.mlp.c_fc.weight"] = sd["decoder.transformer.h.1.mlp.c_fc.weight"].t()
    with pytest.raises(ValueError, match=r"decoder\.transformer\.h\.1\.mlp\.c_fc\.weight has shape \(256, 64\) "
                                         r"after transposing .* but decoder\.h\.1\.mlp\.c_fc\.weight needs \(256, 64\)"):
        official.convert_state_dict(sd, CFG)

    sd = dict(good)
    del sd["encoder.encoder.encoder.layer.0.attention.self.key.bias"]
    sd["decoder.enc_to_dec_proj.weight"] = torch.zeros(D, D)
    with pytest.raises(ValueError, match=r"missing encoder\.encoder\.encoder\.layer\.0\.attention\.self\.key\.bias"
                                         r"(.|\n)*unexpected decoder\.enc_to_dec_proj\.weight"):
        official.convert_state_dict(sd, CFG)

    sd = dict(good)
    sd["decoder.lm_head.weight"] = torch.zeros_like(sd["decoder.lm_head.weight"])
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        official.convert_state_dict(sd, CFG)

    hf = H.release_config(H.build_hf_captioner(CFG), H.vision_config_of(None, CFG))
    hf["encoder"]["encoder"]["hidden_act"] = "relu"
    with pytest.raises(ValueError, match=r"encoder\.encoder\.hidden_act is 'relu', expected 'gelu'"):
        official.captioner_config(good, hf)


def test_key_map_covers_every_tensor_once():
    ours = [o for o, _, _ in official.key_map(CFG)]
    assert sorted(ours) == sorted(Captioner(CFG).state_dict()) and len(set(ours)) == len(ours)


def test_generation_settings_of_the_release_are_reported(tmp_path):
    src = H.write_release(tmp_path / "rel", CFG)
    conf = json.loads((src / "config.json").read_text())
    conf.update(no_repeat_ngram_size=3, num_beams=5, length_penalty=1.0)  # only the first changes generate()
    (src / "config.json").write_text(json.dumps(conf))
    payload = official.convert(src, tmp_path / "model.pt")
    assert payload["spec"]["hf_generation"] == {"no_repeat_ngram_size": 3}


# -- export -----------------------------------------------------------------------------------------
def _our_checkpoint(path, cfg=CFG, tokens=TOKENS, seed=0, tok=None):
    """A random captioner of ours (every tensor moved off its init) saved as a training run would."""
    torch.manual_seed(seed)
    model = Captioner(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    grid = {"name": "clip_l14", "dim": cfg.feat_dim, "tokens": tokens}
    payload = captioner_payload(model.eval(), tok or CaptionTokenizer(), grid, {"run": "dico"}, step=1, val=None)
    torch.save(payload, path)
    return model.eval()


@pytest.mark.parametrize("zipped", [False, True])
def test_export_round_trip_and_the_release_runs_in_transformers(tmp_path, zipped):
    model = _our_checkpoint(tmp_path / "model.pt")
    out = tmp_path / ("export.zip" if zipped else "export")
    assert main(["export-official", "--checkpoint", str(tmp_path / "model.pt"), "--out", str(out),
                 *(["--zip"] if zipped else [])]) == 0
    back, _, payload = _convert_cli(out, tmp_path / "back.pt")  # ours -> official -> ours: exact
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert payload["backbone"]["tokens"] == TOKENS
    if zipped:
        with zipfile.ZipFile(out) as zf:
            assert sorted(zf.namelist()) == ["export/config.json", "export/pytorch_model.bin"]
        return
    sd = torch.load(out / "pytorch_model.bin", weights_only=True)  # a plain state dict, as 4.20 saved it
    assert sd["decoder.lm_head.weight"].data_ptr() == sd["decoder.transformer.wte.weight"].data_ptr()
    bridge, bert, gpt2 = H.load_modules(out)  # strict loads into transformers' classes
    feats = _feats(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(H.hf_logits((bridge, bert, gpt2), feats, CAPTIONS), model(feats, CAPTIONS),
                                   atol=1e-5, rtol=0)


def test_export_needs_the_full_vocabulary(tmp_path):
    cfg = CaptionerConfig(**{**CFG.__dict__, "vocab_size": 8})
    _our_checkpoint(tmp_path / "model.pt", cfg=cfg, tok=CaptionTokenizer([320, 1929, 530, 12, 269]))
    with pytest.raises(ValueError, match=r"model\.pt: its decoder predicts 8 ids .* only checkpoints trained with "
                                         r"model\.vocab: full can be exported"):
        official.export(tmp_path / "model.pt", tmp_path / "out")


def test_exported_vision_tower_is_hf_clip_and_gives_our_grid_features(tmp_path):
    """The ledger row "grid features are all 1+P tokens before ln_post", proven by transformers' own
    CLIPVisionModel (last_hidden_state) on the tower exported from an OpenAI-format CLIP."""
    from dico.demo.clip import build_tiny_clip, tiny_clip_config
    from dico.clip_weights import load_evaluator, save_evaluator

    clip = build_tiny_clip(tiny_clip_config(embed_dim=32, image_size=56, patch_size=14, vision_width=FEAT * 2,
                                            vision_layers=2, text_width=64, text_layers=1, context_length=16), seed=0)
    with torch.no_grad():  # move the LayerNorms off 1/0 so that a skipped or extra LN shows
        for p in clip.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_evaluator(clip, tmp_path / "clip.pt")
    cfg = CaptionerConfig(**{**CFG.__dict__, "feat_dim": FEAT * 2})
    _our_checkpoint(tmp_path / "model.pt", cfg=cfg, tokens=17)
    out = tmp_path / "export"
    assert main(["export-official", "--checkpoint", str(tmp_path / "model.pt"), "--out", str(out),
                 "--backbone-checkpoint", str(tmp_path / "clip.pt")]) == 0
    *_, tower = H.load_modules(out)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = tower(pixel_values=pixels).last_hidden_state
        ours = load_evaluator(tmp_path / "clip.pt").grid_features(pixels)
    assert hf.shape == ours.shape == (2, 17, FEAT * 2)
    torch.testing.assert_close(hf, ours, atol=1e-4, rtol=0)
    # and the export converts back (the tower is ignored by the converter)
    _, _, back = _convert_cli(out, tmp_path / "back.pt")
    assert back["backbone"]["tokens"] == 17

    bad = CaptionerConfig(**{**CFG.__dict__, "feat_dim": FEAT})  # features of another width
    _our_checkpoint(tmp_path / "other.pt", cfg=bad, tokens=17)
    with pytest.raises(ValueError, match=r"gives 17 x 64 grid features, but .*other\.pt was trained on 17 x 32"):
        official.export(tmp_path / "other.pt", tmp_path / "out2", backbone_checkpoint=tmp_path / "clip.pt")


# -- files from the internet are data ---------------------------------------------------------------
def test_pickled_objects_are_refused_unless_pinned_or_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("DICO_TRACEBACK", "1")  # the CLI re-raises, so the message is checked
    src = H.write_release(tmp_path / "rel", CFG)
    weights = src / "pytorch_model.bin"
    sd = torch.load(weights, weights_only=True)
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1e-6)}, weights)  # as a training script might
    with pytest.raises(ValueError, match=r"rel/pytorch_model\.bin pickles a Python object \(argparse\.Namespace\)"
                                         r".*official\.sha256.*--sha256.*official\.trust_pickle: true.*--trust-pickle"):
        _convert_cli(src, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"sha256 is [0-9a-f]{64}, but official\.sha256 \(--sha256\) pins 00"):
        _convert_cli(src, tmp_path / "a.pt", "--sha256", "00" * 32)
    pinned, *_ = _convert_cli(src, tmp_path / "b.pt", "--sha256", sha256_file(weights))
    trusted, *_ = _convert_cli(src, tmp_path / "c.pt", "--trust-pickle")
    want = H.to_captioner(H.build_hf_captioner(CFG), CFG).state_dict()
    assert all(torch.equal(pinned.state_dict()[k], v) and torch.equal(trusted.state_dict()[k], v)
               for k, v in want.items())
    archive = tmp_path / "rel.zip"  # a pinned archive pins what it holds
    with zipfile.ZipFile(archive, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"rel/{f.name}")
    _convert_cli(archive, tmp_path / "d.pt", "--sha256", sha256_file(archive))
