# Stage 9: LaTeX tables (+ CSV twins) and figures from the metrics files, training logs and captions,
# one named target per table, ablation and figure (`snakemake --list-target-rules`).
#
# Each rule lists exactly the files its target reads and gets only the slice of report_spec it
# uses: Snakemake reruns a job when an input or a param changes, so a table rebuilds when, and only
# when, its own inputs change (a new tau value does not rebuild the beta table), and
# `snakemake ablation_beta` plans the beta runs and nothing else.
import os

_R = dc.report_spec(config)
_QUALITATIVE = {"qualitative_images": _R["report"]["qualitative_images"]}
# The slice of dc.report_spec(config) each target reads, as its --spec-json.
REPORT_PARAMS = {
    "order": spec({"scst_rewards": _R["scst_rewards"]}),
    "qualitative": spec({"scst_rewards": _R["scst_rewards"], "report": _QUALITATIVE}),
    "ablations": spec({"ablations": _R["ablations"], "dico": {a: _R["dico"][a] for a in ABLATIONS}}),
    **{
        f"ablation_{a}": spec({"ablations": {a: _R["ablations"][a]}, "dico": {a: _R["dico"][a]}})
        for a in ABLATIONS
    },
}
# Optional by design (schema: null or a missing file = no reported-vs-reproduced deltas), so a
# missing file must not become a missing input.
_REPORTED = config["report"]["reported"]
REPORTED_INPUT = [_REPORTED] if _REPORTED and os.path.exists(_REPORTED) else []
REPORTED_ARG = " ".join(f"--reported {p}" for p in REPORTED_INPUT)
TEST_METRICS_MAIN = [L.metrics_file(r, "test") for r in MAIN_RUNS_ALL_SEEDS]
TEST_METRICS_ABLATIONS = list(dict.fromkeys(f for a in ABLATIONS for f in ablation_metrics(a)))
# A figure's outputs: PDF (for the paper), PNG (shown in the HTML report), provenance.
FIGURE_OUTPUTS = {
    name: {
        "pdf": L.figure(name),
        "png": report(
            L.figure(name, "png"),
            caption=f"../report/figure_{name}.rst",
            category="Figures",
            labels={"figure": name},
        ),
        "provenance": L.figure(name, "provenance.json"),
    }
    for name in FIGURE_NAMES
}


rule table_main:
    input:
        metrics=TEST_METRICS_MAIN,
        splits=L.splits_file(),
        reported=REPORTED_INPUT,
    output:
        tex=report(
            L.table("main"),
            caption="../report/table_main.rst",
            category="Tables",
            labels={"table": "main", "format": "LaTeX"},
        ),
        csv=report(
            L.table("main", "csv"),
            caption="../report/table_main.rst",
            category="Tables",
            labels={"table": "main", "format": "CSV"},
        ),
        provenance=L.table("main", "provenance.json"),
    params:
        spec=REPORT_PARAMS["order"],
        reported=REPORTED_ARG,
    log:
        L.log("report", "table_main"),
    conda:
        "../../envs/report.yaml"
    shell:
        "dico report table-main --spec-json {params.spec:q} --metrics {input.metrics}"
        " --splits {input.splits} {params.reported} --out {output.tex} > {log} 2>&1"


rule table_ablation:
    input:
        metrics=lambda wc: ablation_metrics(wc.ablation),
        splits=L.splits_file(),
        reported=REPORTED_INPUT,
    output:
        tex=report(
            L.table("ablation_{ablation}"),
            caption="../report/table_ablation.rst",
            category="Tables",
            labels={"table": "ablation {ablation}", "format": "LaTeX"},
        ),
        csv=report(
            L.table("ablation_{ablation}", "csv"),
            caption="../report/table_ablation.rst",
            category="Tables",
            labels={"table": "ablation {ablation}", "format": "CSV"},
        ),
        provenance=L.table("ablation_{ablation}", "provenance.json"),
    wildcard_constraints:
        ablation="|".join(ABLATIONS) or "none",
    params:
        spec=lambda wc: REPORT_PARAMS[f"ablation_{wc.ablation}"],
        reported=REPORTED_ARG,
    log:
        L.log("report", "table_ablation_{ablation}"),
    conda:
        "../../envs/report.yaml"
    shell:
        "dico report table-ablation --ablation {wildcards.ablation} --spec-json {params.spec:q}"
        " --metrics {input.metrics} --splits {input.splits} {params.reported} --out {output.tex} > {log} 2>&1"


