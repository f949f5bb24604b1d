"""TensorBoard curves of a training run, in `tensorboard/` beside the run's `work/` folder
(results/runs/<run>/tensorboard/ in the pipeline).

Every row of the training log (train_log.jsonl: "train", "val" and "early_stop" rows) becomes scalars
tagged "<phase>/<key>" at the row's step, one per number in the row (booleans are not curves), each
the log's value as a 32-bit float (TensorBoard's scalar: its default, fast loader shows no 64-bit
scalars at all); a validation row's example caption becomes the text "val/example/text_summary".

The curves are a function of the log's rows, and the rows of a resumed run are those saved in its
`work/last.pt`. So a run that starts, from scratch or resumed, rewrites the folder as one new event
file holding the rows it starts from (at their first wall times where the old files still have them),
then removes the old files, then appends as it trains: a resumed run continues the same curves, and
every reader (TensorBoard, `wandb sync`, a raw reader of the files) sees each step once, whatever a
killed attempt had written after its last checkpoint. Only the main process of a torchrun launch
writes. The folder is not a declared output of the workflow: Snakemake neither checks nor deletes it.
"""
from __future__ import annotations

from pathlib import Path

PATTERN = "events.out.tfevents.*"


def events_dir(work_dir) -> Path:
    """The event folder of the run whose resumable state is `work_dir` (a sibling: <run>/tensorboard)."""
    return Path(work_dir).parent / "tensorboard"


def scalars(row: dict) -> dict[str, float]:
    """A log row's curves: {"<phase>/<key>": value} for every int or float of the row but its step."""
    return {f"{row['phase']}/{key}": float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"training writes TensorBoard curves, but {e}; install the pinned tensorboard "
                          "(pip install -e '.[torch]', or the env envs/train.yaml)") from e
    return SummaryWriter


def _wall_times(files) -> dict[tuple[str, int], float]:
    """{(tag, step): wall time} of the events in `files` (a truncated last record ends a file's read)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    walls = {}
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                walls.setdefault((value.tag, event.step), event.wall_time)
    return walls


class RunEvents:
    """The event writer of one run: the rows it starts from, then `add(row)` for each new log row and
    `close()` at the end. Nothing is written where `enabled` is false (ranks other than 0)."""

    def __init__(self, path, rows: list[dict], enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        writer_class = _writer_class()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        old = sorted(path.glob(PATTERN))
        walls = _wall_times(old)
        self.writer = writer_class(str(path))
        for row in rows:
            self._write(row, walls)
        self.writer.flush()  # the rows restored are on disk before the old files go
        for f in old:
            f.unlink(missing_ok=True)

    def add(self, row: dict) -> None:
        """A new row's points, on disk at once: a live TensorBoard shows them, and a killed run leaves
        no row of its log unwritten (those after its last checkpoint go when it resumes)."""
        if self.writer is not None:
            self._write(row, {})
            self.writer.flush()

    def _write(self, row: dict, walls: dict) -> None:
        step = row["step"]
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, step, walltime=walls.get((tag, step)), new_style=True)
        if isinstance(row.get("example"), str):
            tag = f"{row['phase']}/example"
            self.writer.add_text(tag, row["example"], step, walltime=walls.get((f"{tag}/text_summary", step)))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
