"""Tables, figures, the `dico report` CLI and the report targets' dry-run DAGs."""
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dico import config as dc
from dico.report import figures, inputs, labels, tables
from dico.report import table as tabular
from worlds import copy_workflow, run_dico

REPO = Path(__file__).resolve().parents[1]
MAIN_RUNS = ["xe", "scst_cider", "scst_clip_s", "scst_pac_s", "dico"]
SPEC = {
    "report": {"reported": None, "qualitative_images": 3},
    "scst_rewards": ["cider", "clip_s", "pac_s"],
    "ablations": {"beta": {"1": "dico_beta-1", "0.05": "dico_beta-0.05", "0.2": "dico"},
                  "reward": {"pac_s": "dico", "clip_s": "dico_reward-clip_s"}},
    "dico": {"beta": 0.2, "tau": 300, "k": 5, "reward": "pac_s"},
}
# as dico.metrics writes it: what a table prints, then (after "; ") where it looked and the fix
SPICE_WHY = ("not computed (Stanford CoreNLP 3.6.0 jars missing); looked for stanford-corenlp-3.6.0.jar in "
             "/home/someone/venv/lib/python3.11/site-packages/pycocoevalcap/spice/lib; set evaluate.spice_jar_dir")
SPICE_SHOWN = "not computed (Stanford CoreNLP 3.6.0 jars missing)"
# Raw scores as pycocoevalcap returns them; the tables print x100.
BASE = {"BLEU-1": 0.70, "BLEU-4": 0.30, "METEOR": 0.25, "ROUGE-L": 0.52, "CIDEr": 1.00, "SPICE": None,
        "CLIP-S": 0.70, "RefCLIP-S": 0.75, "PAC-S": 0.80, "RefPAC-S": 0.85}


def write_metrics(root, run, split="test", seed=0, best_step=10, **scores):
    metrics = dict(BASE, **{k.replace("_", "-"): v for k, v in scores.items()})
    path = Path(root) / "metrics" / run / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "run": run, "split": split, "captions": f"results/captions/{run}/{split}.json", "n_images": 100,
        "metrics": metrics, "reasons": {"SPICE": SPICE_WHY} if metrics["SPICE"] is None else {},
        "extra": {}, "diversity": {},
        "provenance": {"git_commit": f"commit-{run}", "config": {}, "seed": None, "versions": {},
                       "device": "cpu", "wall_time_s": 1.0,
                       "run_provenance": {"checkpoint": "x", "run": run, "seed": seed, "best_step": best_step,
                                          "val": {}, "spec": {}}}}))
    return path


def main_metrics(root):
    """CIDEr rises XE -> DiCO; SCST (CIDEr) has the best CIDEr, DiCO the best PAC-S."""
    cider = {"xe": 1.000, "scst_cider": 1.234, "scst_clip_s": 0.951, "scst_pac_s": 1.102, "dico": 1.151}
    pac = {"xe": 0.801, "scst_cider": 0.812, "scst_clip_s": 0.823, "scst_pac_s": 0.835, "dico": 0.846}
    return [write_metrics(root, r, CIDEr=cider[r], PAC_S=pac[r]) for r in MAIN_RUNS]


def row_line(tex, label):
    return next(line for line in tex.splitlines() if line.startswith(label + " &"))


def cells(tex, label):
    return [c.strip() for c in row_line(tex, label).removesuffix(r"\\").split("&")][1:]


def splits_file(root, n_test=4):
    """A split file with tiny JPEGs, as dico.data.load_split reads it."""
    images = Path(root) / "images"
    images.mkdir(parents=True, exist_ok=True)
    test = []
    for i in range(n_test):
        Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(images / f"{i}.jpg")
        test.append({"image_id": i, "file": f"{i}.jpg", "captions": [f"a reference caption of image {i}"]})
    path = Path(root) / "splits.json"
    path.write_text(json.dumps({"format": "dico-splits-v1", "dataset": "demo", "image_root": str(images),
                                "splits": {"train": test, "val": test, "test": test}}))
    return path


def cli(caplog, *argv):
    """`dico ARGV` through the shared runner (its real parser and error boundary): exit 0, else the
    error it logged, raised as a ValueError."""
    code, _, text = run_dico(caplog, *argv)
    if code != 0:
        raise ValueError(text)


