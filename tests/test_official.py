"""dico.official: a random captioner written in the released checkpoint's HF layout (names spelled
out here from HF's BertModel / GPT2LMHeadModel conventions, independently of dico.official's
table) converts back to identical logits; wrong checkpoints fail naming the key."""
import json
import shutil
import zipfile

import pytest
import torch

from dico import official
from dico.model import Captioner, CaptionerConfig
from dico.tokenizer import CLIP_BOS, CLIP_EOS, CLIP_PAD, CLIP_VOCAB
from dico.train import load_captioner

D, ENC, DEC, HEADS, FEAT = 64, 2, 2, 4, 32  # the official sizes (512, 3+3, 8, 1024) scaled down
IMAGE, PATCH = 56, 14  # -> 17 visual tokens


def random_captioner(seed=0) -> Captioner:
    torch.manual_seed(seed)
    cfg = CaptionerConfig(feat_dim=FEAT, vocab_size=CLIP_VOCAB, pad_id=CLIP_PAD, bos_id=CLIP_BOS, eos_id=CLIP_EOS,
                          d_model=D, enc_layers=ENC, dec_layers=DEC, n_heads=HEADS, d_ff=4 * D,
                          max_enc_positions=40, max_dec_positions=48)
    model = Captioner(cfg)
    with torch.no_grad():  # LayerNorms start at 1/0: perturb everything so that a swapped name shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_config() -> dict:
    return {"model_type": "vision-encoder-decoder", "is_encoder_decoder": True, "vocab_size": CLIP_VOCAB,
            "encoder": {"model_type": "vision-encoder-encoder",
                        "vision_encoder": {"model_type": "clip_vision_model", "hidden_size": FEAT,
                                           "image_size": IMAGE, "patch_size": PATCH},
                        "encoder": {"model_type": "bert", "hidden_size": D, "num_hidden_layers": ENC,
                                    "num_attention_heads": HEADS, "intermediate_size": 4 * D, "hidden_act": "gelu",
                                    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "type_vocab_size": 2,
                                    "vocab_size": 100, "position_embedding_type": "absolute"}},
            "decoder": {"model_type": "gpt2", "n_embd": D, "n_layer": DEC, "n_head": HEADS, "n_inner": None,
                        "n_positions": 48, "vocab_size": CLIP_VOCAB, "activation_function": "gelu_new",
                        "layer_norm_epsilon": 1e-5, "add_cross_attention": True, "resid_pdrop": 0.1,
                        "bos_token_id": CLIP_BOS, "eos_token_id": CLIP_EOS, "pad_token_id": CLIP_PAD}}


def hf_state_dict(model: Captioner) -> dict:
    """The VisionEncoderDecoderModel state dict holding `model`'s weights (plus the keys we drop)."""
    s = {k: v.clone() for k, v in model.state_dict().items()}
    conv = lambda name: s[name].t().contiguous()  # noqa: E731  GPT-2 Conv1D stores [in, out]
    bert, gpt = "encoder.encoder", "decoder.transformer"
    sd = {"encoder.vis_enc_to_enc_proj.weight": s["bridge.weight"], "encoder.vis_enc_to_enc_proj.bias": s["bridge.bias"],
          # the frozen CLIP tower, BERT's unused tables and buffers, GPT-2's mask buffers: present, ignored
          "encoder.vision_encoder.embeddings.class_embedding": torch.randn(FEAT),
          "encoder.vision_encoder.encoder.layers.0.mlp.fc1.weight": torch.randn(8, FEAT),
          f"{bert}.embeddings.word_embeddings.weight": torch.randn(100, D),
          f"{bert}.embeddings.position_ids": torch.arange(40)[None],
          f"{bert}.embeddings.position_embeddings.weight": s["encoder.wpe.weight"],
          f"{bert}.embeddings.token_type_embeddings.weight": torch.stack([s["encoder.type_emb"], torch.randn(D)]),
          f"{bert}.embeddings.LayerNorm.weight": s["encoder.ln_emb.weight"],
          f"{bert}.embeddings.LayerNorm.bias": s["encoder.ln_emb.bias"],
          f"{bert}.pooler.dense.weight": torch.randn(D, D), f"{bert}.pooler.dense.bias": torch.randn(D),
          f"{gpt}.wte.weight": s["decoder.wte.weight"], f"{gpt}.wpe.weight": s["decoder.wpe.weight"],
          f"{gpt}.ln_f.weight": s["decoder.ln_f.weight"], f"{gpt}.ln_f.bias": s["decoder.ln_f.bias"],
          "decoder.lm_head.weight": s["decoder.wte.weight"]}
    for i in range(ENC):
        hf, ours = f"{bert}.encoder.layer.{i}", f"encoder.layers.{i}"
        for a, b in [("attention.self.query", "query"), ("attention.self.key", "key"), ("attention.self.value", "value"),
                     ("attention.output.dense", "proj"), ("attention.output.LayerNorm", "ln_attn"),
                     ("intermediate.dense", "fc1"), ("output.dense", "fc2"), ("output.LayerNorm", "ln_ffn")]:
            sd[f"{hf}.{a}.weight"], sd[f"{hf}.{a}.bias"] = s[f"{ours}.{b}.weight"], s[f"{ours}.{b}.bias"]
    for i in range(DEC):
        hf, ours = f"{gpt}.h.{i}", f"decoder.h.{i}"
        for a, b in [("ln_1", "ln_1"), ("ln_2", "ln_2"), ("ln_cross_attn", "ln_cross")]:
            sd[f"{hf}.{a}.weight"], sd[f"{hf}.{a}.bias"] = s[f"{ours}.{b}.weight"], s[f"{ours}.{b}.bias"]
        for a, b in [("attn.c_attn", "attn.c_attn"), ("attn.c_proj", "attn.c_proj"),
                     ("crossattention.q_attn", "cross.q_attn"), ("crossattention.c_attn", "cross.c_attn"),
                     ("crossattention.c_proj", "cross.c_proj"), ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")]:
            sd[f"{hf}.{a}.weight"], sd[f"{hf}.{a}.bias"] = conv(f"{ours}.{b}.weight"), s[f"{ours}.{b}.bias"]
        for att in ("attn", "crossattention"):
            sd[f"{hf}.{att}.bias"] = torch.ones(1, 1, 48, 48).tril().bool()
            sd[f"{hf}.{att}.masked_bias"] = torch.tensor(-1e4)
    return sd


def write_release(tmp_path, model, fmt: str):
    """The release as a nested folder zipped with model.safetensors, or an unzipped folder with
    pytorch_model.bin (torch.save keeps lm_head sharing wte's storage, as HF 4.20 wrote it)."""
    folder = tmp_path / "release" / "dico-ViTL14"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config()))
    sd = hf_state_dict(model)
    if fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(folder / "model.safetensors"))
    archive = tmp_path / "dico-ViTL14.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"dico-ViTL14/{f.name}")
    shutil.rmtree(tmp_path / "release")
    return archive


