"""`dico doctor`: what a configured run needs of this machine, and whether the machine has it.

Run it before anything expensive starts (on a GPU node for the paper): it loads the config as
Snakemake does (the files of --configfile merged in order, else the profile's `configfile`, else
config/config.yaml; the schema fills the rest) and checks, one row each:

- torch's CUDA build against the NVIDIA driver (`nvidia-smi`), with the pip command of a build the
  driver can run; the GPUs torch sees and their memory; a one-process torch.distributed group (NCCL on
  a GPU, gloo where there is none); an fp16 matmul on the GPU;
- Java (the PTB tokenizer, METEOR and SPICE run in a JVM) and the SPICE jars;
- free disk under results/ and resources/ against what the run writes;
- every download of the config (`dico.config.downloads`): present, and its sha256 against the pin or
  the value recorded at download (`dico.download`). Weights are hashed again (≈ 1.6 GB for the paper,
  seconds on a local disk); `quick` checks presence and size only. Unpacked zips (COCO's images) are
  not re-read: their archive was checked when it was downloaded and is gone;
- with a SLURM profile: `sinfo` answers, and the profile names an account and each GPU rule's partition.

A row is (name, needed, found, status, fix). Status: ok; FAIL (the run would fail, or would silently
run somewhere it should not: `dico doctor` exits 1); warn (works, with the caveat in `found`); skip (not
needed by this config, or not checkable on this machine: the reason is in `found`).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import config as C
from .download import recorded_sha256, sidecar
from .io import InputError, sha256_file

log = logging.getLogger("dico")

# CUDA minor version compatibility: a program built with CUDA X.y runs on any driver at or above its
# major family's floor (NVIDIA's CUDA Compatibility guide, table "Minimum Required Driver Version":
# CUDA 13.x >= 580, 12.x >= 525, 11.x >= 450). PyTorch wheels bring their own CUDA runtime, so this
# floor is all they ask of the installed driver.
DRIVER_FLOOR = {13: 580, 12: 525, 11: 450}
# The CUDA builds PyTorch publishes for the torch this project pins (torch 2.14: CUDA 12.6, 13.0 and
# 13.2, pytorch/pytorch RELEASE.md, release compatibility matrix), the one to suggest first; 13.2
# asks the same driver as 13.0.
TORCH_CUDA_BUILDS = ("13.0", "12.6")
TORCH_INDEX = "https://download.pytorch.org/whl/cu{tag}"

# What a run writes, in GB, per data.source. The paper: docs/cluster.md's cost table (≈ 110 GB when
# done, ≈ 130 GB at the peak): under resources/ 19 GB of COCO images + 19 GB of their zips while they
# unpack + 1.6 GB of weights; under results/ 65 GB of ViT-L/14 features + ≈ 1 GB per fine-tuned run.
# The demo: a whole demo run (`snakemake --cores all`) leaves ≈ 0.1 GB under results/, measured, and
# nothing under resources/; 1 GB leaves room for its logs and Snakemake's metadata.
DISK_GB = {"karpathy": {"results": 90, "resources": 40}, "demo": {"results": 1, "resources": 0}}
JAVA_MIN = 8  # CoreNLP 3.6.0 (SPICE, the PTB tokenizer) needs Java 8; the README's Java 17 works
STATUSES = ("ok", "FAIL", "warn", "skip")


@dataclass
class Row:
    name: str
    needed: str
    found: str
    status: str  # one of STATUSES
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"


# -- the config and the profile, as Snakemake reads them ---------------------------------------------
def read_profile(name: str | os.PathLike) -> tuple[Path, dict]:
    """The profile folder `name` (e.g. slurm, workstation): its profile.yaml (or config.yaml, which
    Snakemake 9 also reads), YTE templates evaluated like Snakemake does."""
    for file in ("profile.yaml", "config.yaml"):
        path = Path(name) / file
        if path.is_file():
            text = path.read_text()
            data = yaml.safe_load(text) or {}
            if data.get("__use_yte__"):
                import yte

                data = yte.process_yaml(text) or {}
            return path, data
    raise InputError(f"--profile {name}: no {Path(name) / 'profile.yaml'}; a profile is a folder holding "
                     f"profile.yaml (run from the repository root, e.g. --profile slurm)")


def load_config(configfiles: list[str] | None, profile: dict | None) -> tuple[dict, list[str]]:
    """The validated config and the files it came from (paths relative to the repository root, where
    snakemake runs): --configfile files merged in order (they replace the profile's `configfile`, as
    on Snakemake's command line), else the profile's, else the demo. Like the Snakefile, config/config.yaml
    is not merged under a given file: the schema fills the keys a file leaves out."""
    files = list(configfiles or [])
    if not files and profile and profile.get("configfile"):
        given = profile["configfile"]
        files = [given] if isinstance(given, str) else list(given)
    files = files or ["config/config.yaml"]
    merged: dict = {}
    for f in files:
        try:
            merged = C.deep_merge(merged, yaml.safe_load(Path(f).read_text()) or {})
        except FileNotFoundError:
            raise C.ConfigError(f"{f}: config file not found") from None
        except yaml.YAMLError as e:
            raise C.ConfigError(f"{f}: not valid YAML: {e}") from None
    return C.validate(merged, " + ".join(files)), files


def _resources(value) -> dict:
    """A profile's resources block: a mapping, or Snakemake's list of `key=value` strings."""
    if isinstance(value, dict):
        return value
    return dict(str(v).split("=", 1) for v in value or [] if "=" in str(v))


def job_gpus(config: dict, profile: dict | None) -> dict[str, int]:
    """GPUs of one job of each GPU rule: the config's `gpus` (which the rules declare as resource `gpu`),
    where a profile's set-resources `gpu` overrides it."""
    counts = {rule: int(n) for rule, n in (config.get("gpus") or {}).items()}
    for rule, res in ((profile or {}).get("set-resources") or {}).items():
        if "gpu" in _resources(res):
            counts[rule] = int(_resources(res)["gpu"] or 0)
    if not any(m["source"] == "demo" for m in config["clip_models"].values()):
        counts.pop("train_clip", None)  # only the demo's CLIP stand-ins are trained
    return {rule: n for rule, n in counts.items() if n > 0}


def gpu_wanted(config: dict, profile: dict | None) -> str:
    """required (device cuda, or a profile's set-resources gives jobs GPUs), optional (device auto: a
    GPU when there is one) or no (device cpu)."""
    overrides = [_resources(r).get("gpu") for r in ((profile or {}).get("set-resources") or {}).values()]
    if config["device"] == "cuda" or any(int(n or 0) > 0 for n in overrides):
        return "required"
    return "optional" if config["device"] == "auto" else "no"


# -- the NVIDIA driver, torch's CUDA build, the GPUs ---------------------------------------------------
def nvidia_smi() -> dict | None:
    """{"driver", "gpus": [(name, GiB)]} from `nvidia-smi` on PATH, {"error"} when it fails, None when absent."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{exe}: {e}"}
    text = (out.stdout + out.stderr).strip()
    if out.returncode != 0:
        return {"error": f"{exe} exited {out.returncode}: {text.splitlines()[0] if text else 'no output'}"}
    gpus, driver = [], None
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and re.match(r"\d+(\.\d+)*$", parts[0]):
            driver = parts[0]
            mib = re.match(r"[\d.]+", parts[2])
            gpus.append((parts[1], float(mib.group()) / 1024 if mib else 0.0))
    if driver is None:
        return {"error": f"{exe}: no driver version in its output: {text[:200]!r}"}
    return {"driver": driver, "gpus": gpus}


def install_command(cuda: str, torch_version: str, torchvision_version: str | None) -> str:
    """pip's command for torch (and torchvision) built for CUDA `cuda`. The local version (+cu126) is
    spelled out: `torch==2.14.1` alone counts as satisfied by the installed 2.14.1+cu130 and installs nothing."""
    tag = cuda.replace(".", "")
    pkgs = [f"torch=={torch_version}+cu{tag}"] + ([f"torchvision=={torchvision_version}+cu{tag}"]
                                                   if torchvision_version else [])
    return f"pip install {' '.join(pkgs)} --index-url {TORCH_INDEX.format(tag=tag)}"


def _build_for(driver_major: int, versions: tuple[str, str | None]) -> str:
    """The fix for a driver: torch's newest CUDA build it can run, else a driver upgrade."""
    for cuda in TORCH_CUDA_BUILDS:
        if driver_major >= DRIVER_FLOOR[int(cuda.split(".")[0])]:
            return install_command(cuda, *versions)
    lowest = min(DRIVER_FLOOR[int(c.split(".")[0])] for c in TORCH_CUDA_BUILDS)
    return (f"upgrade the NVIDIA driver to >= {lowest} (torch {versions[0]} has CUDA builds "
            f"{', '.join(TORCH_CUDA_BUILDS)} only), or set device: cpu")


def cuda_build_row(torch_cuda: str | None, smi: dict | None, wanted: str, versions: tuple[str, str | None]) -> Row:
    """torch's CUDA build (torch.version.cuda; None = a CPU build) against the driver nvidia-smi reports.
    `versions`: the installed torch and torchvision versions without their +local part, for the fix."""
    name = "torch CUDA build"
    build = f"torch {versions[0]}, " + (f"CUDA {torch_cuda}" if torch_cuda else "a CPU build")
    if wanted == "no":
        return Row(name, "none (device: cpu)", build, "skip")
    if smi is None or "error" in smi:
        found = f"{build}; " + ("no NVIDIA driver (nvidia-smi not on PATH)" if smi is None else smi["error"])
        if wanted == "optional":
            return Row(name, "a driver that runs it (device: auto)", f"{found}: runs on the CPU", "skip")
        return Row(name, "an NVIDIA driver that runs torch's CUDA build", found, "FAIL",
                   "run this on a GPU node (e.g. inside `srun --gpus=1 --pty bash`), or set device: cpu")
    driver = smi["driver"]
    major = int(driver.split(".")[0])
    if torch_cuda is None:
        return Row(name, "torch built for CUDA", f"{build}; driver {driver}", "FAIL", _build_for(major, versions))
    family = int(torch_cuda.split(".")[0])
    floor = DRIVER_FLOOR.get(family)
    needed = f"driver >= {floor} for CUDA {family}.x" if floor else f"a driver for CUDA {torch_cuda}"
    if floor is not None and major >= floor:
        return Row(name, needed, f"{build}; driver {driver}", "ok")
    return Row(name, needed, f"{build}; driver {driver} is too old: torch cannot use the GPU and a run "
               f"{'falls back to the CPU' if wanted == 'optional' else 'fails'}", "FAIL", _build_for(major, versions))


def torch_facts() -> dict:
    """What this torch is and sees: version, CUDA build, GPUs [(name, GiB)], torchvision's version."""
    import torch

    try:
        from importlib.metadata import version

        tv = version("torchvision").split("+")[0]
    except Exception:  # noqa: BLE001  (not installed: the fix names torch alone)
        tv = None
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append((p.name, p.total_memory / 2**30))
    return {"version": torch.__version__.split("+")[0], "cuda": torch.version.cuda, "gpus": gpus,
            "torchvision": tv}


def _gpu_list(gpus: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} ({gib:.1f} GiB)" for name, gib in gpus)


def gpu_row(wanted: str, per_job: int, profile: dict | None, smi: dict | None, gpus: list[tuple[str, float]]) -> Row:
    """The GPUs torch sees, against what the config asks for (`per_job`: the most GPUs one job of the
    profile asks for, 0 without a profile)."""
    needed = "none (device: cpu)" if wanted == "no" else (
        f">= 1 GPU{'; jobs of the profile ask up to ' + str(per_job) if per_job else ''}" if wanted == "required"
        else "used when present (device: auto)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    note = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    if wanted == "no":
        return Row("GPUs", needed, f"{len(gpus)} visible to torch", "skip")
    if gpus:
        found = f"{len(gpus)}: {_gpu_list(gpus)}{note}"
        if per_job > len(gpus) and (profile or {}).get("executor") == "slurm":
            return Row("GPUs", needed, found + f"; fewer than the {per_job} a job asks for: fine if SLURM gives "
                       "the jobs other nodes", "warn")
        return Row("GPUs", needed, found, "ok")
    listed = (smi or {}).get("gpus") or []
    if listed:
        return Row("GPUs", needed, f"nvidia-smi lists {len(listed)} ({_gpu_list(listed)}), torch sees none{note}",
                   "FAIL", "see the torch CUDA build row")
    if wanted == "optional":
        return Row("GPUs", needed, f"none{note}: runs on the CPU", "skip")
    return Row("GPUs", needed, f"none{note}", "FAIL",
               "run this on a GPU node, check CUDA_VISIBLE_DEVICES, or set device: cpu")


def process_group_row(gpus: list, wanted: str) -> Row:
    """A one-process torch.distributed group (file:// rendezvous) and an all_reduce: NCCL on GPU 0, the
    backend multi-GPU training uses; gloo on the CPU, where NCCL cannot run."""
    import datetime

    import torch
    import torch.distributed as dist

    name, needed = "process group", "torch.distributed: NCCL on a GPU (torchrun jobs), gloo on the CPU"
    if dist.is_initialized():
        return Row(name, needed, "a process group is already running in this process", "skip")
    backend = "nccl" if gpus else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        return Row(name, needed, "this torch has no NCCL", "FAIL", "install a Linux CUDA build of torch (see above)")
    device = "cuda:0" if gpus else "cpu"
    with tempfile.TemporaryDirectory(prefix="dico-doctor-") as tmp:
        try:
            if gpus:
                torch.cuda.set_device(0)
            dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", world_size=1, rank=0,
                                    timeout=datetime.timedelta(seconds=120))
            try:
                t = torch.arange(4.0, device=device)
                dist.all_reduce(t)
                right = torch.equal(t.cpu(), torch.arange(4.0))
            finally:
                dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001  (any failure is the finding)
            return Row(name, needed, f"{backend}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", "FAIL",
                       "check the NCCL / driver install (NCCL_DEBUG=INFO shows why)")
    found = f"{backend}: 1-process all_reduce {'ok' if right else 'WRONG'}"
    if not gpus:
        found += "; NCCL not tried: torch sees no GPU" + (" (device: cpu)" if wanted == "no" else "")
    return Row(name, needed, found, "ok" if right else "FAIL", "" if right else "the all_reduce of a 1-process "
               "group changed the tensor: report it with `python -m torch.utils.collect_env`")


def fp16_row(gpus: list) -> Row:
    """An fp16 matmul on GPU 0 against the fp32 product: catches a torch without kernels for this GPU."""
    import torch

    name, needed = "fp16 matmul", "fp16 kernels for this GPU (mixed-precision training)"
    if not gpus:
        return Row(name, needed, "not tried: torch sees no GPU", "skip")
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        a, b = (torch.randn(512, 512, device="cuda", generator=g) for _ in range(2))
        half = (a.half() @ b.half()).float()
        ref = a.half().float() @ b.half().float()
        err = ((half - ref).abs().max() / ref.abs().max()).item()
    except RuntimeError as e:
        cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
        return Row(name, needed, f"{str(e).splitlines()[0][:160]} (GPU sm {cap}; torch has {torch.cuda.get_arch_list()})",
                   "FAIL", "install a torch CUDA build with kernels for this GPU (cu126 covers older ones)")
    ok = err < 1e-2
    return Row(name, needed, f"{gpus[0][0]}: max relative error {err:.1e} vs fp32", "ok" if ok else "FAIL",
               "" if ok else "fp16 results are wrong on this GPU: set train.amp: none or bf16")


# -- Java and SPICE ------------------------------------------------------------------------------------
def java_row() -> Row:
    """Java on PATH and its major version (`java -version`, which prints to stderr)."""
    from .metrics.coco import JAVA_MISSING

    needed = f"Java >= {JAVA_MIN} on PATH (PTB tokenizer, METEOR, SPICE)"
    exe = shutil.which("java")
    if exe is None:
        return Row("Java", needed, "not on PATH", "FAIL", JAVA_MISSING.split(": ", 1)[1])
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Row("Java", needed, f"{exe}: {e}", "FAIL", "reinstall Java (openjdk 17 works)")
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if out.returncode != 0 or not m:
        return Row("Java", needed, f"{exe} -version: {(out.stderr or out.stdout).strip()[:160]!r}", "FAIL",
                   "reinstall Java (openjdk 17 works)")
    major = int(m.group(2)) if m.group(1) == "1" else int(m.group(1))  # "1.8.0_392" is Java 8
    ok = major >= JAVA_MIN
    return Row("Java", needed, f"Java {major} ({exe})", "ok" if ok else "FAIL", "" if ok else "install openjdk 17")


def spice_row(config: dict, downloads: list[dict], snakemake: str = "snakemake --cores 1") -> Row:
    """The two Stanford CoreNLP 3.6.0 jars SPICE needs, where evaluate.spice_jar_dir says (or in
    pycocoevalcap's own spice/lib, which dico.metrics.coco also uses)."""
    from .metrics.coco import SPICE_JARS, find_spice_jars

    where = config["evaluate"]["spice_jar_dir"]
    needed = f"{' + '.join(SPICE_JARS)} in {where or 'pycocoevalcap spice/lib'}"
    found = find_spice_jars(where)
    if found is not None:
        return Row("SPICE jars", needed, f"both in {found}", "ok")
    if not where:
        return Row("SPICE jars", "none (evaluate.spice_jar_dir: null)", "missing: SPICE is reported as not computed",
                   "skip")
    missing = [j for j in SPICE_JARS if not (Path(where) / j).is_file()]
    # the download rules of the jars, where the config has them (dico.config.downloads)
    rules = [d["name"] for d in downloads if Path(d["out"]) in {Path(where) / j for j in missing}]
    fix = (f"{snakemake} {' '.join('download_' + r for r in rules)}" if len(rules) == len(missing) else
           f"put {' and '.join(missing)} (the Stanford CoreNLP 3.6.0 release) in {where}")
    return Row("SPICE jars", needed, f"missing in {where}: {', '.join(missing)}", "FAIL", fix)


# -- disk ----------------------------------------------------------------------------------------------
def _used_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 if absent): what a run already wrote there needs no new room."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent: where the folder's file system is measured before it exists."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def disk_rows(config: dict, root: Path = Path("."), needs: dict[str, float] | None = None) -> list[Row]:
    """Free space under results/ and resources/ against what the run still has to write there
    (DISK_GB of its data.source minus what is already there). Folders on one file system share its
    free space, so they get one row with the sum."""
    needs = needs if needs is not None else DISK_GB[config["data"]["source"]]
    groups: dict[int, list[str]] = {}
    for folder in needs:
        groups.setdefault(_existing(root / folder).stat().st_dev, []).append(folder)
    rows = []
    for folders in groups.values():
        have = {f: _used_bytes(root / f) / 1e9 for f in folders}
        need = sum(max(0.0, needs[f] - have[f]) for f in folders)
        free = shutil.disk_usage(_existing(root / folders[0])).free / 1e9
        name = "disk " + " + ".join(f"{f}/" for f in folders)
        parts = ", ".join(f"{f}/ {needs[f]:g} GB ({have[f]:.1f} there)" for f in folders)
        ok = free >= need
        rows.append(Row(name, f"{need:.1f} GB free: {parts}", f"{free:.1f} GB free", "ok" if ok else "FAIL",
                        "" if ok else f"free {need - free:.1f} GB more there, or make "
                        f"{' and '.join(f + '/' for f in folders)} links to a larger disk"))
    return rows


