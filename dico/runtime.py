"""What every training job needs around its loop: device, seeds, precision, a resumable data order,
checkpoints that survive `kill -9`, and a SIGTERM handler for SLURM preemption.

Resumable state lives in `results/runs/<run>/work/`, which is not a declared Snakemake output:
Snakemake deletes the declared outputs of an incomplete job before rerunning it, and we must not
lose the last checkpoint with them.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path, remove_stale_temporaries, torch_save


def select_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was configured but torch sees no GPU; set device: auto or cpu")
    return name


def configure(seed: int, deterministic: bool, threads: int | None = None) -> None:
    """Seed every generator and pick deterministic kernels (recorded in provenance)."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # = torch.use_deterministic_algorithms(True, warn_only=True), minus its import of
        # torch._inductor (~1.3 s a job on a 2-core VM) to set the compiler's flag: `maybe_compile`
        # sets that one when train.compile asks for the compiler
        torch.set_deterministic_debug_mode("warn")
        torch.backends.cudnn.benchmark = False


def resolve_amp(device: str, amp: str) -> str:
    """The precision `train.amp` means on `device`: "fp16", "bf16" or "none". CPU always runs fp32
    (autocast there only slows the small models down); `auto` = bf16 where the GPU supports it."""
    if not str(device).startswith("cuda") or amp == "none":
        return "none"
    if amp == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return amp


def autocast(device: str, amp: str):
    """fp16/bf16 autocast on GPU per `resolve_amp`; a no-op on CPU."""
    amp = resolve_amp(device, amp)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class DynamicLossScaler:
    """fp16 loss scaling with the rules of DeepSpeed's dynamic loss scaler, which the official runs use
    (configs/config_adam_zero2.json: fp16 with initial_scale_power 16, loss_scale_window 1000,
    hysteresis 2, min_loss_scale 1).

    The loss is multiplied by `scale` before backward; the gradients are divided by it before the
    optimiser step. If any gradient is inf/NaN (an overflow), the step is skipped and the scale
    handled like DeepSpeed does:
      - overflow with hysteresis left > 1: spend one unit of hysteresis, keep the scale;
      - overflow otherwise: scale = max(scale / 2, min_scale);
      - no overflow: every `window` iterations since the last overflow, scale *= 2 and the
        hysteresis is refilled.
    With hysteresis 1 and no minimum this is exactly torch.amp.GradScaler(init_scale, growth
    factor 2, backoff 0.5, growth_interval=window), which the tests use as the reference. Disabled
    (scale 1, never skips) unless the step runs in fp16 on a GPU: bf16 and fp32 need no scaling.
    """

    def __init__(self, enabled: bool, initial: float = 2.0 ** 16, window: int = 1000, hysteresis: int = 2,
                 min_scale: float = 1.0):
        self.enabled, self.window, self.hysteresis, self.min_scale = enabled, window, hysteresis, min_scale
        self.scale = float(initial) if enabled else 1.0
        self.hysteresis_left = hysteresis
        self.iteration, self.last_overflow = 0, -1
        self.skipped = 0

    @classmethod
    def from_config(cls, device: str, train_cfg: dict) -> "DynamicLossScaler":
        ls = train_cfg["loss_scale"]
        return cls(resolve_amp(device, train_cfg["amp"]) == "fp16", initial=ls["initial"], window=ls["window"],
                   hysteresis=ls["hysteresis"], min_scale=ls["min"])

    def unscale_(self, params) -> bool:
        """Divide every gradient by the scale; True if they are all finite (the step may go ahead).
        Call after the gradients are summed over ranks, so every rank takes the same decision."""
        if not self.enabled:
            return True
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        torch._foreach_mul_(grads, 1.0 / self.scale)
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        return bool(finite)

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.skipped += 1
            if self.hysteresis_left > 1:
                self.hysteresis_left -= 1
            else:
                self.scale = max(self.scale / 2.0, self.min_scale)
            self.last_overflow = self.iteration
        elif (self.iteration - self.last_overflow) % self.window == 0:
            self.hysteresis_left = self.hysteresis
            self.scale *= 2.0
        self.iteration += 1

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "hysteresis_left", "iteration", "last_overflow", "skipped")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def adam(params, lr: float, device: str) -> torch.optim.Adam:
    """Adam; on CUDA the fused kernel (one launch for every parameter instead of a loop of
    foreach kernels). CPU keeps the default implementation, so CPU results stay comparable with
    earlier runs (the fused CPU kernel agrees to ~1e-7 but not bitwise)."""
    return torch.optim.Adam(params, lr=lr, fused=True if str(device).startswith("cuda") else None)