@pytest.mark.parametrize("fmt", ["safetensors-zip", "bin"])
def test_converted_release_gives_identical_logits(tmp_path, fmt):
    model = random_captioner()
    src = write_release(tmp_path, model, fmt)
    out = tmp_path / "runs" / "dico_official" / "model.pt"
    if fmt == "bin":  # through the CLI, as the rule runs it
        from dico.cli import main

        assert main(["convert-official", "--src", str(src), "--out", str(out)]) == 0
    else:
        official.convert(src, out)
    ours, tok, payload = load_captioner(out)
    assert payload["tokenizer"] == {"clip_ids": None} and tok.vocab_size == CLIP_VOCAB
    assert payload["backbone"] == {"name": "clip_l14", "dim": FEAT, "tokens": (IMAGE // PATCH) ** 2 + 1}
    assert payload["run"] == "dico_official"
    feats = torch.randn(2, 17, FEAT)
    tokens = torch.tensor([[CLIP_BOS, 320, 1929, 530, 12], [CLIP_BOS, 786, 49, CLIP_EOS, CLIP_PAD]])
    with torch.no_grad():
        want, got = model(feats, tokens), ours(feats, tokens)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_wrong_checkpoints_fail_naming_the_key():
    model = random_captioner()
    cfg = model.cfg
    good = hf_state_dict(model)

    sd = dict(good)  # a Conv1D weight stored as a Linear one (not transposed)
    sd["decoder.transformer.h.1.mlp.c_fc.weight"] = sd["decoder.transformer.h.1.mlp.c_fc.weight"].t()
    with pytest.raises(ValueError, match=r"decoder\.transformer\.h\.1\.mlp\.c_fc\.weight has shape \(256, 64\) "
                                         r"after transposing .* but decoder\.h\.1\.mlp\.c_fc\.weight needs \(256, 64\)"):
        official.convert_state_dict(sd, cfg)

    sd = dict(good)
    del sd["encoder.encoder.encoder.layer.0.attention.self.key.bias"]
    sd["decoder.enc_to_dec_proj.weight"] = torch.zeros(D, D)
    with pytest.raises(ValueError, match=r"missing encoder\.encoder\.encoder\.layer\.0\.attention\.self\.key\.bias"
                                         r"(.|\n)*unexpected decoder\.enc_to_dec_proj\.weight"):
        official.convert_state_dict(sd, cfg)

    sd = dict(good)
    sd["decoder.lm_head.weight"] = torch.zeros_like(sd["decoder.lm_head.weight"])
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        official.convert_state_dict(sd, cfg)

    hf = hf_config()
    hf["encoder"]["encoder"]["hidden_act"] = "relu"
    with pytest.raises(ValueError, match=r"encoder\.encoder\.hidden_act is 'relu', expected 'gelu'"):
        official.captioner_config(good, hf)


def test_key_map_covers_every_tensor_once():
    cfg = random_captioner().cfg
    ours = [o for o, _, _ in official.key_map(cfg)]
    assert sorted(ours) == sorted(Captioner(cfg).state_dict()) and len(set(ours)) == len(ours)
