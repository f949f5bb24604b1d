import pytest
import torch
import torch.nn.functional as F

from dico.model import Captioner, CaptionerConfig, KVCache, sequence_logprobs, token_xe_loss

torch.set_num_threads(1)

BOS, EOS, PAD = 0, 1, 2


def tiny(seed=0, vocab=9, **kw) -> Captioner:
    """A tiny random captioner in eval mode, weights spread so logits are far from uniform."""
    torch.manual_seed(seed)
    cfg = dict(feat_dim=6, vocab_size=vocab, pad_id=PAD, bos_id=BOS, eos_id=EOS, d_model=16,
               enc_layers=2, dec_layers=2, n_heads=2, d_ff=32, max_enc_positions=16,
               max_dec_positions=32)
    cfg.update(kw)
    model = Captioner(CaptionerConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def feats(B=2, T=5, F=6, seed=1):
    return torch.randn(B, T, F, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_dtype():
    model = tiny()
    x = feats()
    mem = model.encode(x.double())  # feats of any float dtype are cast to the model's
    assert mem.shape == (2, 5, 16) and mem.dtype == torch.float32
    tokens = torch.randint(3, 9, (2, 7))
    assert model(x, tokens).shape == (2, 7, 9)
    assert model.decode(tokens[:1].repeat(4, 1), mem[:1].repeat(4, 1, 1)).shape == (4, 7, 9)


def test_parameter_count():
    base = tiny().num_parameters()
    assert tiny(d_model=32).num_parameters() > base
    assert tiny(dec_layers=3).num_parameters() > base
    assert tiny(vocab=20).num_parameters() - base == 11 * 16  # tied head: only wte grows
    names = dict(tiny().named_parameters())
    for n in ["bridge.weight", "encoder.type_emb", "encoder.layers.0.query.bias",
              "decoder.h.1.cross.q_attn.weight", "decoder.h.0.attn.c_attn.weight", "decoder.ln_f.bias"]:
        assert n in names
    assert names["decoder.h.0.attn.c_attn.weight"].shape == (48, 16)
    assert names["decoder.h.0.cross.c_attn.weight"].shape == (32, 16)


def test_causal_mask():
    model, x = tiny(), feats()
    tokens = torch.randint(3, 9, (2, 6))
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] - 3 + 1) % 6 + 3
    a, b = model(x, tokens), model(x, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_cache_matches_full_forward():
    model, x = tiny(), feats(B=3)
    mem = model.encode(x)
    tokens = torch.randint(0, 9, (3, 8))
    full = model.decode(tokens, mem)
    # one token at a time, with the cross K/V filled lazily from memory
    cache = model.new_cache(mem)
    steps = [model.decode(tokens[:, t : t + 1], None, cache) for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # uneven chunks exercise the shifted causal mask (several new queries after a prefix)
    cache = KVCache(model.cfg.dec_layers)
    chunks = [model.decode(tokens[:, a:b], mem, cache) for a, b in [(0, 3), (3, 4), (4, 8)]]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)
    assert len(cache) == 8


def test_cache_reorder_and_repeat():
    model, x = tiny(), feats(B=2)
    mem = model.encode(x)
    tokens = torch.randint(3, 9, (6, 5))
    cache = model.new_cache(mem, repeats=3)  # rows 0-2 image 0, rows 3-5 image 1
    model.decode(tokens[:, :4], None, cache)
    index = torch.tensor([2, 2, 0, 5, 3, 3])
    cache.reorder(index, cross=False)
    step = model.decode(tokens[index, 4:5], None, cache)
    full = model.decode(tokens[index], mem.repeat_interleave(3, 0))
    torch.testing.assert_close(step[:, 0], full[:, 4], atol=1e-5, rtol=1e-5)



def test_shared_cross_kv_equals_copies():
    """new_cache(repeats=r) keeps one cross K/V per image (cross_repeats=r): same logits as r
    copies, also after repeat_interleave and after a reorder that mixes images (which expands)."""
    model, x = tiny(), feats(B=2)
    mem = model.encode(x)
    tokens = torch.randint(3, 9, (6, 5))
    shared = model.new_cache(mem, repeats=3)
    assert shared.cross_repeats == 3 and shared.cross_kv[0][0].size(0) == 2
    copies = model.new_cache(mem.repeat_interleave(3, 0))
    torch.testing.assert_close(model.decode(tokens[:, :3], None, shared),
                               model.decode(tokens[:, :3], None, copies), atol=1e-5, rtol=1e-5)
    index = torch.tensor([4, 0, 0, 5, 1, 3])  # rows move across images
    shared.reorder(index)
    assert shared.cross_repeats == 1
    step = model.decode(tokens[index, 3:4], None, shared)
    full = model.decode(tokens[index, :4], mem.repeat_interleave(3, 0)[index])
    torch.testing.assert_close(step[:, 0], full[:, 3], atol=1e-5, rtol=1e-5)
    # repeat_interleave of a shared cache stays shared: row n reads image n // 6
    cache = model.new_cache(mem, repeats=3)
    model.decode(tokens[:, :2], None, cache)
    cache.repeat_interleave(2)
    assert cache.cross_repeats == 6 and len(cache) == 2
    step = model.decode(tokens.repeat_interleave(2, 0)[:, 2:3], None, cache)
    full = model.decode(tokens.repeat_interleave(2, 0)[:, :3], mem.repeat_interleave(6, 0))
    torch.testing.assert_close(step[:, 0], full[:, 2], atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_repeats_gradient_equals_copies():
    """The shared cross K/V of repeats=k give the same log-probs and parameter gradients."""
    model, x = tiny(), feats(B=2)
    caps = torch.tensor([[BOS, 5, EOS, PAD], [BOS, 3, 4, EOS], [BOS, 7, 7, 7],
                         [BOS, EOS, PAD, PAD], [BOS, 6, 5, EOS], [BOS, 8, EOS, PAD]])
    grads = []
    for shared in (True, False):
        model.zero_grad()
        mem = model.encode(x)
        lp = (sequence_logprobs(model, mem, caps, repeats=3) if shared
              else sequence_logprobs(model, mem.repeat_interleave(3, 0), caps))
        (lp * torch.arange(1.0, 7.0)).sum().backward()
        grads.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], atol=1e-5, rtol=1e-4, msg=name)

