"""Training loops: XE pre-training and fine-tuning (DiCO and the SCST baselines).

Both loops share one skeleton (`_Loop`): a resumable data order, validation every N steps that keeps
the best checkpoint, a JSONL training log and its TensorBoard curves (`dico.run_events`), a `last.pt`
with everything needed to continue bit-for-bit after a kill (model, optimiser, sampler position,
every RNG state, the log so far), and a clean exit on SIGTERM.

Fine-tuning step (official trainers/dico_trainer.py `compute_dico_loss`): the k final beams of a beam
search of width k from the current policy (no_grad; in train mode, i.e. with dropout, as the HF Trainer
runs it: `generation_mode`) -> rewards from their ids -> teacher-forced sequence log-probs of all k
candidates under the policy (with gradient, train mode) and, for DiCO, under the frozen XE model (eval
mode, no_grad) -> loss -> fp16 loss scaling, gradients summed over ranks (and over `grad_accum` passes
of whole images, a memory setting), no clipping by default -> Adam at a constant lr. Every row of
this is in docs/fidelity.md.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time

import torch

from . import runtime
from .checkpoint import captioner_payload, check_architecture, check_backbone, load_captioner
from .data import ImageRecord, load_split
from .features import FeatureStore, aligned_store, usable_rows
from .inference import decode_beams
from .io import atomic_path, write_text
from .losses import dico_diagnostics, dico_loss, scst_loss
from .model import Captioner, CaptionerConfig, sequence_logprobs, token_xe_loss
from .rewards import build_reward
from .run_events import RunEvents, events_dir
from .tokenizer import CaptionTokenizer
from .validation import Validator


def optimizer_step(params, opt, scaler: runtime.DynamicLossScaler, max_grad_norm, dist: runtime.Dist,
                   sched=None) -> dict:
    """Sum the gradients over ranks, unscale them, clip them if `train.max_grad_norm` is set (the
    official runs do not clip: null), and step the optimiser unless fp16 overflowed (then the step
    and the scheduler step are skipped and the loss scale updated, as DeepSpeed does)."""
    params = [p for p in params if p.grad is not None]
    dist.sum_gradients(params)
    finite = scaler.unscale_(params)
    grads = [p.grad for p in params]
    if max_grad_norm is not None and finite:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm(grads)
    if finite:
        opt.step()
        if sched is not None:
            sched.step()
    scaler.update(finite)
    opt.zero_grad(set_to_none=True)
    return {"grad_norm": float(grad_norm) if finite else None, "loss_scale": scaler.scale, "skipped": int(not finite)}


# -- the shared loop -----------------------------------------------------------------------------
class _Loop:
    """Step counting, validation, checkpoint selection, logging and resume for one run.

    Selection follows the official trainer (HF Trainer `evaluation_strategy steps`,
    `metric_for_best_model`, `load_best_model_at_end`): the model is validated every `val_every`
    steps and the best value of `select_by` (strictly greater wins, so the earliest of equal values
    stays) picks the checkpoint; a last step that is not a multiple of `val_every` is not validated.
    A fine-tuning run also validates its starting point (step 0) for the log and the curves; it is a
    candidate only with `selection.include_start: true` (the official code never evaluates step 0,
    so a fine-tuned row cannot be the start model in disguise). `patience` (opt-in) stops a run after
    that many validations without improvement.
    """

    def __init__(self, spec: dict, method_cfg: dict, work_dir, log, model, optimizer, sampler,
                 store: FeatureStore, tok: CaptionTokenizer, validator: Validator, scaler, scheduler=None,
                 dist: runtime.Dist | None = None, validate_start: bool = False):
        self.spec, self.cfg, self.log = spec, method_cfg, log
        self.dist = dist or runtime.Dist()
        self.work = runtime.WorkDir(work_dir)
        self.model, self.opt, self.sampler, self.sched = model, optimizer, sampler, scheduler
        self.store, self.tok, self.validator, self.scaler = store, tok, validator, scaler
        self.validate_start = validate_start
        self.include_start = validate_start and spec.get("selection", {}).get("include_start", False)
        self.step, self.best, self.rows, self.since_best = 0, None, [], 0
        if self.cfg["steps"] < self.cfg["val_every"] and not self.include_start:
            raise ValueError(f"{spec['run']}: steps {self.cfg['steps']} < val_every {self.cfg['val_every']}: the "
                             "run would never be validated, so no checkpoint could be selected; lower "
                             f"{spec['method']}.val_every or raise {spec['method']}.steps")
        self.stop = runtime.StopFlag()
        self._resume()
        # the curves of the rows it starts from (none, or those of last.pt); rank 0 writes
        self.events = RunEvents(events_dir(work_dir), self.rows, enabled=self.dist.main)

    def _resume(self):
        state = self.work.load_last()
        if state is None:
            return
        if state.get("spec") != self.spec:
            self.log(f"{self.work.last} was written with different settings; starting this run from scratch")
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["loss_scaler"])
        self.sampler.load_state_dict(state["sampler"])
        rngs = state["rng"]  # one RNG state per rank (dropout differs between ranks)
        if len(rngs) != self.dist.world:
            raise ValueError(f"{self.work.last} was written by {len(rngs)} processes, this run has "
                             f"{self.dist.world}; resume with the same number of GPUs or delete it")
        runtime.set_rng_state(rngs[self.dist.rank])
        self.step, self.best, self.rows = state["step"], state["best"], state["rows"]
        self.since_best = state["since_best"]
        self.log(f"resumed from step {self.step} ({self.work.last})")

    def _checkpoint(self):
        rngs = self.dist.gather(runtime.rng_state())
        if self.dist.main:
            self.work.save_last({"spec": self.spec, "step": self.step, "model": self.model.state_dict(),
                                 "optimizer": self.opt.state_dict(),
                                 "scheduler": self.sched.state_dict() if self.sched is not None else None,
                                 "loss_scaler": self.scaler.state_dict(),
                                 "sampler": self.sampler.state_dict(), "rng": rngs,
                                 "best": self.best, "rows": self.rows, "since_best": self.since_best})
            self.work.write_log(self.rows)
        self.dist.barrier()

    def _validate(self, candidate: bool = True):
        """On the main process only (the others wait at the next checkpoint's barrier)."""
        if not self.dist.main:
            return
        t0 = time.time()
        metrics = self.validator(self.model, self.tok)
        key = self.cfg["select_by"]
        if key not in metrics:
            raise KeyError(f"select_by {key!r} is not a validation metric (have: {', '.join(metrics)})")
        improved = candidate and (self.best is None or metrics[key] > self.best["value"])
        if improved:
            self.best = {"step": self.step, "value": metrics[key], "metric": key}
            self.since_best = 0
            self.work.save_best(captioner_payload(self.model, self.tok, self.store.grid, self.spec, self.step, metrics))
        elif candidate:
            self.since_best += 1
        row = {"step": self.step, "phase": "val", **metrics, "best": improved, "candidate": candidate,
               "val_s": round(time.time() - t0, 2)}
        self._append(row)
        note = " (best)" if improved else "" if candidate else " (start: logged, not a selection candidate)"
        self.log(f"step {self.step}: val " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                       if isinstance(v, float)) + note)

    def _patience_exhausted(self) -> bool:
        patience = self.cfg.get("patience")
        stop = bool(patience) and self.since_best >= patience
        return self.dist.any(stop)  # rank 0 decides (it validates); every rank must leave together

    def _log_row(self, stats: dict, sum_keys, seconds: float) -> None:
        """One training-log row with statistics reduced over ranks: keys in `sum_keys` are each rank's
        share of a global quantity (summed), the other numbers per-rank means (averaged)."""
        keys = [k for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k not in ("loss_scale", "skipped", "lr")]  # these three are the same on every rank
        reduced = self.dist.sum([float(stats[k]) for k in keys] + [seconds])
        world = self.dist.world
        row = {"step": self.step, "phase": "train", "step_s": round(reduced[-1] / world, 4), **stats}
        row.update({k: round(v if k in sum_keys else v / world, 6) for k, v in zip(keys, reduced)})
        self._append(row)

    def _append(self, row: dict) -> None:
        """A row of the training log, and its points on the TensorBoard curves."""
        self.rows.append(row)
        self.events.add(row)

    def run(self, step_fn, out_model, out_log, sum_keys=()):
        """Call `step_fn()` -> dict of logged numbers until cfg['steps']; validate every val_every."""
        from tqdm import tqdm

        total, every = self.cfg["steps"], self.cfg["val_every"]
        log_every = self.spec["train"]["log_every"]
        if self.step == 0 and self.validate_start:
            self.model.eval()
            self._validate(candidate=self.include_start)  # the starting point, for the log and curves
        self.model.train()
        bar = tqdm(total=total, initial=self.step, desc=self.spec["run"], unit="step", mininterval=2.0,
                   disable=not self.dist.main)
        while self.step < total:
            t0 = time.time()
            stats = step_fn()
            self.step += 1
            bar.update()
            if self.step % log_every == 0 or self.step == total:
                self._log_row(stats, sum_keys, time.time() - t0)
                bar.set_postfix(loss=f"{self.rows[-1]['loss']:.4f}")
            if self.step % every == 0:
                self.model.eval()
                self._validate()
                self.model.train()
                self._checkpoint()
                if self._patience_exhausted():
                    self.log(f"early stop at step {self.step}: {self.cfg['select_by']} has not improved in "
                             f"{self.cfg['patience']} validations (patience)")
                    self._append({"step": self.step, "phase": "early_stop", "patience": self.cfg["patience"]})
                    break
            if self.dist.any(self.stop.requested):
                self._checkpoint()
                bar.close()
                self.events.close()
                raise runtime.Preempted(self.step)
        bar.close()
        self.events.close()
        if self.dist.main:
            if self.best is None:
                raise RuntimeError("training ended without a selection candidate; check val_every and steps")
            self._finish(out_model, out_log)
        self.dist.barrier()

    def _finish(self, out_model, out_log):
        with atomic_path(out_model) as tmp:
            shutil.copyfile(self.work.best, tmp)
        write_text(out_log, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.log(f"best {self.best['metric']} {self.best['value']:.4f} at step {self.best['step']}; "
                 f"model written to {out_model}")


# -- XE ------------------------------------------------------------------------------------------
class CaptionBatches:
    """XE training batches: `batch_size` (image, caption) pairs per step.

    `captions_per_image: null` samples pairs uniformly, as the official code does (one sample =
    one pair). An integer c instead samples batch_size/c images and takes c of each image's
    captions (rotating through them from epoch to epoch): the visual encoder then runs once per
    image instead of once per caption, which is most of the cost of a step on CPU. Both orders are
    pure functions of (seed, epoch, offset), so a checkpoint can resume them exactly.
    """

    def __init__(self, records: list[ImageRecord], tok: CaptionTokenizer, max_len: int, seed: int,
                 captions_per_image: int | None):
        self.cpi = captions_per_image
        self.image_of, texts, self.first = [], [], []
        for i, r in enumerate(records):
            self.first.append(len(texts))
            for c in r.captions:
                self.image_of.append(i)
                texts.append(c)
        self.n_caps = torch.tensor([len(r.captions) for r in records])
        self.first = torch.tensor(self.first)
        self.image_of = torch.tensor(self.image_of)
        self.tokens = tok.batch_encode(texts, max_len)
        self.sampler = runtime.EpochSampler(len(records) if self.cpi else len(texts), seed)

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption ids [N, L], image index of each caption [N]); captions of an image are adjacent."""
        if not self.cpi:
            idx = self.sampler.next(batch_size)
            return self.tokens[idx], self.image_of[idx]
        epoch = self.sampler.epoch
        rows = []
        for i in self.sampler.next(max(1, batch_size // self.cpi)).tolist():
            n = int(self.n_caps[i])
            rows += [int(self.first[i]) + (epoch * self.cpi + j) % n for j in range(min(self.cpi, n))]
        return self.tokens[rows], self.image_of[rows]

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


def build_model(spec: dict, tok: CaptionTokenizer, feat_dim: int) -> Captioner:
    m = spec["model"]
    cfg = CaptionerConfig(feat_dim=feat_dim, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                          eos_id=tok.eos_id, d_model=m["d_model"], enc_layers=m["enc_layers"],
                          dec_layers=m["dec_layers"], n_heads=m["n_heads"], d_ff=m["d_ff"], dropout=m["dropout"],
                          max_dec_positions=m["max_dec_positions"])
    return Captioner(cfg)


def train_xe(spec: dict, splits_json, features: dict, work_dir, out_model, out_log, device: str, log=print,
             dist: runtime.Dist | None = None, grammar=None):
    """XE pre-training. `xe.batch_size` captions per forward pass (global: split over processes).
    `grammar`: a predicate text -> bool whose acceptance rate validation logs (fluent_pct)."""
    cfg, dist = spec["xe"], dist or runtime.Dist()
    train_records, val_records = load_split(splits_json, "train"), load_split(splits_json, "val")
    train_store = aligned_store(features["train"], train_records, "train")
    val_store = aligned_store(features["val"], val_records, "val")
    tok = CaptionTokenizer.build(spec["model"]["vocab"], (c for r in train_records for c in r.captions))
    rows = usable_rows(train_store, train_records)
    if len(rows) < len(train_records):
        log(f"XE: leaving out {len(train_records) - len(rows)} unreadable train images (features.skip_broken_images)")
    rows, train_records = torch.tensor(rows), [train_records[i] for i in rows]
    batches = CaptionBatches(train_records, tok, spec["model"]["max_caption_tokens"], spec["seed"],
                             cfg["captions_per_image"])
    log(f"XE: {len(train_records)} images, {len(batches.tokens)} captions, vocabulary {tok.vocab_size}, "
        f"features {train_store.index['tokens']}x{train_store.dim}")

    torch.manual_seed(spec["seed"])
    model = build_model(spec, tok, train_store.dim).to(device)
    log(f"captioner: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    runtime.maybe_compile(model, spec["train"]["compile"], log)
    opt = runtime.adam(model.parameters(), cfg["lr"], device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, constant_with_warmup(cfg["warmup_ratio"], cfg["steps"]))
    scaler = runtime.DynamicLossScaler.from_config(device, spec["train"])
    loop = _Loop(spec, cfg, work_dir, log, model, opt, batches, train_store, tok,
                 Validator(val_store, val_records, spec, device, grammar=grammar), scaler,
                 scheduler=sched, dist=dist)
    amp = spec["train"]["amp"]

    def step():
        total = 0.0
        for _ in range(cfg["grad_accum"]):
            caps, image_of = batches.next(cfg["batch_size"])
            global_tokens = int((caps[:, 1:] != tok.pad_id).sum())   # the mean is over the global batch
            mine = dist.share(len(caps), "xe.batch_size")
            caps, image_of = caps[mine], image_of[mine]
            caps = caps[:, : int((caps != tok.pad_id).sum(1).max())].to(device)
            images, owner = torch.unique(image_of, return_inverse=True)
            feats = train_store[rows[images]].to(device)
            with runtime.autocast(device, amp):
                # each image is encoded, and its cross-attention K/V projected, once for all its captions
                cache = model.new_cache(model.encode(feats))
                cache.reorder(owner.to(device))
                logits = model.decode(caps[:, :-1], None, cache)
                local_tokens = int((caps[:, 1:] != tok.pad_id).sum())
                loss = token_xe_loss(logits.float(), caps, tok.pad_id) * local_tokens / global_tokens
                loss = loss / cfg["grad_accum"]
            (loss * scaler.scale).backward()
            total += loss.item()  # this rank's share of the global mean: the log sums it over ranks
        lr = sched.get_last_lr()[0]  # the rate this step uses
        return {"loss": total, "lr": lr,
                **optimizer_step(model.parameters(), opt, scaler, spec["train"]["max_grad_norm"], dist, sched)}

    loop.run(step, out_model, out_log, sum_keys=("loss",))


def constant_with_warmup(warmup_ratio: float, steps: int):
    """The official XE schedule (`--lr_scheduler_type constant_with_warmup --warmup_ratio 0.05`): HF's
    warm-up of ceil(ratio * steps) steps, lr * step / warmup at step 0, 1, ... (so the first step
    runs at lr 0), then the constant lr."""
    warmup = math.ceil(warmup_ratio * steps)
    return lambda s: s / max(1, warmup) if s < warmup else 1.0


# -- fine-tuning: DiCO and SCST ------------------------------------------------------------------
def train_finetune(spec: dict, splits_json, features: dict, init_model, work_dir, out_model, out_log,
                   device: str, evaluators: dict, image_embs: dict, log=print, dist: runtime.Dist | None = None,
                   grammar=None):
    """`evaluators[name]` are loaded clip_models; `image_embs[name][split]` their cached image
    embeddings (train for the reward, val for validation). `batch_images` is global (split over
    processes, then into `grad_accum` passes). `grammar`: a predicate text -> bool whose acceptance
    rate validation logs (fluent_pct)."""
    dist = dist or runtime.Dist()
    method = spec["method"]
    cfg = spec[method]
    per_pass = images_per_pass(method, cfg, dist.world)  # before anything is loaded: a config error
    train_records, val_records = load_split(splits_json, "train"), load_split(splits_json, "val")
    train_store = aligned_store(features["train"], train_records, "train")
    val_store = aligned_store(features["val"], val_records, "val")
    policy, tok, payload = load_captioner(init_model, device)
    check_backbone(payload, train_store.grid, init_model)
    check_architecture(payload, spec, init_model)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if method == "dico" else None
    reward_fn = build_reward(spec["reward"], evaluators=evaluators,
                             image_embs={n: e["train"] for n, e in image_embs.items() if "train" in e},
                             train_refs=[list(r.captions) for r in train_records], tokenizer=tok,
                             max_len=spec["decoding"]["max_len"], precision=runtime.resolve_amp(device, spec["train"]["amp"]))
    sel = spec["selection"]
    scorers = {metric: (evaluators[sel[key]["model"]], image_embs[sel[key]["model"]]["val"],
                        sel[key]["w"], sel[key]["prefix"])
               for metric, key in (("CLIP-S", "clip_s"), ("PAC-S", "pac_s"))}
    validator = Validator(val_store, val_records, spec, device, scorers, grammar=grammar)
    log(f"{spec['run']}: {method} from {init_model} (XE step {payload['step']}), reward {spec['reward']}, "
        f"k={cfg['k']}, {cfg['batch_images']} images/step ({cfg['grad_accum']} pass(es) of {per_pass} per "
        f"process), lr {cfg['lr']}, candidates in "
        f"{cfg['generation_mode']} mode, {spec['decoding']['style']} beam search")

    torch.manual_seed(spec["seed"])
    runtime.maybe_compile(policy, spec["train"]["compile"], log)
    opt = runtime.adam(policy.parameters(), cfg["lr"], device)
    scaler = runtime.DynamicLossScaler.from_config(device, spec["train"])
    usable = torch.tensor(usable_rows(train_store, train_records))  # no reward for an unreadable image
    sampler = runtime.EpochSampler(len(usable), spec["seed"])
    loop = _Loop(spec, cfg, work_dir, log, policy, opt, sampler, train_store, tok, validator, scaler,
                 dist=dist, validate_start=True)
    step = FinetuneStep(spec, policy, reference, tok, reward_fn, train_store, usable, sampler, opt, scaler, dist,
                        device)
    loop.run(step, out_model, out_log)


def images_per_pass(method: str, cfg: dict, world: int) -> int:
    """Images per forward/backward pass on one process: the global batch `batch_images` split over
    `world` processes, then into `grad_accum` passes of whole images (an image's k candidates are
    never split: both losses are per image). Lowers the memory of a step, not what it computes."""
    images, passes = cfg["batch_images"], cfg["grad_accum"]
    if images % (world * passes):
        fits = [a for a in range(1, images + 1) if images % (world * a) == 0]
        raise ValueError(f"{method}.batch_images {images} does not split into {method}.grad_accum {passes} passes "
                         f"of whole images on each of {world} process(es); set {method}.batch_images to a "
                         f"multiple of {world * passes}" + (f" or {method}.grad_accum to one of {fits}" if fits else
                                                            " (or change the number of processes, train.processes)"))
    return images // (world * passes)


class FinetuneStep:
    """One fine-tuning step (official trainers/dico_trainer.py `compute_dico_loss`; module docstring):
    the k final beams of the policy's beam search as candidates, their rewards, their teacher-forced
    sequence log-probs under the policy (and, for DiCO, the frozen XE model), the DiCO or SCST loss and
    one optimiser step. The global batch of `batch_images` images runs in `grad_accum` passes of whole
    images per process (`images_per_pass`); returns the whole batch's logged numbers, with the time of
    each phase."""

    def __init__(self, spec: dict, policy, reference, tok: CaptionTokenizer, reward_fn, store: FeatureStore,
                 usable: torch.Tensor, sampler, opt, scaler, dist: runtime.Dist, device: str):
        self.spec, self.method = spec, spec["method"]
        self.cfg = spec[self.method]
        self.policy, self.reference, self.tok, self.reward_fn = policy, reference, tok, reward_fn
        self.store, self.usable, self.sampler, self.opt, self.scaler = store, usable, sampler, opt, scaler
        self.dist, self.device, self.amp = dist, device, spec["train"]["amp"]
        self.k = self.cfg["k"]
        self.per_pass = images_per_pass(self.method, self.cfg, dist.world)
        self.decoding = {**spec["decoding"], "beam_size": self.k}  # the k candidates are the k final beams
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def __call__(self) -> dict:
        times = dict.fromkeys(("gen_s", "reward_s", "logprob_s", "backward_s"), 0.0)
        idx = self.usable[self.sampler.next(self.cfg["batch_images"])]
        idx = idx[self.dist.share(len(idx), f"{self.method}.batch_images")]  # this rank's images
        passes = [self._pass(part, times) for part in idx.split(self.per_pass)]
        t = time.time()
        stepped = optimizer_step(self.policy.parameters(), self.opt, self.scaler, self.spec["train"]["max_grad_norm"],
                                 self.dist)  # one step (and one loss-scale update) per global batch
        self.sync()
        times["backward_s"] += time.time() - t
        return self._stats(passes, stepped, times)

    def _pass(self, idx: torch.Tensor, times: dict) -> dict:
        """Candidates, rewards, log-probs, loss and backward for the images `idx` (all k candidates of
        each); the pass's numbers, detached, for the step's log."""
        t = time.time()
        feats, cands = self._candidates(idx)
        times["gen_s"] += time.time() - t

        t = time.time()
        B, k = len(idx), self.k
        rewards = self.reward_fn(cands, idx.repeat_interleave(k)).to(self.device).view(B, k)
        times["reward_s"] += time.time() - t

        t = time.time()
        logps, ref_logps = self._logprobs(feats, cands, B)
        times["logprob_s"] += time.time() - t

        t = time.time()
        loss = self._backward(logps, ref_logps, rewards)
        times["backward_s"] += time.time() - t
        return {"loss": loss.item(), "rewards": rewards, "logps": logps.detach(), "ref_logps": ref_logps,
                "lengths": (cands != self.tok.pad_id).sum(1)}

    def _stats(self, passes: list[dict], stepped: dict, times: dict) -> dict:
        """The logged numbers of this rank's whole share of the batch (every pass, not the last one);
        the log averages them over ranks (equal shares), which gives the global batch's."""
        rewards = torch.cat([p["rewards"] for p in passes])
        loss = sum(p["loss"] * len(p["rewards"]) for p in passes) / len(rewards)  # mean over images
        stats = {"loss": loss, "reward_mean": float(rewards.mean()),
                 "reward_best": float(rewards.max(1).values.mean()),
                 # the spread of an image's k rewards, averaged over images: what SCST's baseline and DiCO's
                 # weights learn from (0 = every candidate scored alike, no signal)
                 "reward_std": float(rewards.std(1, unbiased=False).mean()), **stepped,
                 "mean_len": float(torch.cat([p["lengths"] for p in passes]).float().mean() - 1),
                 **{key: round(v, 4) for key, v in times.items()}}
        if self.method == "dico":
            stats.update(dico_diagnostics(torch.cat([p["logps"] for p in passes]),
                                          torch.cat([p["ref_logps"] for p in passes]), rewards,
                                          self.cfg["beta"], self.cfg["tau"]))
        return stats

    def _candidates(self, idx: torch.Tensor):
        """The features of the images `idx` and the k final beams of each."""
        feats = self.store[idx].to(self.device)
        # official: the HF Trainer keeps the policy in train() mode, so its beam search runs with dropout
        self.policy.train(self.cfg["generation_mode"] == "train")
        with torch.no_grad(), runtime.autocast(self.device, self.amp):
            beams, _ = decode_beams(self.policy, self.policy.encode(feats), self.decoding)
        self.policy.train()
        cands = beams.reshape(len(idx) * self.k, -1)
        self.sync()
        return feats, cands

    def _logprobs(self, feats, cands, B: int):
        """Sequence log-probs [B, k] of the candidates under the policy (with gradient) and, for DiCO,
        under the frozen reference (None for SCST)."""
        k, ref_logps = self.k, None
        with runtime.autocast(self.device, self.amp):
            logps = sequence_logprobs(self.policy, self.policy.encode(feats), cands, repeats=k).float().view(B, k)
            if self.reference is not None:
                with torch.no_grad():
                    ref_logps = sequence_logprobs(self.reference, self.reference.encode(feats), cands,
                                                  repeats=k).float().view(B, k)
        self.sync()
        return logps, ref_logps

    def _backward(self, logps, ref_logps, rewards):
        """Backward of the pass's loss weighted by its share of the global batch. Both losses are means
        over images of per-image terms (each image's k candidates are in one pass), so the weights
        B_pass / batch_images make the gradients summed over passes and ranks the global batch's."""
        if self.method == "dico":
            loss = dico_loss(logps, ref_logps, rewards, beta=self.cfg["beta"], tau=self.cfg["tau"])
        else:
            loss = scst_loss(logps, rewards)
        (loss * (self.scaler.scale * len(rewards) / self.cfg["batch_images"])).backward()
        self.sync()
        return loss