# -- downloads and evaluation images -------------------------------------------------------------------
def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e9:.2f} GB" if path.stat().st_size >= 1e8 else f"{path.stat().st_size:,} bytes"


def download_row(d: dict, quick: bool = False, snakemake: str = "snakemake --cores 1") -> Row:
    """One entry of dico.config.downloads: present, and its sha256 against the pin or the value recorded
    at download. A zip's unpacked output is not re-read: its archive was checked when downloaded.
    `snakemake`: the command line the fix starts with (the config's or the profile's)."""
    out, name = Path(d["out"]), f"download {d['name']}"
    fix = f"{snakemake} download_{d['name']}"
    if not (any(out.iterdir()) if d["folder"] and out.is_dir() else out.is_file() and out.stat().st_size > 0):
        return Row(name, f"{out}{'/ (unpacked)' if d['folder'] else ''}", "missing", "FAIL", fix)
    if d["kind"] == "zip":
        archive = Path(d["options"]["archive"])
        recorded, pinned = recorded_sha256(archive), (d["sha256"] or "").lower()
        if pinned and recorded and recorded != pinned:
            return Row(name, f"{out} from a zip with sha256 {pinned[:12]}…", f"unpacked from a zip whose sha256 was "
                       f"{recorded[:12]}… ({sidecar(archive)})", "FAIL", f"delete {out} and {sidecar(archive)}, then {fix}")
        return Row(name, f"{out}", f"present (unpacked; {archive.name} was checked when downloaded)", "ok")
    expected = (d["sha256"] or recorded_sha256(out) or "").lower()
    source = "pinned in the config" if d["sha256"] else f"recorded in {sidecar(out)}"
    if not expected:
        return Row(name, f"{out}", f"present, {_size(out)}; no sha256 pinned or recorded to check it against", "ok")
    if quick:
        return Row(name, f"{out}, sha256 {expected[:12]}…", f"present, {_size(out)}; sha256 not checked (--quick)", "ok")
    log.info("doctor: sha256 of %s (%s)", out, _size(out))
    digest = sha256_file(out)
    if digest != expected:
        return Row(name, f"{out}, sha256 {expected[:12]}… ({source})", f"sha256 {digest[:12]}…: a different file",
                   "FAIL", f"delete {out}, then {fix}")
    return Row(name, f"{out}, sha256 {expected[:12]}…", f"present, {_size(out)}, sha256 ok", "ok")