# -- tables --------------------------------------------------------------------------------------
def test_main_table_rows_columns_bold_scale_and_spice_note(tmp_path):
    table = tables.main_table(inputs.load_metrics(main_metrics(tmp_path)), SPEC, dataset="demo")
    tex = tabular.to_latex(table)
    assert [r.key for r in table.rows] == MAIN_RUNS
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert "Method & B-4 & M & R & C & S & CLIP-S & RefCLIP-S & PAC-S & RefPAC-S \\\\" in tex
    for label in ["XE", "SCST (CIDEr)", "SCST (CLIP-S)", "SCST (PAC-S)", "DiCO"]:
        assert len(cells(tex, label)) == 9
    # x100, one decimal; best per column in bold, the others not
    assert cells(tex, "SCST (CIDEr)")[3] == r"\textbf{123.4}"
    assert cells(tex, "DiCO")[3] == "115.1" and cells(tex, "DiCO")[7] == r"\textbf{84.6}"
    assert cells(tex, "XE")[0] == "30.0"  # all rows equal: nothing stands out, nothing bold
    # SPICE is null everywhere: a dash with a footnote giving the reason
    assert all(cells(tex, label)[4] == "--$^{a}$" for label in ["XE", "DiCO"])
    assert "$^{a}$SPICE: " + labels.latex_escape(SPICE_SHOWN) in tex
    assert "looked for" not in tex and "site-packages" not in tex  # the detail is for the log, not the paper
    assert "demo data" in table.caption and "not COCO" in table.caption


def test_a_fine_tune_that_kept_its_starting_model_is_marked(tmp_path):
    paths = main_metrics(tmp_path)
    paths[2] = write_metrics(tmp_path, "scst_clip_s", best_step=0)  # no validation improvement
    table = tables.main_table(inputs.load_metrics(paths), SPEC)
    tex = tabular.to_latex(table)
    assert row_line(tex, r"SCST (CLIP-S)$^\ddagger$")
    assert [r.label.endswith(r"$^\ddagger$") for r in table.rows] == [False, False, True, False, False]
    assert "selected checkpoint is the starting model (step 0)" in tex
    assert list(tabular.to_frame(table)["best_step"]) == ["10", "10", "0", "10", "10"]
    clean = tabular.to_latex(tables.main_table(inputs.load_metrics(main_metrics(tmp_path)), SPEC))
    assert "ddagger" not in clean


def test_main_table_fluency_column_on_demo_data_and_the_selected_steps(tmp_path):
    paths = main_metrics(tmp_path)
    fluent = {"xe": 91.0, "scst_cider": 80.0, "scst_clip_s": 42.5, "scst_pac_s": 60.0, "dico": 88.0}
    for path, run in zip(paths, MAIN_RUNS):  # as evaluate writes them on a demo set
        m = json.loads(path.read_text())
        m["diversity"]["fluent_pct"] = fluent[run]
        m["provenance"]["run_provenance"]["best_step"] = 0 if run == "scst_clip_s" else 10 * (1 + MAIN_RUNS.index(run))
        path.write_text(json.dumps(m))
    tex = tabular.to_latex(tables.main_table(inputs.load_metrics(paths), SPEC, dataset="demo"))
    assert r"& RefPAC-S & Fluent \% \\" in tex
    assert cells(tex, "XE")[-1] == r"\textbf{91.0}" and cells(tex, r"SCST (CLIP-S)$^\ddagger$")[-1] == "42.5"  # not x100
    assert ("Selected checkpoint (training step, by validation): XE 10; SCST (CIDEr) 20; SCST (CLIP-S) 0; "
            "SCST (PAC-S) 40; DiCO 50.") in tex
    # one file without the measure (a set that is not the demo's): no column rather than a wrong one
    m = json.loads(paths[0].read_text())
    m["diversity"]["fluent_pct"] = None
    paths[0].write_text(json.dumps(m))
    assert "Fluent" not in tabular.to_latex(tables.main_table(inputs.load_metrics(paths), SPEC, dataset="demo"))


def test_main_table_keeps_only_runs_with_metrics(tmp_path):
    paths = main_metrics(tmp_path)
    table = tables.main_table(inputs.load_metrics([paths[4], paths[0]]), SPEC)
    assert [r.key for r in table.rows] == ["xe", "dico"]  # paper order, whatever the input order
    with pytest.raises(ValueError, match="several splits"):
        tables.main_table(inputs.load_metrics([paths[0], write_metrics(tmp_path, "dico", split="val")]), SPEC)