def hand_logprob(model, mem, seq):
    """Sum of log p(next | prefix) over a caption's tokens after BOS, up to and including EOS."""
    total = 0.0
    for t in range(1, len(seq)):
        if seq[t] == PAD:
            break
        logits = model.decode(torch.tensor([seq[:t]]), mem)[0, -1]
        total += logits.log_softmax(-1)[seq[t]].item()
        if seq[t] == EOS:
            break
    return total


def test_sequence_logprobs_matches_hand_loop():
    model, x = tiny(), feats(B=1)
    mem = model.encode(x)
    caps = torch.tensor([
        [BOS, 5, 3, 7, EOS, PAD, PAD],
        [BOS, EOS, PAD, PAD, PAD, PAD, PAD],
        [BOS, 4, 4, 8, 6, 3, 5],  # cut at max length: no EOS, all 6 tokens count
        [BOS, 8, EOS, PAD, PAD, PAD, PAD],
    ])
    got = sequence_logprobs(model, mem.expand(4, -1, -1), caps)
    want = torch.tensor([hand_logprob(model, mem, c) for c in caps.tolist()])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_padding_and_eos():
    model, x = tiny(), feats(B=1)
    mem = model.encode(x).expand(3, -1, -1)
    caps = torch.tensor([[BOS, 5, 3, EOS], [BOS, 5, 3, EOS], [BOS, 5, 3, PAD]])
    padded = torch.cat([caps, torch.full((3, 4), PAD)], 1)
    a, b = sequence_logprobs(model, mem, caps), sequence_logprobs(model, mem, padded)
    torch.testing.assert_close(a, b)
    # EOS counts: with it the sum is lower by -log p(EOS | BOS 5 3)
    lp_eos = model.decode(caps[:1, :3], mem[:1])[0, -1].log_softmax(-1)[EOS]
    torch.testing.assert_close(a[0] - a[2], lp_eos, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_gradient():
    model, x = tiny(), feats(B=2)
    model.zero_grad()
    caps = torch.tensor([[BOS, 5, EOS, PAD], [BOS, 3, 4, EOS]])
    sequence_logprobs(model, model.encode(x), caps).sum().backward()
    for name in ["decoder.wte.weight", "decoder.h.0.attn.c_attn.weight",
                 "decoder.h.1.cross.c_attn.weight", "encoder.layers.0.query.weight", "bridge.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_token_xe_loss_ignores_pads():
    model, x = tiny(), feats(B=2)
    caps = torch.tensor([[BOS, 5, 3, 7, EOS], [BOS, 4, EOS, PAD, PAD]])
    loss = token_xe_loss(model(x, caps[:, :-1]), caps, PAD)
    # reference: each row unpadded on its own, then the mean over all 4 + 2 target tokens
    rows = [caps[0], caps[1, :3]]
    total = sum(
        F.cross_entropy(model(x[i : i + 1], r[None, :-1])[0], r[1:], reduction="sum")
        for i, r in enumerate(rows)
    )
    torch.testing.assert_close(loss, total / 6, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_train_mode():
    model, x = tiny(), feats()
    tokens = torch.randint(3, 9, (2, 5))
    torch.testing.assert_close(model(x, tokens), model(x, tokens), atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    a = model(x, tokens)
    b = model(x, tokens)
    assert not torch.allclose(a, b)


@pytest.mark.slow  # ~1 min of inductor compilation on a CPU
def test_compiled_blocks_give_the_same_beams_logprobs_gradients_and_checkpoint_names():
    import copy

    from dico import runtime
    from dico.decoding import beam_search

    eager = tiny(seed=4, vocab=12).eval()
    compiled = runtime.maybe_compile(copy.deepcopy(eager), True, log=lambda *a: None)
    assert runtime.maybe_compile(eager, False) is eager  # train.compile: false is a no-op
    assert list(compiled.state_dict()) == list(eager.state_dict())
    mem_e, mem_c = eager.encode(feats(B=3)), compiled.encode(feats(B=3))
    beams_e, scores_e = beam_search(eager, mem_e, beam_size=3, max_len=7)
    beams_c, scores_c = beam_search(compiled, mem_c, beam_size=3, max_len=7)
    assert torch.equal(beams_e, beams_c) and torch.allclose(scores_e, scores_c, atol=1e-5)
    caps = beams_e.reshape(9, -1)
    lp_e = sequence_logprobs(eager, eager.encode(feats(B=3)), caps, repeats=3)
    lp_c = sequence_logprobs(compiled, compiled.encode(feats(B=3)), caps, repeats=3)
    lp_e.sum().backward()
    lp_c.sum().backward()
    assert torch.allclose(lp_e, lp_c, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_deterministic_mode_without_the_compiler_import_and_the_compiler_flag_when_compiling():
    """runtime.configure(deterministic=True) is torch.use_deterministic_algorithms(True, warn_only=True)
    without that call's import of torch._inductor (seconds of every job's start-up); maybe_compile
    sets the compiler's deterministic flag when the compiler is used. A fresh interpreter, so that
    nothing else has imported the compiler yet."""
    import subprocess
    import sys

    code = """
import sys, torch
from dico import runtime
runtime.configure(0, True)
assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
assert "torch._inductor" not in sys.modules, "configure imported the compiler"
from dico.model import Captioner, CaptionerConfig
model = Captioner(CaptionerConfig(feat_dim=6, vocab_size=9, pad_id=2, bos_id=0, eos_id=1, d_model=16, enc_layers=1,
                                  dec_layers=1, n_heads=2, d_ff=32, max_enc_positions=16, max_dec_positions=32))
runtime.maybe_compile(model, True, log=lambda *a: None)
import torch._inductor.config as inductor_config
assert inductor_config.deterministic is True
assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