# The extra evaluation sets (evaluate.datasets): the main table's runs, one column group per set.
# Without sets the rule still exists and says what to configure (`snakemake ood`).
OOD_TABLE_METRICS = {d: [L.metrics_file(r, L.ood_split(d)) for r in MAIN_RUNS] for d in OOD_SETS}


rule table_ood:
    input:
        metrics=[p for paths in OOD_TABLE_METRICS.values() for p in paths],
        reported=REPORTED_INPUT,
    output:
        tex=report(
            L.table("ood"),
            caption="../report/table_ood.rst",
            category="Tables",
            labels={"table": "ood", "format": "LaTeX"},
        ),
        csv=report(
            L.table("ood", "csv"),
            caption="../report/table_ood.rst",
            category="Tables",
            labels={"table": "ood", "format": "CSV"},
        ),
        provenance=L.table("ood", "provenance.json"),
    params:
        spec=spec(dc.ood_report_spec(config)),
        metrics=" ".join(f"{d}={p}" for d, paths in OOD_TABLE_METRICS.items() for p in paths),
        reported=REPORTED_ARG,
    log:
        L.log("report", "table_ood"),
    conda:
        "../../envs/report.yaml"
    shell:
        "dico report table-ood --spec-json {params.spec:q} --metrics {params.metrics}"
        " {params.reported} --out {output.tex} > {log} 2>&1"


rule ood:
    input:
        L.table("ood"),
    localrule: True


# `snakemake ablation_beta` etc.: one wildcard-free target per configured ablation.
for _ablation in ABLATIONS:

    rule:
        name:
            f"ablation_{_ablation}"
        input:
            L.table(f"ablation_{_ablation}"),
        localrule: True


rule tables:
    input:
        TABLES,
    localrule: True


rule figure_training_curves:
    input:
        logs=[L.train_log(r) for r in MAIN_RUNS],
    output:
        **FIGURE_OUTPUTS["training_curves"],
    params:
        spec=REPORT_PARAMS["order"],
    log:
        L.log("report", "figure_training_curves"),
    conda:
        "../../envs/report.yaml"
    shell:
        "dico report figure-training-curves --spec-json {params.spec:q} --logs {input.logs}"
        " --out {output.pdf} > {log} 2>&1"


rule figure_tradeoff:
    input:
        metrics=[L.metrics_file(r, "test") for r in RUNS],
    output:
        **FIGURE_OUTPUTS["tradeoff"],
    params:
        spec=REPORT_PARAMS["order"],
    log:
        L.log("report", "figure_tradeoff"),
    conda:
        "../../envs/report.yaml"
    shell:
        "dico report figure-tradeoff --spec-json {params.spec:q} --metrics {input.metrics}"
        " --out {output.pdf} > {log} 2>&1"


rule figure_ablations:
    input:
        metrics=TEST_METRICS_ABLATIONS,
    output:
        **FIGURE_OUTPUTS["ablations"],
    params:
        spec=REPORT_PARAMS["ablations"],
    log:
        L.log("report", "figure_ablations"),
    conda:
        "../../envs/report.yaml"
    shell:
        # With no ablations configured the list is empty and the figure says so.
        "dico report figure-ablations --spec-json {params.spec:q} --metrics {input.metrics}"
        " --out {output.pdf} > {log} 2>&1"


rule figure_qualitative:
    input:
        captions=[L.captions_file(r, "test") for r in MAIN_RUNS],
        splits=L.splits_file(),
    output:
        **FIGURE_OUTPUTS["qualitative"],
    params:
        spec=REPORT_PARAMS["qualitative"],
    log:
        L.log("report", "figure_qualitative"),
    conda:
        "../../envs/report.yaml"
    shell:
        "dico report figure-qualitative --spec-json {params.spec:q} --captions {input.captions}"
        " --splits {input.splits} --out {output.pdf} > {log} 2>&1"


rule figures:
    input:
        FIGURES,
        [f.replace(".pdf", ".png") for f in FIGURES],
    localrule: True