def test_reported_delta_only_where_reported(tmp_path):
    reported = tmp_path / "reported.yaml"
    reported.write_text("tables:\n  main:\n    dico: {C: 113.0, PAC-S: null}\n    xe: {B-4: null}\n"
                        "  ablation_beta:\n    0.05: {C: 100.0}\n")
    numbers = inputs.load_reported(reported)
    table = tables.main_table(inputs.load_metrics(main_metrics(tmp_path)), SPEC, numbers)
    tex = tabular.to_latex(table)
    assert cells(tex, "DiCO")[3] == r"115.1 {\scriptsize(+2.1)}"
    assert cells(tex, "DiCO")[7] == r"\textbf{84.6}"  # null reported: no delta
    assert "(" not in "".join(cells(tex, "XE"))
    assert "reproduced minus the paper's reported value" in table.caption
    frame = tabular.to_frame(table).set_index("row")
    assert frame.loc["dico", "C_reported"] == 113.0
    assert frame.loc["dico", "C_delta"] == pytest.approx(115.1 - 113.0)
    assert pd.isna(frame.loc["xe", "C_delta"])
    # YAML reads 0.05 as a float: rows are keyed like the config formats values
    beta = tmp_path / "beta"
    files = [write_metrics(beta, r, CIDEr=1.02) for r in SPEC["ablations"]["beta"].values()]
    abl = tables.ablation_table("beta", inputs.load_metrics(files), SPEC, numbers)
    assert r"(+2.0)" in row_line(tabular.to_latex(abl), "0.05")


def test_reported_numbers_with_an_unknown_column_fail(tmp_path):
    reported = tmp_path / "reported.yaml"
    reported.write_text("tables:\n  main:\n    dico: {CIDEr: 113.0}\n")
    with pytest.raises(ValueError, match="unknown columns"):
        tables.main_table(inputs.load_metrics(main_metrics(tmp_path)), SPEC, inputs.load_reported(reported))


def test_shipped_paper_reported_yaml_is_all_null_and_matches_the_tables():
    numbers = inputs.load_reported(REPO / "config" / "paper_reported.yaml")
    assert set(numbers) == {"main", "ablation_beta", "ablation_tau", "ablation_k", "ablation_reward"}
    columns = {"main": {c for c, _ in tables.MAIN_COLUMNS}}
    for table, rows in numbers.items():
        for cols in rows.values():
            assert set(cols) <= columns.get(table, {c for c, _ in tables.ABLATION_COLUMNS})
            assert all(v is None for v in cols.values()), "never invent numbers: fill them from the PDF"


def test_seeds_give_mean_and_std(tmp_path):
    ciders = [1.10, 1.16, 1.22]
    paths = [write_metrics(tmp_path, f"dico_seed{s}", seed=s, CIDEr=c) for s, c in enumerate(ciders)]
    paths.append(write_metrics(tmp_path, "xe", CIDEr=1.0))
    table = tables.main_table(inputs.load_metrics(paths), SPEC)
    dico = next(r for r in table.rows if r.key == "dico")
    assert len(dico.sources) == 3
    std = statistics.stdev([100 * c for c in ciders])
    assert cells(tabular.to_latex(table), "DiCO")[3] == rf"\textbf{{116.0}}{{\scriptsize$\,\pm\,${std:.1f}}}"
    assert "Mean $\\pm$ std over 3 seeds" in table.caption
    frame = tabular.to_frame(table).set_index("row")
    assert frame.loc["dico", "seeds"] == 3 and frame.loc["dico", "C_std"] == pytest.approx(std)
    assert frame.loc["dico", "runs"] == "dico_seed0;dico_seed1;dico_seed2"


def test_ablation_table_sorted_with_default_marked(tmp_path):
    files = [write_metrics(tmp_path, r, CIDEr=c) for r, c in
             [("dico_beta-1", 1.05), ("dico", 1.15), ("dico_beta-0.05", 1.10)]]
    table = tables.ablation_table("beta", inputs.load_metrics(files), SPEC, dataset="coco")
    assert [r.key for r in table.rows] == ["0.05", "0.2", "1"]
    tex = tabular.to_latex(table)
    assert r"$\beta$ & B-4 & M & C & CLIP-S & RefCLIP-S & PAC-S & RefPAC-S \\" in tex
    assert cells(tex, r"0.2$^\dagger$")[2] == r"\textbf{115.0}"
    assert "COCO" in table.caption and r"$^\dagger$Default of DiCO (0.2)" in tex
    reward = tables.ablation_table("reward", inputs.load_metrics(
        [write_metrics(tmp_path / "r", r) for r in ["dico", "dico_reward-clip_s"]]), SPEC)
    assert [r.label for r in reward.rows] == [r"PAC-S$^\dagger$", "CLIP-S"]  # config order
    with pytest.raises(ValueError, match="not a point of ablation beta"):
        tables.ablation_table("beta", inputs.load_metrics([write_metrics(tmp_path, "scst_cider")]), SPEC)


