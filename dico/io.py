"""Atomic file writes, JSON helpers, file hashing, provenance, and the error type of bad user input.

Every file the pipeline writes goes to a temporary name in the same directory and is renamed into
place (an atomic operation on POSIX), so a killed job never leaves a half-written file that a later
step would trust (docs/architecture.md, "Contracts").
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator


class InputError(ValueError):
    """Bad input from the user (a file, a flag, a config value): the message names the file or flag,
    the entry and the fix."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The temporary is named `.<name>.<host>.<pid>.<random>.tmp`: a `kill -9` can leave one behind
    (nothing trusts it: readers only open final names), and the next write of the same file removes
    the leftovers of dead processes of this host (`remove_stale_temporaries`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file the user asked for, not the temporary beside it
        raise type(e)(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs should read like any file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", platform.node() or "host")


def check_output(path: str | os.PathLike, flag: str = "--out", folder: bool = False) -> Path:
    """Make sure a command can write `path` (a file, or with `folder` a folder to write into) before it
    does any work: the folder exists (or is created) and takes a file; a file's path is not a folder.
    Raises InputError naming `flag`, the path and why."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise InputError(f"{flag} {path}: is a folder; give the path of a file to write")
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=f".{path.name}.check.", dir=where):
            pass
    except OSError as e:
        why = "a part of it is a file, not a folder" if isinstance(e, (NotADirectoryError, FileExistsError)) \
            else e.strerror or type(e).__name__
        raise InputError(f"{flag} {path}: cannot write there ({why}); choose a folder you can write to") from None
    return path


class Outputs:
    """Several files written all or none: each goes to a temporary beside it (`atomic_path`), and they
    are renamed into place together when the block ends without an error; on an error every temporary
    is removed and no final file is touched.

        with Outputs() as out:
            out.write_json(a, ...)
            out.write_text(b, ...)
    """

    def __init__(self):
        self._open: list[tuple[contextlib.AbstractContextManager, Path]] = []

    def path(self, path: str | os.PathLike) -> Path:
        """A temporary to write `path`'s content to; it becomes `path` when the block succeeds."""
        ctx = atomic_path(path)
        tmp = ctx.__enter__()
        self._open.append((ctx, tmp))
        return tmp

    def write_text(self, path, text: str) -> None:
        self.path(path).write_text(text)

    def write_json(self, path, obj: Any) -> None:
        self.write_text(path, _json_text(obj))

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, error, trace) -> None:
        pending, self._open, failure = self._open, [], None
        for ctx, _ in pending:  # each renames its temporary onto its path, or (after an error) removes it
            try:
                if error is None and failure is None:
                    ctx.__exit__(None, None, None)
                else:
                    ctx.__exit__(type(error or failure), error or failure, trace)
            except BaseException as e:  # a rename failed: the rest are removed, the error goes up
                failure = failure or e
        if failure is not None and error is None:
            raise failure


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete temporaries that `atomic_path` left in `folder` (for the file `name`, or all) when its
    process was killed: those written on this host by a process that no longer runs. Temporaries of
    live processes and of other hosts (a shared file system) are left alone. Returns what was removed."""
    removed = []
    pattern = f".{glob.escape(name)}.*.tmp" if name else ".*.tmp"
    for tmp in Path(folder).glob(pattern):
        parts = tmp.name[:-len(".tmp")].rsplit(".", 3)  # [".<name>", host, pid, random]
        if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, _json_text(obj))


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def read_json(path: str | os.PathLike, unique_keys: bool = False) -> Any:
    """The JSON file at `path` (UTF-8, a byte-order mark allowed). Errors name the file: not found, a
    folder, not UTF-8 text, not valid JSON, and with `unique_keys` an object with a key twice (JSON
    allows it, and the last one would silently win)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
        return json.loads(text, object_pairs_hook=_unique if unique_keys else None)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a JSON file; give the file inside it") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a UTF-8 text file (byte {e.start} is {e.object[e.start:e.start + 1]!r}): "
                         "is it the right file? Give a JSON file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except _DuplicateKey as e:
        raise InputError(f"{path}: key {e.args[0]!r} appears twice in one object; keep one (JSON readers keep "
                         "the last silently)") from None


class _DuplicateKey(Exception):
    pass


def _unique(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def file_digests(path: str | os.PathLike, *algorithms: str) -> dict[str, str]:
    """{algorithm: hex digest} of a file (hashlib names: "sha256", "sha1"), all in one read, 1 MiB blocks."""
    hashes = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for h in hashes.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashes.items()}


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    return file_digests(path, "sha256")["sha256"]


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# -- provenance --------------------------------------------------------------------------------
def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit of the checkout the code runs from (with '-dirty' if it has local changes)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "open_clip_torch", "numpy", "pycocoevalcap", "snakemake"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_description(device: str | None = None) -> str:
    import torch

    if device and str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(config: Any, seed: int | None, device: str | None, wall_time_s: float,
               **extra: Any) -> dict:
    """The provenance block every metrics JSON and table carries (docs/architecture.md, "Contracts")."""
    import torch

    return {
        "git_commit": git_commit(),
        "config": config,
        "seed": seed,
        "determinism": {
            "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        },
        "versions": library_versions(),
        "device": device_description(device),
        "host": platform.node(),
        "wall_time_s": round(float(wall_time_s), 3),
        **extra,
    }
