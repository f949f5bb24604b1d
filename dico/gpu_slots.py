"""GPU slots of one machine: which cards a job may use, handed out with file locks.

Snakemake's `--resources gpu=N` (the workstation profile sets N to the GPUs found) bounds how many GPUs
the running jobs ask for together; this module decides which ones each job gets. `dico gpu-run --gpus K
-- CMD` takes K free slots, each an exclusive `flock` on one lock file per card, runs CMD with
CUDA_VISIBLE_DEVICES naming those cards, and frees them when CMD ends. The kernel drops a flock when the
last descriptor of its file is closed, whoever closes it: the slots of a job killed with SIGKILL are free
again at once, with no stale lock to clean up. CMD inherits the descriptors, so a card stays taken for
as long as the job's command runs, even if the wrapper itself is killed first.

Where the cards come from (`devices`): DICO_FAKE_GPUS=N hands out N slots on a machine without GPUs (the
tests; CUDA_VISIBLE_DEVICES is set, torch still sees no GPU and `device: auto` runs on the CPU), else the
cards CUDA_VISIBLE_DEVICES already allows, else those `nvidia-smi -L` lists. The lock files live in
DICO_GPU_SLOTS_DIR (default: one folder per user in the temporary directory, so two pipelines of one user
on one machine share the cards instead of doubling them up).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

FAKE_ENV = "DICO_FAKE_GPUS"
DIR_ENV = "DICO_GPU_SLOTS_DIR"
HELD_ENV = "DICO_GPU_SLOTS"  # what the job's processes learn of their slots (JSON, see `held`)
LOG_PREFIX = "gpu-run:"      # the lines a job's log gets, one when the slots are taken, one when freed


def devices() -> list[str]:
    """The cards of this machine that jobs may be given, as CUDA_VISIBLE_DEVICES entries."""
    fake = os.environ.get(FAKE_ENV, "").strip()
    if fake:
        if not fake.isdigit():
            raise ValueError(f"{FAKE_ENV}={fake!r}: expected a number of fake GPU slots, e.g. {FAKE_ENV}=3")
        return [str(i) for i in range(int(fake))]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # "" hides every card; ids may be indices, GPU-<uuid> or MIG-<uuid>
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    return nvidia_smi_devices()


def nvidia_smi_devices() -> list[str]:
    """`nvidia-smi -L`'s cards ("GPU 0: NVIDIA H100 ... (UUID: ...)") as indices; none without the tool."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return re.findall(r"^GPU (\d+):", out.stdout, re.M) if out.returncode == 0 else []


def slots_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / f"dico-gpu-slots-{os.getuid()}")


def _lock_name(device: str) -> str:
    kind = "fake-gpu" if os.environ.get(FAKE_ENV, "").strip() else "gpu"
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.lock"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class Held:
    """Slots taken by this process: their indices among `devices()`, the cards, the open lock files."""
    slots: list[int]
    devices: list[str]
    fds: list[int] = field(repr=False)
    start: str
    directory: str

    def record(self) -> dict:
        return {"slots": self.slots, "devices": ",".join(self.devices), "start": self.start,
                "lock_dir": self.directory}

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)  # the last close of the file drops the flock
        self.fds = []


def _try_take(directory: Path, cards: list[str], n: int) -> list[tuple[int, str, int]] | None:
    """n free slots, locked, or None (and nothing kept locked: two jobs never sit on half their cards)."""
    taken = []
    for i, card in enumerate(cards):
        fd = os.open(directory / _lock_name(card), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)  # who holds it, for a person looking at the folder
        os.write(fd, f"pid {os.getpid()} since {now()}\n".encode())
        taken.append((i, card, fd))
        if len(taken) == n:
            return taken
    for _, _, fd in taken:
        os.close(fd)
    return None


def acquire(n: int, *, poll_s: float = 0.5, timeout_s: float | None = None, log=print) -> Held:
    """Take n slots, waiting (polling every poll_s) while fewer are free; TimeoutError after timeout_s."""
    cards = devices()
    if n < 1 or n > len(cards):
        raise ValueError(
            f"the job asks for {n} GPU slot(s) but this machine has {len(cards)} (from {_source()}); give it "
            f"1 to {len(cards)} (config `gpus.<rule>`; --profile workstation caps them at the GPUs found)"
            if cards else f"no GPU to hand out ({_source()} lists none); run without --profile workstation "
                          f"or set {FAKE_ENV}=N to rehearse with N fake slots")
    directory = slots_dir()
    directory.mkdir(parents=True, exist_ok=True)
    t0, waited = time.monotonic(), False
    while (taken := _try_take(directory, cards, n)) is None:
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"no {n} free GPU slot(s) of {len(cards)} in {directory} after {timeout_s:.0f} s")
        if not waited:
            log(f"{LOG_PREFIX} waiting for {n} free GPU slot(s) of {len(cards)} (lock files in {directory})")
            waited = True
        time.sleep(poll_s)
    return Held([i for i, _, _ in taken], [c for _, c, _ in taken], [fd for _, _, fd in taken], now(), str(directory))


def _source() -> str:
    if os.environ.get(FAKE_ENV, "").strip():
        return FAKE_ENV
    return "CUDA_VISIBLE_DEVICES" if "CUDA_VISIBLE_DEVICES" in os.environ else "nvidia-smi -L"


def held() -> dict | None:
    """Inside a job started by `run`: its slots, cards, start time and lock folder (for provenance)."""
    raw = os.environ.get(HELD_ENV)
    return json.loads(raw) if raw else None


def run(n: int, command: list[str], *, log=None) -> int:
    """Run `command` on n GPU slots; its exit status (128 + the signal's number when a signal ended it).
    SIGTERM, SIGUSR1 and SIGHUP reach the command (a training job checkpoints on them); Ctrl-C reaches it
    from the terminal directly, as it shares the process group."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    slots = acquire(n, log=log)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(slots.devices), HELD_ENV: json.dumps(slots.record())}
    log(f"{LOG_PREFIX} acquired {json.dumps(slots.record())}")
    try:
        proc = subprocess.Popen(command, env=env, pass_fds=slots.fds)
    except OSError:
        slots.release()
        raise
    forward = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum))
               for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command got the same Ctrl-C: let it decide
    rc = proc.wait()
    for s, previous in forward.items():
        signal.signal(s, previous)
    slots.release()
    status = rc if rc >= 0 else 128 - rc
    log(f"{LOG_PREFIX} released {json.dumps({**slots.record(), 'end': now(), 'exit': status})}")
    return status