def test_cli_tables_write_tex_csv_twin_and_provenance(tmp_path, caplog):
    paths = main_metrics(tmp_path / "results")
    splits = splits_file(tmp_path)
    out = tmp_path / "tables" / "main.tex"
    cli(caplog, "report", "table-main", "--spec-json", json.dumps(SPEC), "--metrics", *paths, "--splits", splits,
        "--out", out)
    tex, csv = out.read_text(), pd.read_csv(out.with_suffix(".csv"))
    # the CSV twin holds the printed numbers, unrounded
    assert list(csv["row"]) == MAIN_RUNS
    labels = ["XE", "SCST (CIDEr)", "SCST (CLIP-S)", "SCST (PAC-S)", "DiCO"]
    for label, (_, rec) in zip(labels, csv.iterrows()):
        for col, shown in zip([c for c, _ in tables.MAIN_COLUMNS], cells(tex, label)):
            if pd.isna(rec[col]):
                assert shown.startswith("--") and "SPICE: " + SPICE_SHOWN in rec["notes"]
            else:
                assert re.sub(r"\\textbf\{(.*)\}", r"\1", shown) == f"{rec[col]:.1f}"
    prov = json.loads((tmp_path / "tables" / "main.provenance.json").read_text())
    assert [i["path"] for i in prov["inputs"]] == [str(p) for p in paths] + [str(splits)]
    assert prov["inputs"][0]["git_commit"] == "commit-xe" and prov["inputs"][0]["seed"] == 0
    assert all(len(i["sha256"]) == 64 for i in prov["inputs"])
    header = tex.split(r"\begin{table}")[0]
    # the inputs are named in the header, without this machine's absolute paths (the table goes into a paper)
    assert all(f"% " in header and f".../metrics/{p.parent.name}/test.json" in header for p in paths)
    assert str(tmp_path) not in tex and str(tmp_path) not in out.with_suffix(".csv").read_text()
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes leave no temporaries

    abl = tmp_path / "tables" / "ablation_beta.tex"
    files = [write_metrics(tmp_path / "results", r) for r in ["dico_beta-0.05", "dico_beta-1"]]
    cli(caplog, "report", "table-ablation", "--ablation", "beta", "--spec-json", json.dumps(SPEC),
        "--metrics", *files, paths[-1], "--out", abl)
    assert len(pd.read_csv(abl.with_suffix(".csv"))) == 3 and abl.with_suffix(".provenance.json").exists()


# -- the out-of-domain table -----------------------------------------------------------------------
OOD_SPEC = {"scst_rewards": ["cider", "clip_s", "pac_s"],
            "datasets": {"nocaps_val": {"label": "nocaps val", "format": "coco"},
                         "shapes_bg": {"label": "Demo, unseen backgrounds", "format": "demo", "variant": "backgrounds"}}}


def write_ood_metrics(root, run, name, **scores):
    """A run's metrics on evaluation set `name`, as `dico evaluate --split <name>` writes them."""
    path = write_metrics(root, run, split=name, **scores)
    target = Path(root) / "metrics" / run / "ood" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    path.rename(target)
    return target


