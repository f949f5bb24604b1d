import itertools

import pytest
import torch

from dico.decoding import beam_search, greedy
from dico.model import Captioner, CaptionerConfig, sequence_logprobs

torch.set_num_threads(1)

BOS, EOS, PAD = 0, 1, 2


def tiny(seed=0, vocab=5) -> Captioner:
    """A tiny random captioner in eval mode, weights spread so logits are far from uniform."""
    torch.manual_seed(seed)
    cfg = CaptionerConfig(feat_dim=6, vocab_size=vocab, pad_id=PAD, bos_id=BOS, eos_id=EOS,
                          d_model=16, enc_layers=1, dec_layers=2, n_heads=2, d_ff=32,
                          max_enc_positions=16, max_dec_positions=32)
    model = Captioner(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model.eval()


def memory(model, B=1, seed=1):
    """A random encoder output. Used directly (not via encode) with few, large tokens so that the
    image visibly changes the captions of a random model."""
    return 3.0 * torch.randn(B, 2, model.cfg.d_model, generator=torch.Generator().manual_seed(seed))


def pad_to(tokens, L):
    out = torch.full((*tokens.shape[:-1], L), PAD, dtype=torch.long)
    out[..., : tokens.size(-1)] = tokens
    return out


def all_sequences(vocab, max_len):
    """Every sequence beam search can return: words then EOS, or max_len-1 words (cut, no EOS)."""
    words = [t for t in range(vocab) if t not in (BOS, EOS, PAD)]
    seqs = [[BOS, *w, EOS] for n in range(max_len - 1) for w in itertools.product(words, repeat=n)]
    seqs += [[BOS, *w] for w in itertools.product(words, repeat=max_len - 1)]
    return pad_to(torch.tensor([s + [PAD] * (max_len - len(s)) for s in seqs]), max_len)


def reference_beam(model, mem, k, max_len):
    """Naive beam search, same semantics, each prefix recomputed from scratch."""
    V = model.cfg.vocab_size
    beams = [([BOS], 0.0, False)]
    for _ in range(max_len - 1):
        cands = []
        for seq, score, done in beams:
            if done:
                cands.append((seq + [PAD], score, True))
                continue
            logp = model.decode(torch.tensor([seq]), mem)[0, -1].log_softmax(-1)
            for t in range(V):
                if t not in (BOS, PAD):
                    cands.append((seq + [t], score + logp[t].item(), t == EOS))
        beams = sorted(cands, key=lambda c: -c[1])[:k]
        if all(done for _, _, done in beams):
            break
    return torch.tensor([s for s, _, _ in beams]), torch.tensor([c for _, c, _ in beams])


@pytest.mark.parametrize("seed", [0, 1])
def test_large_beam_is_exhaustive(seed):
    model, max_len = tiny(seed), 4
    mem = memory(model, seed=seed + 1)
    seqs = all_sequences(5, max_len)  # 1 + 2 + 4 + 8 = 15 sequences
    exact = sequence_logprobs(model, mem.expand(len(seqs), -1, -1), seqs)
    order = exact.argsort(descending=True)
    for k in (15, 17):  # 17: two filler rows
        tokens, scores = beam_search(model, mem, beam_size=k, max_len=max_len)
        assert tokens.shape == (1, k, max_len)
        assert torch.equal(tokens[0, :15], seqs[order])
        torch.testing.assert_close(scores[0, :15], exact[order], atol=1e-5, rtol=1e-5)
        assert scores[0, 15:].isneginf().all()
        assert (tokens[0, 15:, 0] == BOS).all() and (tokens[0, 15:, 1:] == PAD).all()


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (3, 2), (3, 7)])
def test_small_beam_matches_reference(k, seed):
    model, max_len = tiny(seed, vocab=8), 6
    mem = memory(model, seed=seed)
    tokens, scores = beam_search(model, mem, beam_size=k, max_len=max_len)
    ref_tokens, ref_scores = reference_beam(model, mem, k, max_len)
    assert torch.equal(pad_to(tokens[0], max_len), pad_to(ref_tokens, max_len))
    torch.testing.assert_close(scores[0], ref_scores, atol=1e-5, rtol=1e-5)


def test_cache_and_scores_consistent():
    model = tiny(1, vocab=8)  # mixes beams that end early, late and at max_len
    mem = memory(model, B=3, seed=0)
    tokens, scores = beam_search(model, mem, beam_size=4, max_len=8)
    tokens_nc, scores_nc = beam_search(model, mem, beam_size=4, max_len=8, use_cache=False)
    assert torch.equal(tokens, tokens_nc)
    torch.testing.assert_close(scores, scores_nc, atol=1e-5, rtol=1e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    # scores are the teacher-forced log-probs of the returned sequences
    flat = tokens.flatten(0, 1)
    lp = sequence_logprobs(model, mem.repeat_interleave(4, 0), flat)
    torch.testing.assert_close(scores.flatten(), lp, atol=1e-5, rtol=1e-5)
    assert not ((flat == BOS)[:, 1:]).any()  # BOS/pad never generated mid-sequence


def test_batch_equals_one_by_one():
    model = tiny(1, vocab=8)
    mem = memory(model, B=3, seed=1)
    tokens, scores = beam_search(model, mem, beam_size=3, max_len=7)
    for b in range(3):
        t, s = beam_search(model, mem[b : b + 1], beam_size=3, max_len=7)
        assert torch.equal(pad_to(t[0], 7), pad_to(tokens[b], 7))
        torch.testing.assert_close(s[0], scores[b], atol=1e-5, rtol=1e-5)


def test_greedy_equals_beam_one():
    model = tiny(4, vocab=8)  # rows 0 and 3 stop at once, the others run to max_len
    mem = memory(model, B=4, seed=3)
    g = greedy(model, mem, max_len=7)
    assert torch.equal(g, greedy(model, mem, max_len=7, use_cache=False))
    b, _ = beam_search(model, mem, beam_size=1, max_len=7)
    assert torch.equal(pad_to(g, 7), pad_to(b[:, 0], 7))
    assert (g[:, 0] == BOS).all() and g.size(1) <= 7


def test_stops_when_all_beams_end():
    model = tiny(1, vocab=8)
    tokens, scores = beam_search(model, memory(model, seed=2), beam_size=3, max_len=10)
    assert tokens.shape == (1, 3, 4)  # stopped after 3 steps: every beam emitted EOS
    assert ((tokens[0] == EOS).sum(1) == 1).all()
    model = tiny(7, vocab=8)
    assert greedy(model, memory(model, B=3, seed=0), max_len=10).tolist() == [[BOS, EOS]] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = tiny(1, vocab=8)
    mem = memory(model, B=3, seed=0)
    tokens, scores = beam_search(model, mem, beam_size=4, max_len=8)
    g = greedy(model, mem, max_len=8)
    model.cuda()
    t_gpu, s_gpu = beam_search(model, mem.cuda(), beam_size=4, max_len=8)
    assert torch.equal(t_gpu.cpu(), tokens)
    torch.testing.assert_close(s_gpu.cpu(), scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(greedy(model, mem.cuda(), max_len=8).cpu(), g)
    for use_cache in (True, False):  # fp16 runs end to end (scores are computed in fp32)
        t16, s16 = beam_search(model.half(), mem.cuda().half(), beam_size=4, max_len=8, use_cache=use_cache)
        assert t16.shape[:2] == (3, 4) and s16.dtype == torch.float32 and s16.isfinite().all()
