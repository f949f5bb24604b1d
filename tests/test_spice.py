"""SPICE in the table: rule download_spice fetches the Stanford CoreNLP 3.6.0 jars from a loopback server
(stand-in jars with Maven Central's published .sha1 beside them), verifies and places them; a wrong
checksum is refused; and SPICE 1.0's own Java code runs with our flags as far as this machine allows.

The real CoreNLP jars (~370 MB) cannot be had here, so SPICE itself cannot score: the last test checks
that its scorer is entered and stops exactly at the missing CoreNLP classes, with the reason said."""
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import paper_fixtures as F
from dico.metrics import coco, spice
from worlds import copy_workflow

ROOT = Path(__file__).resolve().parents[1]
JARS = spice.SPICE_JARS
needs_jdk = pytest.mark.skipif(shutil.which("javac") is None,
                               reason="no JDK here: SPICE's Java code runs in Java's source-file mode")


def _jar(path: Path, text: str) -> Path:
    """A real (if useless) jar: a zip with a manifest."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
        zf.writestr("README", text)
    return path


def _sha1_file(path: Path, digest: str) -> Path:
    out = path.with_name(path.name + ".sha1")
    out.write_text(digest + "\n")  # Maven Central's layout: the bare hex digest
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("maven")
    with F.LoopbackServer() as srv:
        jars = {}
        for jar in JARS:
            path = _jar(root / jar, f"stand-in for {jar}")
            url = srv.add(f"/maven2/edu/stanford/nlp/stanford-corenlp/3.6.0/{jar}", path)
            sha1 = srv.add(f"/maven2/edu/stanford/nlp/stanford-corenlp/3.6.0/{jar}.sha1",
                           _sha1_file(path, hashlib.sha1(path.read_bytes()).hexdigest()))
            jars[jar] = {"url": url, "sha1_url": sha1, "sha256": None, "path": path}
        yield srv, jars, root


def _workflow(tmp_path: Path, spice_jars: dict) -> Path:
    wf = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.setdefault("evaluate", {}).update(spice_jar_dir="resources/spice", spice_jars=spice_jars)
    (wf / "test.yaml").write_text(yaml.safe_dump(config))
    return wf


def _snakemake(wf: Path, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["snakemake", "--configfile", "test.yaml", "--cores", "1", *args], cwd=wf, env=env,
                          capture_output=True, text=True, timeout=300)


def test_download_spice_fetches_verifies_and_places_the_jars(served, tmp_path):
    srv, jars, _ = served
    wf = _workflow(tmp_path, {j: {k: v for k, v in e.items() if k != "path"} for j, e in jars.items()})
    first = len(srv.requests)
    out = _snakemake(wf, "download_spice")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lib = wf / "resources" / "spice"
    for jar, e in jars.items():
        assert (lib / jar).read_bytes() == e["path"].read_bytes()
        sha = hashlib.sha256(e["path"].read_bytes()).hexdigest()
        assert (lib / f"{jar}.sha256").read_text().split()[0] == sha  # recorded for later downloads
        assert not (lib / f"{jar}.part").exists()
    assert sorted(srv.requests[first:]) == sorted(f"/maven2/edu/stanford/nlp/stanford-corenlp/3.6.0/{j}{x}"
                                          for j in JARS for x in ("", ".sha1"))
    assert coco.find_spice_jars(lib) == lib  # where SPICE looks: evaluate.spice_jar_dir
    assert "Nothing to be done" in _snakemake(wf, "-n", "download_spice").stdout


def test_a_jar_that_does_not_match_its_published_sha1_is_refused(served, tmp_path):
    """The rule's command (`dico download file ... --sha1-url`) against a .sha1 that names other bytes."""
    from dico.cli import main

    srv, jars, root = served
    wrong = srv.add("/maven2/wrong.jar.sha1", _sha1_file(root / "wrong.jar", "0" * 40))
    e, out = jars[JARS[0]], tmp_path / "spice" / JARS[0]
    assert main(["download", "file", "--url", e["url"], "--sha1-url", wrong, "--out", str(out), "--retries", "1",
                 "--timeout", "5", "--no-progress"]) == 1
    assert not out.exists() and not out.with_name(out.name + ".part").exists()
    assert not out.with_name(out.name + ".sha256").exists()  # nothing recorded for a file refused
    (root / "garbled.sha1").write_text("<html>not a checksum</html>")
    garbled = srv.add("/maven2/garbled.sha1", root / "garbled.sha1")
    assert main(["download", "file", "--url", e["url"], "--sha1-url", garbled, "--out", str(out), "--retries", "0",
                 "--no-progress"]) == 1 and not out.exists()
    assert main(["download", "file", "--url", e["url"], "--sha1-url", e["sha1_url"], "--out", str(out),
                 "--no-progress"]) == 0 and out.read_bytes() == e["path"].read_bytes()


