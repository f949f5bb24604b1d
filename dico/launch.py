"""How a job starts: its GPUs, one `dico` process or torchrun with one process per GPU, and on one
machine the `dico gpu-run` that gives it its own cards.

Every GPU rule asks for `gpus.<rule>` of the config as resource `gpu` (`resources`). SLURM gives a job
its GPUs (`--profile slurm`: sbatch --gpus). On one machine with a GPU limit (`--profile workstation`,
or `--resources gpu=N`) Snakemake caps each job's count at N and runs no more than N GPUs' worth of jobs
at once, and `gpu_run` puts `dico gpu-run` in front of the command, which gives each job its own cards
(dico.gpu_slots). The training rules take their command and threads from here (`train.processes` of
the config, else the job's GPU count). Batches are global, so the result does not depend on the
process count.
"""


def resources(config: dict, rule: str) -> dict:
    """`resources:` of a GPU rule: gpu=gpus.<rule> (none when 0: a CPU-only job)."""
    n = config["gpus"][rule]
    return {"gpu": n} if n else {}


def gpu_run(gpus: int | None, slots: bool) -> str:
    """`dico gpu-run --gpus K -- ` before a GPU job's command where slots are handed out (`slots`: a
    local run with a GPU limit), else nothing."""
    return f"dico gpu-run --gpus {gpus} -- " if slots and gpus else ""


def gpu_params(slots: bool) -> dict:
    """`params:` of a GPU rule's jobs (Snakemake calls each with the job's resources): `gpu`, the
    `gpu_run` prefix of its command, untracked (switching between profiles reruns nothing)."""
    from .download import Untracked

    def gpu(wildcards, resources):
        """`dico gpu-run --gpus K -- `, or nothing."""
        return Untracked(gpu_run(getattr(resources, "gpu", 0), slots))

    return {"gpu": gpu}


def training_params(config: dict, slots: bool) -> dict:
    """`params:` of a training rule's jobs: `gpu` (gpu_params), `launch` (`command`) and `threads`
    (`threads_per_process`), from train.processes and the job's GPUs."""
    configured = config["train"]["processes"]

    def launch(wildcards, resources):
        """`dico`, or `torchrun --standalone --nproc_per_node=N -m dico`."""
        return command(configured, getattr(resources, "gpu", 0))

    def threads(wildcards, threads, resources):
        return threads_per_process(configured, getattr(resources, "gpu", 0), threads)

    return {**gpu_params(slots), "launch": launch, "threads": threads}


def processes(configured: int | None, gpus: int | None) -> int:
    """The number of training processes: `train.processes` when set (the CPU rehearsal,
    config/rehearsal.yaml: 2 gloo processes on CPU, as the 2-GPU SLURM jobs), else one per GPU."""
    return configured if configured is not None else max(1, int(gpus or 0))


def command(configured: int | None, gpus: int | None) -> str:
    """`torchrun --standalone --nproc_per_node=N -m dico` when `train.processes` is set (1 still starts
    torchrun) or the job has several GPUs; plain `dico` otherwise."""
    if configured is None and int(gpus or 0) <= 1:
        return "dico"
    return f"torchrun --standalone --nproc_per_node={processes(configured, gpus)} -m dico"


def threads_per_process(configured: int | None, gpus: int | None, threads: int) -> int:
    """`--threads` of each training process: the job's threads shared by its processes (2 CPU processes
    of a 2-thread job get 1 each instead of oversubscribing the cores)."""
    return max(1, threads // processes(configured, gpus))
