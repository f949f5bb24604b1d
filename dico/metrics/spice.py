"""SPICE 1.0 (pycocoevalcap's spice-1.0.jar) on Java 8 to 25: its class path, Java flags, run and output.

pycocoevalcap's `Spice` runs `java -jar -Xmx8G spice-1.0.jar ...`, which fails on today's Java twice:
- Java 16 and later: SPICE's LMDB parse cache (`-cache`) serialises with FST 2.47, which reflects into
  java.base. Without `--add-opens` for each package it touches: InaccessibleObjectException
  (java.lang.String.value first). OPENS are the packages found by running SPICE's own LmdbTupleDB on
  Java 17 until it stored and read back a parse (tests/test_spice.py runs that check).
- Java 15 and later: SpiceScorer writes `-out` through the JavaScript engine (Nashorn), which Java 15
  removed, so it dies after scoring. There the same scorer runs through SpiceRun.java, which writes
  the same per-image JSON without it (Java's source-file mode: needs a JDK, as the eval env's openjdk).
pycocoevalcap also downloads CoreNLP from a Stanford URL when its lib/ lacks the jars and writes its
temporary files into site-packages. Here the CoreNLP jars join the class path from
evaluate.spice_jar_dir (nothing is written into pycocoevalcap), the input and output files live in a
temporary folder, and the cache is evaluate.spice_cache. The scores are pycocoevalcap's: the mean of
the per-image "All" F-scores, NaN where SPICE gives none.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path

SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
OPENS = ("java.lang", "java.math", "java.util", "java.util.concurrent", "java.net", "java.text")
HEAP = "-Xmx8G"  # SPICE's README and pycocoevalcap: the CoreNLP parser needs it on COCO
RUNNER = Path(__file__).with_name("SpiceRun.java")
FETCH_HINT = "`snakemake download_spice --cores 1 --configfile config/paper.yaml` fetches them into resources/spice"


def spice_home() -> Path:
    """pycocoevalcap's spice/ folder: spice-1.0.jar and, in lib/, the jars it links against."""
    import pycocoevalcap.spice as spice

    return Path(spice.__path__[0])


def java_major(java: str = "java") -> int:
    """The feature release of `java` (8 for "1.8.0_312", 17 for "17.0.15")."""
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        raise RuntimeError(f"cannot read the Java version from `{java} -version`: {(out.stderr or out.stdout)[:200]!r}")
    major, minor = int(m.group(1)), int(m.group(2) or 0)
    return minor if major == 1 else major


def java_flags(major: int) -> list[str]:
    """The heap SPICE needs, and on Java 9+ the packages FST must reach (Java 8 refuses --add-opens)."""
    opens = [f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in OPENS] if major >= 9 else []
    return [HEAP, *opens]


def classpath(jar_dir: str | os.PathLike) -> str:
    """spice-1.0.jar, the libraries pycocoevalcap ships with it, and the two CoreNLP jars of `jar_dir`."""
    home = spice_home()
    return os.pathsep.join([str(home / "spice-1.0.jar"), str(home / "lib" / "*"),
                            *(str(Path(jar_dir).resolve() / j) for j in SPICE_JARS)])


def command(inp: Path, out: Path, jar_dir, cache: str | None, major: int) -> list[str]:
    """The java command scoring `inp` into `out` (pycocoevalcap's options: -subset -silent)."""
    options = [str(inp), *(["-cache", str(Path(cache).resolve())] if cache else []), "-subset", "-silent"]
    head = ["java", *java_flags(major), "-cp", classpath(jar_dir)]
    if major >= 15:  # no JavaScript engine: SpiceRun.java writes the output (module docstring)
        return [*head, str(RUNNER), str(out), *options]
    return [*head, "edu.anu.spice.SpiceScorer", *options, "-out", str(out)]


def _explain(stderr: str, jar_dir) -> str:
    """What a failed SPICE run says, with the fix where it is known."""
    lines = [s.strip() for s in stderr.strip().splitlines() if s.strip() and not s.strip().startswith(("at ", "..."))]
    tail = " | ".join(([s for s in lines if "Exception" in s or "Error" in s] or lines)[-3:])
    if "edu/stanford/nlp" in stderr or "edu.stanford.nlp" in stderr:
        return (f"the jars in {jar_dir} are not Stanford CoreNLP 3.6.0 (its classes are missing): delete them "
                f"and their .sha256 records; {FETCH_HINT}. Java said: {tail}")
    if "SpiceRun.java" in stderr and ("ClassNotFoundException" in stderr or "jdk.compiler" in stderr):
        return (f"SPICE on Java 15+ runs through {RUNNER.name} in Java's source-file mode, which needs a JDK "
                f"(javac), not a JRE: install openjdk (the eval env has it), or use Java 8-14. Java said: {tail}")
    return f"Java said: {tail}"


def run_spice(gts: dict, res: dict, jar_dir, cache: str | None = None) -> tuple[float, list[float]]:
    """gts {id: [tokenised refs]}, res {id: [tokenised candidate]} (ids sortable) -> (SPICE, per image
    in sorted-id order), as pycocoevalcap's Spice.compute_score. Raises RuntimeError with the reason."""
    ids = sorted(gts)
    if ids != sorted(res):
        raise ValueError("SPICE: references and candidates must have the same ids")
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
    major = java_major()
    with tempfile.TemporaryDirectory(prefix="spice-") as tmp:
        inp, out = Path(tmp) / "input.json", Path(tmp) / "output.json"
        inp.write_text(json.dumps([{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in ids]))
        proc = subprocess.run(command(inp, out, jar_dir, cache, major), cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file() or not out.stat().st_size:
            raise RuntimeError(f"SPICE (Java {major}) exited with {proc.returncode}: {_explain(proc.stderr, jar_dir)}")
        by_id = {item["image_id"]: item["scores"]["All"]["f"] for item in json.loads(out.read_text())}
    per = [math.nan if by_id[i] is None else float(by_id[i]) for i in ids]
    return (sum(per) / len(per) if per else math.nan), per