def maybe_compile(model: torch.nn.Module, enabled: bool, log=print) -> torch.nn.Module:
    """`train.compile`: compile the captioner's encoder layers and decoder blocks in place
    (`Module.compile`, dynamic shapes: caption and beam lengths vary), so parameter names and
    checkpoints are unchanged. The KV-cache bookkeeping between blocks stays eager."""
    if not enabled:
        return model
    if torch.are_deterministic_algorithms_enabled():  # `configure` left the compiler's own flag alone
        torch.use_deterministic_algorithms(True, warn_only=torch.is_deterministic_algorithms_warn_only_enabled())
    blocks = [*model.encoder.layers, *model.decoder.h]
    for block in blocks:
        block.compile(dynamic=True)
    log(f"train.compile: {len(blocks)} transformer blocks compiled with torch.compile (dynamic shapes); "
        "the first steps include the compilation")
    return model


def rng_state() -> dict:
    """Every generator's state. On a GPU only the current device's (the rank's own, selected by
    Dist.setup): asking for all devices would create a CUDA context on every GPU of the node in
    every rank."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class EpochSampler:
    """Shuffled indices, a fresh permutation per epoch drawn from (seed, epoch) alone, so the
    position (epoch, offset) is all a checkpoint needs to continue the exact same data order."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("cannot sample batches from an empty split")
        self.n, self.seed, self.epoch, self.offset = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next(self, batch: int) -> torch.Tensor:
        out = []
        while batch > 0:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation()
            take = min(batch, self.n - self.offset)
            out.append(self._perm[self.offset:self.offset + take])
            self.offset += take
            batch -= take
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._perm = self._permutation()


class Preempted(SystemExit):
    """Raised after a checkpoint was written because SLURM (or a user) sent SIGTERM."""

    def __init__(self, step: int):
        super().__init__(f"SIGTERM received: checkpoint saved at step {step}; rerun to resume")
        self.code = 143


class StopFlag:
    """Turns SIGTERM/SIGUSR1 into a flag the training loop checks between steps, so the job writes
    a checkpoint and exits non-zero instead of dying mid-step. SLURM sends SIGTERM at preemption and
    at the time limit (and SIGUSR1 ahead of time with `--signal=USR1@<sec>`)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not in the main thread
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


class WorkDir:
    """`last.pt` (everything to resume), `best.pt` (the selected model) and `log.jsonl`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)  # half-written checkpoints of a killed attempt
        self.last, self.best, self.log_file = self.path / "last.pt", self.path / "best.pt", self.path / "log.jsonl"

    def load_last(self) -> dict | None:
        if not self.last.exists():
            return None
        try:
            return torch.load(self.last, map_location="cpu", weights_only=False)
        except Exception as e:  # a corrupt last.pt must not block a rerun: start over, loudly
            bad = self.last.with_suffix(".corrupt")
            os.replace(self.last, bad)
            print(f"warning: {self.last} unreadable ({e}); moved to {bad} and starting from scratch")
            return None

    def save_last(self, state: dict) -> None:
        torch_save(state, self.last)

    def save_best(self, payload: dict) -> None:
        torch_save(payload, self.best)

    def write_log(self, rows: list[dict]) -> None:
        with atomic_path(self.log_file) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- multi-GPU (torchrun) ---------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets these for every worker, even with --nproc_per_node=1."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_WORLD_SIZE" in os.environ and "RANK" in os.environ)


class Dist:
    """Rank and world size of a `torchrun` launch; one process without a process group otherwise.

    Launched by torchrun, the process joins a process group even when it is alone
    (`--nproc_per_node=1`), so one GPU exercises every collective of the multi-GPU path. The group is
    NCCL on GPUs, gloo on CPU. NCCL only reduces CUDA tensors, so every tensor collective here is made
    on `self.device` (the rank's device), never on the default device.

    Batches are GLOBAL: every rank draws the same global batch from the shared-seed sampler and takes
    its own contiguous share, losses are normalised by global counts and gradients are summed across
    ranks, so N processes compute the same update as one process with the same global batch.
    """

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")
        self.group = False

    @property
    def enabled(self) -> bool:
        """True when collectives run (a process group was joined), whatever the world size."""
        return self.group

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        """The process group's backend (nccl, gloo), or "none" without one."""
        return torch.distributed.get_backend() if self.group else "none"

    def setup(self, device: str) -> str:
        """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU) and return this
        rank's device."""
        if device.startswith("cuda") and (self.world > 1 or launched_by_torchrun()):
            torch.cuda.set_device(self.local_rank)
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        if self.world > 1 or launched_by_torchrun():
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            self.group = True
        return device

    def share(self, n: int, what: str = "batch") -> slice:
        """This rank's contiguous part of a global batch of n items."""
        if n % self.world:
            raise ValueError(f"a global {what} of {n} does not split evenly over {self.world} processes")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def sum_gradients(self, params) -> None:
        """All-reduce (sum) the gradients in one flat buffer: losses are already normalised globally."""
        if not self.enabled:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a few numbers, in one all-reduce on this rank's device."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (e.g. one rank received SIGTERM)."""
        return self.sum([float(flag)])[0] > 0

    def gather(self, obj):
        """Every rank's `obj` on every rank (a list indexed by rank). Under NCCL the pickled objects
        travel as tensors of the current CUDA device, which `setup` selected."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if self.device.type == "cuda":  # NCCL's barrier needs the device it should sync on
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()