def test_ood_table_has_a_column_group_per_set_and_the_runs_as_rows(tmp_path, caplog):
    res = tmp_path / "results"
    cider = {"nocaps_val": {"xe": 0.40, "scst_cider": 0.55, "dico": 0.47},
             "shapes_bg": {"xe": 0.30, "scst_cider": 0.33, "dico": 0.31}}
    pac = {"nocaps_val": {"xe": 0.70, "scst_cider": 0.69, "dico": 0.78},
           "shapes_bg": {"xe": 0.60, "scst_cider": 0.61, "dico": 0.66}}
    args = []
    for name in ["shapes_bg", "nocaps_val"]:  # given in any order: the config's order wins
        for run in ["dico", "xe", "scst_cider"]:
            if (name, run) != ("shapes_bg", "scst_cider"):  # one run not evaluated on one set
                p = write_ood_metrics(res, run, name, CIDEr=cider[name][run], PAC_S=pac[name][run])
                args.append(f"{name}={p}")
    out = tmp_path / "tables" / "ood.tex"
    cli(caplog, "report", "table-ood", "--spec-json", json.dumps(OOD_SPEC), "--metrics", *args, "--out", out)
    tex = out.read_text()
    body = tex.split(r"\begin{tabular}")[1]
    assert r"\multicolumn{5}{c}{nocaps val} & \multicolumn{5}{c}{Demo, unseen backgrounds} \\" in body
    assert r"\cmidrule(lr){2-6} \cmidrule(lr){7-11}" in body
    assert "Method & C & S & CLIP-S & PAC-S & RefPAC-S & C & S & CLIP-S & PAC-S & RefPAC-S" in body
    rows = [line.split(" & ")[0] for line in body.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()]
    assert rows == ["XE", "SCST (CIDEr)", "DiCO"]  # the paper's order, not the order given
    # C and PAC-S of each group, x100 with one decimal, best of the group's column in bold
    for run, label in [("xe", "XE"), ("scst_cider", "SCST (CIDEr)"), ("dico", "DiCO")]:
        row = cells(tex, label)
        for g, name in enumerate(["nocaps_val", "shapes_bg"]):
            c, p_ = row[5 * g], row[5 * g + 3]
            if run not in cider[name] or (name, run) == ("shapes_bg", "scst_cider"):
                assert c.startswith("--") and p_.startswith("--")
                continue
            best_c = max(v for r, v in cider[name].items() if (name, r) != ("shapes_bg", "scst_cider"))
            want = f"{100 * cider[name][run]:.1f}"
            assert c == (rf"\textbf{{{want}}}" if cider[name][run] == best_c else want), (run, name, c)
            assert p_.replace(r"\textbf{", "").rstrip("}") == f"{100 * pac[name][run]:.1f}"
    # SPICE is missing for one reason in both groups: one note; the unevaluated cell has its own
    assert tex.count("SPICE: " + labels.latex_escape(SPICE_SHOWN)) == 1
    assert tex.count("every column of the set: the run has no metrics on this set") == 1
    assert "nocaps val (100 images)" in tex and "not a real data set" in tex
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert list(csv["row"]) == ["xe", "scst_cider", "dico"]
    assert list(csv["seeds"]) == [1, 1, 1] and list(csv["runs"]) == ["xe", "scst_cider", "dico"]
    assert csv.loc[0, "nocaps_val:C"] == pytest.approx(40.0) and csv.loc[2, "shapes_bg:PAC-S"] == pytest.approx(66.0)
    assert pd.isna(csv.loc[1, "shapes_bg:C"])
    assert str(tmp_path) not in tex and str(tmp_path) not in out.with_suffix(".csv").read_text()
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert len(prov["inputs"]) == 5 and prov["table"] == "ood"


def test_ood_table_refuses_a_file_of_another_set_and_no_sets(tmp_path, caplog):
    p = write_ood_metrics(tmp_path, "xe", "nocaps_val")
    with pytest.raises(ValueError, match="scores split 'nocaps_val', not evaluation set 'shapes_bg'"):
        cli(caplog, "report", "table-ood", "--spec-json", json.dumps(OOD_SPEC), "--metrics", f"shapes_bg={p}",
            "--out", tmp_path / "ood.tex")
    with pytest.raises(ValueError, match="evaluate.datasets is empty"):
        cli(caplog, "report", "table-ood", "--spec-json", json.dumps(OOD_SPEC), "--metrics", "--out", tmp_path / "ood.tex")
    assert not (tmp_path / "ood.tex").exists()


def test_ood_table_reported_numbers_use_set_prefixed_columns(tmp_path, caplog):
    p = write_ood_metrics(tmp_path, "dico", "nocaps_val", CIDEr=0.5)
    reported = tmp_path / "reported.yaml"
    reported.write_text("tables:\n  ood:\n    dico: {nocaps_val:C: 48.0}\n")
    out = tmp_path / "ood.tex"
    cli(caplog, "report", "table-ood", "--spec-json", json.dumps(OOD_SPEC), "--metrics", f"nocaps_val={p}",
        "--reported", reported, "--out", out)
    assert cells(out.read_text(), "DiCO")[0] == r"50.0 {\scriptsize(+2.0)}"
    reported.write_text("tables:\n  ood:\n    dico: {C: 48.0}\n")
    with pytest.raises(ValueError, match=r"table ood row 'dico': unknown columns \['C'\]"):
        cli(caplog, "report", "table-ood", "--spec-json", json.dumps(OOD_SPEC), "--metrics", f"nocaps_val={p}",
            "--reported", reported, "--out", out)


