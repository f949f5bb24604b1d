"""How a training job starts: one `dico` process, or torchrun with one process per GPU.

The workflow's training rules take their command and threads from here (`train.processes` of the
config, else the job's GPU count, `resources.gpu` of the SLURM profile). Batches are global, so the
result does not depend on the process count.
"""


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
