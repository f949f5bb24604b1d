"""The DiCO captioner: Linear bridge -> BERT-style encoder -> GPT-2-style decoder with cross-attention.

Mirrors the official model (official main.py get_model, models/vision_encoder_*; docs/fidelity.md): frozen CLIP grid features are projected to
d_model, refined by a post-LN BERT encoder (no attention mask), and read by a pre-LN GPT-2 decoder
whose blocks have an extra cross-attention sub-layer. The LM head is tied to the token embedding.

Parameter names map 1:1 onto the released HF checkpoint (VisionEncoderDecoderModel whose encoder
is the DiCO VisionEncoderEncoderModel wrapping a BertModel, and whose decoder is GPT2LMHeadModel).
GPT-2 stores its Linear layers as Conv1D with weight [in, out]: transpose them (marked T).

    ours                                  official checkpoint
    bridge.{weight,bias}                  encoder.vis_enc_to_enc_proj.{weight,bias}
    encoder.wpe.weight                    encoder.encoder.embeddings.position_embeddings.weight
    encoder.type_emb                      encoder.encoder.embeddings.token_type_embeddings.weight[0]
    encoder.ln_emb                        encoder.encoder.embeddings.LayerNorm
    encoder.layers.{i}.query/key/value    encoder.encoder.encoder.layer.{i}.attention.self.query/key/value
    encoder.layers.{i}.proj               ...layer.{i}.attention.output.dense
    encoder.layers.{i}.ln_attn            ...layer.{i}.attention.output.LayerNorm
    encoder.layers.{i}.fc1                ...layer.{i}.intermediate.dense
    encoder.layers.{i}.fc2                ...layer.{i}.output.dense
    encoder.layers.{i}.ln_ffn             ...layer.{i}.output.LayerNorm
    decoder.wte / decoder.wpe             decoder.transformer.wte / wpe   (lm_head.weight is wte)
    decoder.h.{i}.ln_1 / ln_2             decoder.transformer.h.{i}.ln_1 / ln_2
    decoder.h.{i}.ln_cross                decoder.transformer.h.{i}.ln_cross_attn
    decoder.h.{i}.attn.c_attn / c_proj    decoder.transformer.h.{i}.attn.c_attn / c_proj        (T)
    decoder.h.{i}.cross.q_attn            decoder.transformer.h.{i}.crossattention.q_attn       (T)
    decoder.h.{i}.cross.c_attn / c_proj   decoder.transformer.h.{i}.crossattention.c_attn / c_proj (T; c_attn = [k|v])
    decoder.h.{i}.mlp.c_fc / c_proj       decoder.transformer.h.{i}.mlp.c_fc / c_proj          (T)
    decoder.ln_f                          decoder.transformer.ln_f
Unused on our side: BERT word_embeddings, token_type row 1 and pooler; GPT-2's attn.bias buffers;
the frozen CLIP tower (encoder.vision_encoder.*) lives outside this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class CaptionerConfig:
    feat_dim: int  # width of the frozen backbone grid features (1024 for CLIP ViT-L/14)
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    d_model: int = 512
    enc_layers: int = 3
    dec_layers: int = 3
    n_heads: int = 8
    d_ff: int = 2048
    dropout: float = 0.1
    max_enc_positions: int = 512  # BERT max positions (257 visual tokens used for ViT-L/14)
    max_dec_positions: int = 1024  # GPT-2 n_positions


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """[N, L, d] -> [N, H, L, d/H], the layout scaled_dot_product_attention wants."""
    N, L, d = x.shape
    return x.view(N, L, n_heads, d // n_heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    N, H, L, hd = x.shape
    return x.transpose(1, 2).reshape(N, L, H * hd)


class KVCache:
    """Keys/values of every decoder layer, for incremental decoding.

    self_kv[i] grows by the new positions at each call; cross_kv[i] is computed once from memory.
    Rows can be gathered (`reorder`) and replicated (`repeat_interleave`), which is what beam search
    needs: a beam continues the prefix of the row it came from.

    `cross_repeats` = r > 1 means cross_kv holds one row per image, shared by r consecutive rows
    (row n reads image n // r): the k beams or candidates of an image attend to one copy of its
    memory K/V instead of k copies (k times less memory traffic, and matrix-matrix instead of
    matrix-vector products in the cross-attention while decoding).
    """

    def __init__(self, n_layers: int):
        self.self_kv: list[tuple[Tensor, Tensor] | None] = [None] * n_layers
        self.cross_kv: list[tuple[Tensor, Tensor] | None] = [None] * n_layers
        self.cross_repeats = 1

    def __len__(self) -> int:  # number of positions already decoded
        return 0 if self.self_kv[0] is None else self.self_kv[0][0].size(2)

    def _map(self, fn, cross: bool = True):
        self.self_kv = [None if kv is None else (fn(kv[0]), fn(kv[1])) for kv in self.self_kv]
        if cross:
            self.cross_kv = [None if kv is None else (fn(kv[0]), fn(kv[1])) for kv in self.cross_kv]

    def _expand_cross(self) -> None:
        """One cross K/V row per cache row again (before a reorder that may mix images)."""
        if self.cross_repeats > 1:
            r = self.cross_repeats
            self.cross_kv = [None if kv is None else (kv[0].repeat_interleave(r, 0), kv[1].repeat_interleave(r, 0))
                             for kv in self.cross_kv]
            self.cross_repeats = 1

    def reorder(self, index: Tensor, cross: bool = True) -> None:
        """Row i becomes old row index[i]. `cross=False` skips the cross K/V, which is a no-op
        copy when rows only move among copies of the same image (beam search)."""
        if cross:
            self._expand_cross()
        self._map(lambda t: t.index_select(0, index), cross)

    def repeat_interleave(self, repeats: int) -> None:
        """Row n becomes rows n*repeats .. n*repeats+repeats-1; shared cross K/V stay shared."""
        self._map(lambda t: t.repeat_interleave(repeats, dim=0), cross=False)
        self.cross_repeats *= repeats


# ------------------------------------------------------------------------------------------------
# Encoder: BERT layers fed with projected features instead of word embeddings (post-LN).


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.p = cfg.n_heads, cfg.dropout
        self.query, self.key, self.value, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.ln_attn = nn.LayerNorm(d, eps=1e-12)
        self.fc1, self.fc2 = nn.Linear(d, cfg.d_ff), nn.Linear(cfg.d_ff, d)
        self.ln_ffn = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_heads(f(x), self.n_heads) for f in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        x = self.ln_attn(x + self.drop(self.proj(_merge(a))))
        return self.ln_ffn(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))  # exact (erf) GELU


class Encoder(nn.Module):
    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        self.wpe = nn.Embedding(cfg.max_enc_positions, cfg.d_model)
        self.type_emb = nn.Parameter(torch.zeros(cfg.d_model))  # BERT token type 0, the only one used
        self.ln_emb = nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))

    def forward(self, x: Tensor) -> Tensor:
        pos = torch.arange(x.size(1), device=x.device)
        x = self.drop(self.ln_emb(x + self.wpe(pos) + self.type_emb))
        for layer in self.layers:
            x = layer(x)
        return x


# ------------------------------------------------------------------------------------------------
# Decoder: GPT-2 blocks (pre-LN) with cross-attention on the encoder memory.


class SelfAttention(nn.Module):
    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        self.n_heads, self.p = cfg.n_heads, cfg.dropout
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # fused q|k|v as GPT-2
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: KVCache | None, i: int) -> Tensor:
        q, k, v = (_heads(t, self.n_heads) for t in self.c_attn(x).chunk(3, dim=-1))
        past = 0
        if cache is not None:
            if cache.self_kv[i] is not None:
                past = cache.self_kv[i][0].size(2)
                k = torch.cat([cache.self_kv[i][0], k], dim=2)
                v = torch.cat([cache.self_kv[i][1], v], dim=2)
            cache.self_kv[i] = (k, v)
        L = q.size(2)
        mask, causal = None, past == 0 and L > 1
        if past > 0 and L > 1:  # new queries sit at positions past..past+L-1: shift the triangle
            mask = torch.ones(L, past + L, dtype=torch.bool, device=x.device).tril(diagonal=past)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.p if self.training else 0.0
        )
        return self.drop(self.c_proj(_merge(a)))


class CrossAttention(nn.Module):
    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        self.n_heads, self.p = cfg.n_heads, cfg.dropout
        self.q_attn = nn.Linear(cfg.d_model, cfg.d_model)
        self.c_attn = nn.Linear(cfg.d_model, 2 * cfg.d_model)  # fused k|v of the memory
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.c_attn(memory).chunk(2, dim=-1)
        return _heads(k, self.n_heads), _heads(v, self.n_heads)

    def forward(self, x: Tensor, memory: Tensor | None, cache: KVCache | None, i: int) -> Tensor:
        r = 1
        if cache is None:
            k, v = self.kv(memory)
        else:  # the memory does not change while decoding: project it once
            if cache.cross_kv[i] is None:
                cache.cross_kv[i] = self.kv(memory)
            k, v = cache.cross_kv[i]
            r = cache.cross_repeats
        q = _heads(self.q_attn(x), self.n_heads)  # [N, H, L, hd]
        if r > 1:  # r consecutive rows share one memory row: fold them into the query length
            N, H, L, hd = q.shape
            q = q.view(N // r, r, H, L, hd).transpose(1, 2).reshape(N // r, H, r * L, hd)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        if r > 1:
            a = a.view(N // r, H, r, L, hd).transpose(1, 2).reshape(N, H, L, hd)
        return self.drop(self.c_proj(_merge(a)))


class MLP(nn.Module):
    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2 "gelu_new"


class Block(nn.Module):
    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        d = cfg.d_model
        self.ln_1, self.ln_cross, self.ln_2 = (nn.LayerNorm(d, eps=1e-5) for _ in range(3))
        self.attn, self.cross, self.mlp = SelfAttention(cfg), CrossAttention(cfg), MLP(cfg)

    def forward(self, x: Tensor, memory: Tensor | None, cache: KVCache | None, i: int) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, i)
        x = x + self.cross(self.ln_cross(x), memory, cache, i)
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_dec_positions, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.dec_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=1e-5)

    def forward(self, tokens: Tensor, memory: Tensor | None, cache: KVCache | None) -> Tensor:
        start = 0 if cache is None else len(cache)  # positions continue after the cached prefix
        pos = torch.arange(start, start + tokens.size(1), device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = block(x, memory, cache, i)
        return F.linear(self.ln_f(x), self.wte.weight)  # LM head tied to wte, no bias


# ------------------------------------------------------------------------------------------------


class Captioner(nn.Module):
    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        self.cfg = cfg
        self.bridge = nn.Linear(cfg.feat_dim, cfg.d_model)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.apply(self._init)
        # GPT-2 scales the residual output projections by 1/sqrt(2 * n_layer) to keep the
        # residual stream's variance from growing with depth.
        for name, p in self.decoder.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.dec_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:  # BERT/GPT-2 both use N(0, 0.02) and zero biases
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, Encoder):
            nn.init.normal_(m.type_emb, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied LM head is counted once

    def new_cache(self, memory: Tensor, repeats: int = 1) -> KVCache:
        """A cache whose cross K/V are projected once from `memory` [B,T,d] and shared by
        `repeats` consecutive rows (the beams of one image read one copy of its memory)."""
        cache = KVCache(self.cfg.dec_layers)
        cache.cross_kv = [blk.cross.kv(memory) for blk in self.decoder.h]
        cache.cross_repeats = repeats
        return cache

    def encode(self, feats: Tensor) -> Tensor:
        """Grid features [B,T,F] (any float dtype) -> memory [B,T,d]."""
        assert feats.size(1) <= self.cfg.max_enc_positions, "more visual tokens than positions"
        return self.encoder(self.bridge(feats.to(self.bridge.weight.dtype)))

    def decode(self, tokens: Tensor, memory: Tensor | None, cache: KVCache | None = None) -> Tensor:
        """Tokens [N,L] (model ids) + memory [N,T,d] -> logits [N,L,V].

        With a cache, `tokens` are only the new positions; the cache is updated in place and memory
        may be None once the cache holds the cross K/V (see `new_cache`).
        """
        return self.decoder(tokens, memory, cache)

    def forward(self, feats: Tensor, tokens: Tensor) -> Tensor:
        return self.decode(tokens, self.encode(feats))


def sequence_logprobs(model: Captioner, memory: Tensor, captions: Tensor, repeats: int = 1) -> Tensor:
    """Sum of token log-probs of each caption [N,L] = [BOS, w.., EOS, pad..] -> [N].

    Plain sum over the targets captions[:, 1:] that are not pad: EOS counts, BOS and pads do not,
    no length normalisation (official trainers/dico_trainer.py compute_dico_logps). A row without EOS (a beam cut at max length)
    counts all its tokens. Positions after EOS see EOS/pad as input, which only affects the
    masked targets (causal attention).

    memory rows must match caption rows, or, with `repeats=k`, memory has one row per image and
    captions k consecutive rows per image (the k candidates of DiCO/SCST): the cross-attention
    K/V are then projected once per image and shared by its candidates (gradients still flow).
    """
    targets = captions[:, 1:]
    if repeats > 1:
        assert memory.size(0) * repeats == captions.size(0), "captions must be k rows per memory row"
        logits = model.decode(captions[:, :-1], None, model.new_cache(memory, repeats)).float()
    else:
        logits = model.decode(captions[:, :-1], memory).float()
    nll = F.cross_entropy(  # ignored (pad) targets give 0
        logits.flatten(0, 1), targets.flatten(), ignore_index=model.cfg.pad_id, reduction="none"
    )
    return -nll.view_as(targets).sum(1)


def token_xe_loss(logits: Tensor, captions: Tensor, pad_id: int) -> Tensor:
    """Teacher-forcing cross-entropy, mean over non-pad targets.

    `logits` [B,L-1,V] come from `model(feats, captions[:, :-1])` (input [BOS, w..]); the targets
    are captions[:, 1:] ([w.., EOS], pads ignored).
    """
    targets = captions[:, 1:]
    assert logits.shape[:2] == targets.shape, "logits must be computed on captions[:, :-1]"
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=pad_id)