# -- figures -------------------------------------------------------------------------------------
def write_log(root, run, fine_tune):
    rows = []
    for step in range(10, 110, 10):
        rows.append({"step": step, "phase": "train", "loss": 3.0 / step ** 0.3, "step_s": 0.1})
        if step % 50 == 0:
            val = {"CIDEr": 0.5 + step / 200, "fluent_pct": 90.0 - step / 10}  # as on demo data
            if fine_tune:
                val.update({"CLIP-S": 0.6, "RefCLIP-S": 0.65, "PAC-S": 0.7 + step / 1000, "RefPAC-S": 0.75})
            rows.append({"step": step, "phase": "val", **val, "best": step == 100, "example": "a cat", "val_s": 1})
    path = Path(root) / "runs" / run / "train_log.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_captions(root, run, n):
    path = Path(root) / "captions" / run / "test.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"image_id": i, "caption": f"{run} says a fairly long caption about a "
                                 f"red circle left of a blue square on image {i}"} for i in range(n)]))
    return path


def test_figures_pdf_png_and_provenance(tmp_path, caplog):
    res, figs, spec = tmp_path / "results", tmp_path / "figures", json.dumps(SPEC)
    logs = [write_log(res, r, r != "xe") for r in MAIN_RUNS]
    metrics = main_metrics(res) + [write_metrics(res, r, CIDEr=1.1) for r in
                                   ["dico_beta-0.05", "dico_beta-1", "dico_reward-clip_s"]]
    splits = splits_file(tmp_path, n_test=4)
    captions = [write_captions(res, r, 4) for r in MAIN_RUNS]
    cli(caplog, "report", "figure-training-curves", "--spec-json", spec, "--logs", *logs, "--out", figs / "training_curves.pdf")
    cli(caplog, "report", "figure-tradeoff", "--spec-json", spec, "--metrics", *metrics, "--out", figs / "tradeoff.pdf")
    cli(caplog, "report", "figure-ablations", "--spec-json", spec, "--metrics", *metrics[4:], "--out", figs / "ablations.pdf")
    cli(caplog, "report", "figure-qualitative", "--spec-json", spec, "--captions", *captions, "--splits", splits,
        "--out", figs / "qualitative.pdf")
    for stem in ["training_curves", "tradeoff", "ablations", "qualitative"]:
        pdf, png = figs / f"{stem}.pdf", figs / f"{stem}.png"
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        prov = json.loads((figs / f"{stem}.provenance.json").read_text())
        assert prov["inputs"] and all(len(i["sha256"]) == 64 for i in prov["inputs"])
    qual = json.loads((figs / "qualitative.provenance.json").read_text())
    assert len(qual["image_ids"]) == 3  # report.qualitative_images of the spec
    assert {i["path"] for i in qual["inputs"]} >= {str(p) for p in captions} | {str(splits)}
    curves = json.loads((figs / "training_curves.provenance.json").read_text())
    assert [i["run"] for i in curves["inputs"]] == MAIN_RUNS


def test_scatter_labels_avoid_each_other_and_the_markers():
    plt = figures._pyplot()
    fig, ax = plt.subplots(figsize=(3.5, 3.0))
    points = [(1.0, 1.0, "XE (+2)"), (1.1, 1.02, "SCST (CIDEr)"), (1.05, 0.98, "DiCO"), (2.0, 2.0, "SCST (PAC-S)"),
              (1.5, 1.5, "DiCO ($\\beta$=1)")]
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    ax.margins(0.2)
    fig.canvas.draw()
    figures._place_labels(ax, points)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert [t.get_text() for t in ax.texts] == [p[2] for p in points]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    centres = ax.transData.transform([p[:2] for p in points])
    assert not any(box.contains(*c) for box in boxes for c in centres)
    assert all(ax.bbox.contains(b.x0, b.y0) and ax.bbox.contains(b.x1, b.y1) for b in boxes)
    plt.close(fig)


def test_tradeoff_figure_names_runs_that_share_a_point(tmp_path):
    paths = main_metrics(tmp_path)
    paths[2] = write_metrics(tmp_path, "scst_clip_s", CIDEr=1.000, PAC_S=0.801)  # XE's scores
    metrics = inputs.load_metrics(paths)
    plt = figures._pyplot()
    seen = {}
    real_save = figures.save_figure

    def keep_texts(fig, *args, **kwargs):
        seen["texts"] = [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]
        return real_save(fig, *args, **kwargs)

    figures.save_figure = keep_texts
    try:
        figures.figure_tradeoff(metrics, tmp_path / "tradeoff.pdf", SPEC)
    finally:
        figures.save_figure = real_save
    assert seen["texts"].count("XE (+1)") == 2 and "SCST (CLIP-S)" not in seen["texts"]
    assert "XE (+1): also SCST (CLIP-S), same scores" in seen["texts"]
    assert plt.get_fignums() == []