def download_rows(config: dict, quick: bool = False, snakemake: str = "snakemake --cores 1") -> list[Row]:
    items = C.downloads(config)
    if not items:
        return [Row("downloads", "none", f"data.source {config['data']['source']}: nothing to fetch", "skip")]
    return [download_row(d, quick, snakemake) for d in items]


def eval_image_rows(config: dict) -> list[Row]:
    """The images of extra evaluation sets that nothing downloads (fetch_images null, e.g. Flickr30k,
    whose authors give the images out on request): they must already be in image_root."""
    rows = []
    for name, d in config["evaluate"]["datasets"].items():
        if d["format"] == "demo" or d.get("fetch_images") or not d.get("image_root"):
            continue
        root = Path(d["image_root"])
        ok = root.is_dir() and any(root.iterdir())
        rows.append(Row(f"images {name}", f"{root}/ (evaluate.datasets.{name}.image_root)",
                        "present" if ok else "missing", "ok" if ok else "FAIL",
                        "" if ok else f"put your copy of the images in {root}, or point "
                        f"evaluate.datasets.{name}.image_root at it"))
    return rows


# -- SLURM ---------------------------------------------------------------------------------------------
def sinfo_partitions() -> tuple[list[str] | None, str]:
    """The partitions `sinfo` lists (None when it cannot answer) and what it said."""
    exe = shutil.which("sinfo")
    if exe is None:
        return None, "sinfo not on PATH"
    try:
        out = subprocess.run([exe, "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{exe}: {e}"
    if out.returncode != 0:
        return None, f"{exe} exited {out.returncode}: {(out.stderr or out.stdout).strip()[:200]}"
    names = [p.strip().rstrip("*") for p in out.stdout.split() if p.strip()]
    return names, f"partitions {', '.join(names) or 'none'}"


def slurm_rows(profile: dict, path: Path, gpu_rules: dict[str, int]) -> list[Row]:
    """sinfo answers, an account (or slurm-no-account) and a partition for every GPU rule (`gpu_rules`:
    rule -> GPUs per job, `job_gpus`) are set."""
    partitions, said = sinfo_partitions()
    rows = [Row("SLURM sinfo", "sinfo answers (the controller is reachable)", said, "ok" if partitions is not None
                else "FAIL", "" if partitions is not None else "run this on the cluster's login or a compute node")]
    default = _resources(profile.get("default-resources"))
    account = default.get("slurm_account")
    if profile.get("slurm-no-account"):
        rows.append(Row("SLURM account", "slurm_account or slurm-no-account", "slurm-no-account: true", "ok"))
    else:
        ok = bool(account) and account != "myaccount"  # the profile's commented placeholder
        rows.append(Row("SLURM account", f"default-resources.slurm_account in {path}", repr(account) if account
                        else "not set", "ok" if ok else "FAIL", "" if ok else f"uncomment slurm_account under "
                        f"default-resources in {path} and set your account (sacctmgr show assoc user=$USER "
                        "format=account), or set slurm-no-account: true"))
    rows.append(_partition_row(profile, path, default, partitions, gpu_rules))
    return rows


def _partition_row(profile: dict, path: Path, default: dict, partitions: list[str] | None,
                   gpu_rules: dict[str, int]) -> Row:
    entries = profile.get("set-resources") or {}
    chosen = {rule: _resources(entries.get(rule)).get("slurm_partition") or default.get("slurm_partition")
              for rule in gpu_rules}
    unset = [r for r, p in chosen.items() if not p]
    unknown = sorted({p for p in chosen.values() if p and partitions is not None and p not in partitions})
    needed = f"slurm_partition of each GPU rule in {path}"
    if unset:
        return Row("SLURM partitions", needed, f"not set for {', '.join(unset)} (they would go to the default "
                   "partition)", "FAIL", f"uncomment slurm_partition under each GPU rule's set-resources entry "
                   f"(or default-resources) in {path} and name your GPU partition")
    if unknown:
        return Row("SLURM partitions", needed, f"sinfo does not list {', '.join(unknown)}", "FAIL",
                   f"use a partition sinfo lists ({', '.join(partitions)}) in {path}")
    return Row("SLURM partitions", needed, ", ".join(sorted(set(chosen.values()))) or "no GPU rules", "ok")


# -- all of it -----------------------------------------------------------------------------------------
def snakemake_command(configfiles: list[str] | None, profile_name: str | None) -> str:
    """The `snakemake` command line of the same config, which the fixes start with."""
    if configfiles:
        return "snakemake --cores 1 --configfile " + " ".join(configfiles) + (f" --profile {profile_name}"
                                                                              if profile_name else "")
    return f"snakemake --profile {profile_name}" if profile_name else "snakemake --cores 1"


def run_checks(config: dict, profile: dict | None = None, profile_path: Path | None = None,
               quick: bool = False, snakemake: str = "snakemake --cores 1") -> list[Row]:
    """Every row for this config (and profile) on this machine; `snakemake`: see snakemake_command."""
    facts = torch_facts()
    wanted, smi = gpu_wanted(config, profile), nvidia_smi()
    rows = [cuda_build_row(facts["cuda"], smi, wanted, (facts["version"], facts["torchvision"])),
            gpu_row(wanted, max(job_gpus(config, profile).values(), default=0) if profile is not None else 0,
                    profile, smi, facts["gpus"])]
    gpus = facts["gpus"] if wanted != "no" else []
    rows += [process_group_row(gpus, wanted), fp16_row(gpus), java_row(),
             spice_row(config, C.downloads(config), snakemake)]
    rows += disk_rows(config) + download_rows(config, quick, snakemake) + eval_image_rows(config)
    if profile is not None and profile.get("executor") == "slurm":
        rows += slurm_rows(profile, profile_path, job_gpus(config, profile))
    return rows


def format_table(rows: list[Row], width: int = 50) -> str:
    """The rows as a plain-text table (long cells wrapped), then the fixes of the failed rows, numbered."""
    import textwrap

    head = ("check", "needed", "found", "status")
    cells = [[textwrap.wrap(c, width, break_on_hyphens=False) or [""] for c in (r.name, r.needed, r.found, r.status)]
             for r in rows]
    widths = [max(len(head[i]), *(len(line) for row in cells for line in row[i])) for i in range(4)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    for row in cells:
        for k in range(max(len(c) for c in row)):
            out.append("  ".join((c[k] if k < len(c) else "").ljust(w) for c, w in zip(row, widths)).rstrip())
    fixes = [r for r in rows if r.status == "FAIL"]
    if fixes:
        out += ["", "fixes:"] + [f"  {i}. {r.name}: {r.fix}" for i, r in enumerate(fixes, 1)]
    return "\n".join(out)
