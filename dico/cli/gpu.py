"""`dico gpu-run`: a job's command on its own GPUs of this machine (what the GPU rules run under
`--profile workstation`; dico.gpu_slots hands out the cards)."""
from __future__ import annotations

import argparse

from .common import command


def cmd_gpu_run(args):
    from ..gpu_slots import run

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise SystemExit("give the command to run after --, e.g. dico gpu-run --gpus 1 -- dico generate ...")
    status = run(args.gpus, cmd)
    if status:
        exit_ = SystemExit()  # no message: the command's own output says why it failed
        exit_.code = status
        raise exit_


def register(subparsers) -> argparse.ArgumentParser:
    """Add `gpu-run` to the `dico` parser."""
    p = command(subparsers, "gpu-run", "run a command on its own GPUs of this machine (workstation profile)",
                cmd_gpu_run,
                description="Take --gpus free GPU slots of this machine (file locks, freed when the command "
                "ends or is killed), run the command with CUDA_VISIBLE_DEVICES set to their cards, and exit "
                "with its status. Cards: DICO_FAKE_GPUS=N (N fake slots, no GPU), else CUDA_VISIBLE_DEVICES, "
                "else `nvidia-smi -L`; lock files in DICO_GPU_SLOTS_DIR (default: a folder per user in the "
                "temporary directory). Both lines the job's log gets, `gpu-run: acquired {...}` and "
                "`gpu-run: released {...}`, name the slots, the cards and the times.")
    p.add_argument("--gpus", type=int, required=True, help="how many GPU slots the command needs")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the command and its arguments")
    return p
