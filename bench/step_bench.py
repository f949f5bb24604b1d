"""One DiCO fine-tuning step, phase by phase, as dico.train.train_finetune runs it.

The step (dico/train.py, `FinetuneStep`) with the same library calls:
  gen      - beam_search(policy, policy.encode(feats), k, max_len) under no_grad, policy in eval mode;
  reward   - ClipReward on the B*k candidates' ids (a tiny random open_clip CLIP as
             the evaluator: text tower 2 layers x 64, 77 tokens; cached random image embeddings);
  logprob  - sequence_logprobs(policy, policy.encode(feats), cands, repeats=k) with gradient (train
             mode, dropout on) and the same for the frozen reference (eval, no_grad);
  backward - dico_loss -> backward -> clip_grad_norm_ -> Adam step -> zero_grad.
Models: the paper-size captioner (d=512, 3+3 layers, vocab 10k) for policy and reference. CPU runs
use ViT-B/32-like features (50 tokens x 768) instead of ViT-L/14's 257 x 1024, which would make the
encoder passes dominate a CPU step; every beam runs to max_len (EOS pinned at 0, see
common.paper_captioner), which is the worst case (COCO captions are ~12 tokens).

The ratio printed is the whole step with the fast paths (KV-cached beam search with shared cross
K/V; log-probs with one memory K/V per image for its k candidates) against the same step without
them (use_cache=False beam search; memory repeated k times for the log-probs).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from common import caption_tokenizer, paper_captioner, tiny_evaluator

VOCAB = 10_000
PHASES = ("gen", "reward", "logprob", "backward")


class DicoStep:
    """One DiCO step with the library's functions; `fast=False` runs it without the fast paths.

    Device-neutral: gpu.py runs it on CUDA under train.amp autocast (dico.runtime.autocast, as train.py)
    and a fused Adam; phases are timed with a device synchronisation at their end, as train.py does.
    """

    def __init__(self, batch_images: int, k: int = 5, max_len: int = 30, tokens: int = 50, feat_dim: int = 768,
                 n_train: int = 512, seed: int = 0, vocab: int = VOCAB, device: str = "cpu", amp: str = "none",
                 evaluator=None, fused_adam: bool = False, model_kw: dict | None = None):
        from dico.rewards import ClipReward

        self.B, self.k, self.max_len, self.device, self.amp = batch_images, k, max_len, device, amp
        self.tok = caption_tokenizer(vocab)
        self.policy = paper_captioner(vocab, feat_dim=feat_dim, seed=seed, tok=self.tok, **(model_kw or {}))
        self.policy.to(device)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=1e-6, **({"fused": True} if fused_adam else {}))
        g = torch.Generator().manual_seed(seed)
        # the fp16 feature store (resident on the device, as a GPU run would keep it)
        self.features = torch.randn(n_train, tokens, feat_dim, generator=g).half().to(device)
        evaluator = evaluator or tiny_evaluator()
        evaluator.to(device)
        embs = torch.nn.functional.normalize(torch.randn(n_train, evaluator.embed_dim, generator=g), dim=-1)
        self.reward_fn = ClipReward(evaluator, embs.to(device), w=2.0, tokenizer=self.tok)
        self.order = torch.randperm(n_train, generator=g)
        self.pos = 0
        self.mean_len = None
        self.sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def _next_indices(self) -> torch.Tensor:
        if self.pos + self.B > len(self.order):
            self.pos = 0
        idx = self.order[self.pos:self.pos + self.B]
        self.pos += self.B
        return idx

    def __call__(self, fast: bool = True) -> dict[str, float]:
        from dico.decoding import beam_search
        from dico.losses import dico_loss
        from dico.model import sequence_logprobs
        from dico.runtime import autocast

        policy, reference, k, B, dev, amp = self.policy, self.reference, self.k, self.B, self.device, self.amp
        times = {}
        t = time.perf_counter()
        idx = self._next_indices()
        feats = self.features[idx.to(self.features.device)].float()
        policy.eval()
        with torch.no_grad(), autocast(dev, amp):
            beams, _ = beam_search(policy, policy.encode(feats), beam_size=k, max_len=self.max_len, use_cache=fast)
        policy.train()
        cands = beams.reshape(B * k, -1)
        self.sync()
        times["gen"] = time.perf_counter() - t

        t = time.perf_counter()
        rewards = self.reward_fn(cands, idx.repeat_interleave(k)).to(dev).view(B, k)
        self.sync()
        times["reward"] = time.perf_counter() - t

        t = time.perf_counter()
        with autocast(dev, amp):
            if fast:
                logps = sequence_logprobs(policy, policy.encode(feats), cands, repeats=k).float().view(B, k)
                with torch.no_grad():
                    ref_logps = sequence_logprobs(reference, reference.encode(feats), cands,
                                                  repeats=k).float().view(B, k)
            else:
                logps = sequence_logprobs(policy, policy.encode(feats).repeat_interleave(k, 0),
                                          cands).float().view(B, k)
                with torch.no_grad():
                    ref_logps = sequence_logprobs(reference, reference.encode(feats).repeat_interleave(k, 0),
                                                  cands).float().view(B, k)
        self.sync()
        times["logprob"] = time.perf_counter() - t

        t = time.perf_counter()
        loss = dico_loss(logps, ref_logps, rewards, beta=0.2, tau=300.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sync()
        times["backward"] = time.perf_counter() - t
        self.mean_len = float((cands != self.tok.pad_id).sum(1).float().mean() - 1)
        assert torch.isfinite(loss), "DiCO loss is not finite"
        return times


def run_steps(step: DicoStep, repeats: int, with_naive: bool) -> tuple[dict, float | None]:
    """Median per-phase seconds of the fast step (and the median whole naive step), interleaved."""
    step(True)  # warm-up
    fast, naive = [], []
    for r in range(repeats):
        order = (True, False) if r % 2 == 0 else (False, True)
        for is_fast in order:
            if is_fast:
                fast.append(step(True))
            elif with_naive:
                naive.append(sum(step(False).values()))
    phases = {p: statistics.median(t[p] for t in fast) for p in PHASES}
    phases["total"] = statistics.median(sum(t.values()) for t in fast)
    return phases, (statistics.median(naive) if naive else None)


def shares(ph: dict) -> str:
    return ", ".join(f"{p} {ph[p] / sum(ph[q] for q in PHASES) * 100:.0f}%" for p in PHASES)


def bench_dico_step(quick: bool, batch_images: int | None = None, repeats: int | None = None) -> str:
    B = batch_images or (4 if quick else 8)
    repeats = repeats or 3
    step = DicoStep(B)
    ph, naive = run_steps(step, repeats, with_naive=True)
    return (f"dico_step: DiCO training step, {B} images x k=5 beams (max_len 30, all {step.mean_len:.0f} tokens), "
            f"paper-size captioner (vocab {VOCAB // 1000}k) on 50x768 features, tiny-CLIP ClipReward, Adam; "
            f"median of {repeats}: {ph['total']:.2f} s/step = {1 / ph['total']:.2f} steps/s "
            f"({B / ph['total']:.1f} images/s); phases {shares(ph)}; "
            f"fast step (KV-cached beams, shared memory K/V in log-probs) vs naive step "
            f"({naive:.2f} s vs {ph['total']:.2f} s) {naive / ph['total']:.1f}x")


def scaling_dico_step(quick: bool) -> list[str]:
    sizes = (4, 8) if quick else (4, 8, 16)
    repeats = 2 if quick else 3
    res = {}
    for B in sizes:
        res[B], _ = run_steps(DicoStep(B), repeats, with_naive=False)
    lo, hi = sizes[0], sizes[-1]
    return [f"scaling_dico_step: fast DiCO step at batch " + "/".join(map(str, sizes)) + " images (k=5): s/step "
            + " / ".join(f"{res[B]['total']:.2f}" for B in sizes) + "; images/s "
            + " / ".join(f"{B / res[B]['total']:.1f}" for B in sizes) + "; phase shares "
            + " | ".join(f"B={B}: {shares(res[B])}" for B in sizes)
            + f"; t(B={hi})/t(B={lo}) {res[hi]['total'] / res[lo]['total']:.1f}x"]