def test_ablations_figure_without_ablations(tmp_path, caplog):
    cli(caplog, "report", "figure-ablations", "--spec-json", json.dumps({**SPEC, "ablations": {}}), "--metrics",
        "--out", tmp_path / "ablations.pdf")
    assert (tmp_path / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "ablations.pdf").read_bytes()[:5] == b"%PDF-"
    assert json.loads((tmp_path / "ablations.provenance.json").read_text())["inputs"] == []  # says so: none


# -- workflow ------------------------------------------------------------------------------------
def test_report_captions_exist():
    smk = (REPO / "workflow" / "rules" / "report.smk").read_text()
    captions = set(re.findall(r'"\.\./report/([^"{}]+\.rst)"', smk))
    captions |= {f"figure_{name}.rst" for name in ["training_curves", "tradeoff", "ablations", "qualitative"]}
    assert all((REPO / "workflow" / "report" / c).exists() for c in captions)
    assert (REPO / "workflow" / "report" / "workflow.rst").exists()


def planned_jobs(output):
    """[(rule, {wildcard: value})] of the jobs in snakemake's (dry-)run output."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if head:
            wc = re.search(r"^\s+wildcards: (.*)$", block, re.M)
            jobs.append((head.group(1), dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {}))
    return jobs


def dry_run(target, *flags):
    """The jobs `snakemake -n -F target` plans (all of them, whatever is already built)."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-F", "--nolock", target, *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return planned_jobs(proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def demo_config():
    return dc.load(REPO / "config" / "config.yaml")


@pytest.fixture(scope="module")
def per_run_config(tmp_path_factory, demo_config):
    """The demo config with one generate / evaluate job per run (evaluate.group_runs: false, the
    paper's setting): the setting in which a target needs only its own runs."""
    import yaml

    path = tmp_path_factory.mktemp("per_run") / "config.yaml"
    path.write_text(yaml.safe_dump(dc.deep_merge(demo_config, {"evaluate": {"group_runs": False}})))
    return path


@pytest.mark.parametrize("target", ["table_main", "ablation_beta", "figure_training_curves", "figure_ablations"])
def test_report_targets_plan_only_their_own_runs(target, demo_config, per_run_config):
    ablations = dc.ablation_runs(demo_config)
    main = ["xe"] + [f"scst_{r}" for r in demo_config["scst"]["rewards"]] + ["dico"]
    every_ablation = {r for points in ablations.values() for r in points.values()}
    expected = {  # target -> (runs trained, runs evaluated (one job scores all splits), report jobs)
        "table_main": (set(main), set(main), {"table_main"}),
        "ablation_beta": ({"xe", *ablations["beta"].values()}, set(ablations["beta"].values()),
                          {"table_ablation", "ablation_beta"}),
        "figure_training_curves": (set(main), set(), {"figure_training_curves"}),
        "figure_ablations": ({"xe"} | every_ablation, every_ablation, {"figure_ablations"}),
    }[target]
    jobs = dry_run(target, "--configfile", str(per_run_config))
    trained = {wc.get("run", "xe") for rule, wc in jobs if rule.startswith("train_") and rule != "train_clip"}
    evaluated = {wc["run"] for rule, wc in jobs if rule == "evaluate"}
    reporting = {rule for rule, _ in jobs if rule.startswith(("table_", "figure", "ablation_", "tables"))}
    assert (trained, evaluated, reporting) == expected
    if target == "ablation_beta":
        assert not any(r.startswith("scst_") for r in trained)
        assert [wc for rule, wc in jobs if rule == "table_ablation"] == [{"ablation": "beta"}]


def test_grouped_runs_caption_and_score_every_run_in_one_job_each(demo_config):
    """The demo (evaluate.group_runs: true): one generate and one evaluate job, for every run, so a
    target such as ablation_beta waits for all runs (the trade the schema describes)."""
    jobs = dry_run("ablation_beta")
    counts = {r: sum(1 for rule, _ in jobs if rule == r) for r in ("generate_runs", "evaluate_runs", "generate", "evaluate")}
    assert counts == {"generate_runs": 1, "evaluate_runs": 1, "generate": 0, "evaluate": 0}
    trained = {wc.get("run", "xe") for rule, wc in jobs if rule.startswith("train_") and rule != "train_clip"}
    assert trained == set(dc.runs(demo_config))


def test_ood_target_is_listed_and_plans_the_main_runs_on_every_set(tmp_path, demo_config):
    """`snakemake ood`: the main table's runs captioned and scored on each evaluation set (its split
    file, features and embeddings first), nothing of the ablations; the target is listed."""
    import yaml

    config = json.loads(json.dumps(demo_config))
    config["evaluate"]["datasets"] = {"shapes_bg": {"format": "demo"}, "shapes_colour": {"format": "demo",
                                                                                      "demo": {"variant": "colours"}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    listed = subprocess.run([sys.executable, "-m", "snakemake", "--list-target-rules", "--configfile",
                             str(tmp_path / "c.yaml")], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert "ood" in listed.stdout.split(), listed.stdout + listed.stderr
    proc = subprocess.run([sys.executable, "-m", "snakemake", "ood", "-n", "-F", "--nolock", "--configfile",
                           str(tmp_path / "c.yaml")], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = planned_jobs(proc.stdout + proc.stderr)
    main = {"xe", *(f"scst_{r}" for r in demo_config["scst"]["rewards"]), "dico"}
    sets = {"shapes_bg", "shapes_colour"}
    ood = {f"ood/{d}" for d in sets}  # the {split} of an extra set in every rule that serves COCO's splits too
    for rule in ("generate", "evaluate"):
        assert {(wc["run"], wc["split"]) for r, wc in jobs if r == rule} == {(r, s) for r in main for s in ood}
    assert {wc["dataset"] for r, wc in jobs if r == "prepare_ood"} == sets
    assert {wc["split"] for r, wc in jobs if r == "cache_features" and wc["split"].startswith("ood/")} == ood
    assert {(wc["name"], wc["split"]) for r, wc in jobs if r == "cache_embeddings" and wc["split"].startswith("ood/")} \
        == {(n, s) for n in ("clip", "pac") for s in ood}
    assert not {r for r, _ in jobs} & {"generate_runs", "evaluate_runs", "table_main", "table_ablation"}
    assert [r for r, _ in jobs if r.startswith("table_")] == ["table_ood"]


def test_ood_target_without_sets_says_what_to_configure(tmp_path):
    copy_workflow(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-c1", "ood"], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "evaluate.datasets is empty" in (tmp_path / "results/logs/report/table_ood.log").read_text()


def test_report_rules_run_and_rebuild_only_on_their_inputs(tmp_path, demo_config):
    """The rules' shell commands work, and changing one ablation's metrics or grid rebuilds only
    the targets that read them."""
    copy_workflow(tmp_path)
    bin_dir = Path(sys.executable).parent  # the `dico` console script of this environment
    res = tmp_path / "results"
    for i, run in enumerate(dc.runs(demo_config)):  # everything upstream, as files
        write_metrics(res, run, CIDEr=1 + i / 50, PAC_S=0.8 + i / 300)
    splits_file(res / "data")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    # Only the report rules: the metrics files count as sources, nothing upstream is planned.
    allowed = ["table_main", "table_ablation", "figure_ablations", "ablation_beta", "ablation_tau"]

    def snakemake(*targets, dry=True):
        flags = ["-n"] if dry else []
        proc = subprocess.run([sys.executable, "-m", "snakemake", "-c2", *flags, "--allowed-rules", *allowed,
                               "--", *targets],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return {rule + "".join(f"[{v}]" for v in wc.values()) for rule, wc in planned_jobs(proc.stdout + proc.stderr)}

    targets = ["table_main", "ablation_beta", "ablation_tau", "figure_ablations"]
    snakemake(*targets, dry=False)
    assert r"\toprule" in (res / "tables/main.tex").read_text()
    assert len(pd.read_csv(res / "tables/ablation_beta.csv")) == 3
    assert json.loads((res / "tables/ablation_tau.provenance.json").read_text())["table"] == "ablation_tau"
    assert (res / "figures/ablations.pdf").read_bytes()[:5] == b"%PDF-"
    assert (res / "figures/ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ablation beta table: 3 rows" in (res / "logs/report/table_ablation_beta.log").read_text()
    assert snakemake(*targets) == set()  # up to date
    # New numbers for one tau point: the tau table and the ablations figure, nothing else.
    path = res / "metrics" / ablations_run(demo_config, "tau") / "test.json"
    path.write_text(path.read_text().replace('"CIDEr": 1.', '"CIDEr": 2.'))
    assert snakemake(*targets) == {"table_ablation[tau]", "ablation_tau", "figure_ablations"}
    # A new tau value in the config: the beta and main tables keep their params, so stay built.
    config = tmp_path / "config" / "config.yaml"
    config.write_text(re.sub(r"tau: \[(.*)\]", r"tau: [\1, 3]", config.read_text()))
    assert snakemake("table_main", "ablation_beta") == set()


def ablations_run(config, name):
    """A non-default run of ablation `name`."""
    return next(r for r in dc.ablation_runs(config)[name].values() if r != "dico")