def test_published_sha1_reads_maven_layouts_and_names_a_bad_one(served):
    from dico.download import DownloadError, published_sha1

    srv, _, root = served
    digest = "a" * 40
    (root / "named.sha1").write_text(f"{digest.upper()}  stanford-corenlp-3.6.0.jar\n")  # the older layout
    assert published_sha1(srv.add("/named.sha1", root / "named.sha1"), retries=0) == digest
    with pytest.raises(DownloadError, match="HTTP 404.*pin the file's sha256"):
        published_sha1(srv.base + "/missing.sha1", retries=0)


def test_java_flags_and_command_follow_the_java_version():
    """The rules written down (dico.metrics.spice docstring): Java 8 takes no --add-opens and has
    Nashorn; 9-14 need the opens and keep Nashorn; 15+ need both the opens and SpiceRun.java."""
    opens = [f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in
             ("java.lang", "java.math", "java.util", "java.util.concurrent", "java.net", "java.text")]
    assert spice.java_flags(8) == ["-Xmx8G"]
    assert spice.java_flags(11) == spice.java_flags(21) == ["-Xmx8G", *opens]
    inp, out = Path("in.json"), Path("out.json")
    for major, main_class in ((8, "edu.anu.spice.SpiceScorer"), (14, "edu.anu.spice.SpiceScorer"),
                              (15, str(spice.RUNNER)), (17, str(spice.RUNNER))):
        cmd = spice.command(inp, out, "jars", "cache", major)
        assert cmd[cmd.index("-cp") + 2] == main_class, (major, cmd)
        assert ("-out" in cmd) == (major < 15) and cmd[-2:] == (["-subset", "-silent"] if major >= 15 else ["-out", "out.json"])
    cmd = spice.command(inp, out, "jars", None, 17)
    cp = cmd[cmd.index("-cp") + 1].split(os.pathsep)
    assert cp[0].endswith("spice-1.0.jar") and cp[-2:] == [str(Path("jars").resolve() / j) for j in JARS]
    assert "-cache" not in spice.command(inp, out, "jars", None, 17)


@needs_jdk
def test_the_flags_open_what_spices_lmdb_cache_needs_on_this_java(tmp_path):
    """SPICE's own cache class (edu.anu.spice.LmdbTupleDB: FST serialisation into LMDB) stores and reads
    back a parse with our flags; without them this Java refuses (InaccessibleObjectException), the error
    users of pycocoevalcap report on Java 16+."""
    probe = tmp_path / "Probe.java"
    probe.write_text("""import java.util.*;
public class Probe { public static void main(String[] a) {
  edu.anu.spice.LmdbTupleDB db = new edu.anu.spice.LmdbTupleDB(a[0]);
  ArrayList<ArrayList<String>> t = new ArrayList<>(); t.add(new ArrayList<>(List.of("dog", "run")));
  db.putTransaction(new HashMap<>(Map.of("a dog runs", t)));
  System.out.println(db.getTransaction(List.of("a dog runs", "unseen"))); } }""")
    major = spice.java_major()
    cp = os.pathsep.join([str(spice.spice_home() / "spice-1.0.jar"), str(spice.spice_home() / "lib" / "*")])
    runs = {}
    for name, flags in (("ours", spice.java_flags(major)[1:]), ("none", [])):
        (tmp_path / name).mkdir()
        runs[name] = subprocess.run(["java", *flags, "-cp", cp, str(probe), str(tmp_path / name)],
                                    capture_output=True, text=True, timeout=120)
    assert runs["ours"].returncode == 0 and runs["ours"].stdout.strip() == "{a dog runs=[[dog, run]]}", runs["ours"].stderr
    if major >= 16:  # strong encapsulation: the flags are what makes it work
        assert runs["none"].returncode != 0 and "InaccessibleObjectException" in runs["none"].stderr


@needs_jdk
def test_spice_runs_its_scorer_until_the_stand_in_jars_lack_corenlp(served, tmp_path):
    """coco_scores with SPICE: the real spice-1.0.jar starts (through SpiceRun.java on Java 15+),
    enters SpiceScorer.scoreBatch and stops at the first CoreNLP class it needs; the reason names the
    jars and the command that fetches the real ones. Nothing is written into pycocoevalcap's folder."""
    _, jars, _ = served
    lib = tmp_path / "spice"
    lib.mkdir()
    for jar, e in jars.items():
        shutil.copy(e["path"], lib / jar)
    before = sorted(p.name for p in spice.spice_home().rglob("*"))
    refs, cands = {0: ["a dog runs on the grass"], 1: ["two cats sleep"]}, {0: "a dog runs", 1: "a cat sleeps"}
    corpus, per, notes = coco.coco_scores(refs, cands, scorers=("spice",), spice_jar_dir=str(lib),
                                          spice_cache=str(tmp_path / "cache"))
    assert "SPICE" not in corpus and "SPICE" not in per
    why = notes["SPICE"]
    assert why.startswith(f"failed: RuntimeError: SPICE (Java {spice.java_major()}) exited with 1: "
                          f"the jars in {lib} are not Stanford CoreNLP 3.6.0"), why
    assert "edu/stanford/nlp/semgraph/semgrex/SemgrexPattern" in why  # SpiceParser's first CoreNLP class
    assert "snakemake download_spice --cores 1" in why
    assert sorted(p.name for p in spice.spice_home().rglob("*")) == before
