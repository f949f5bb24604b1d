# Stages 7-8: beam-search captions of every evaluation split, then every metric of the paper's
# tables. One job per run covers all splits: the model loads once and METEOR's JVM (about 12 s of
# start-up) starts once.


rule generate:
    input:
        model="results/runs/{run}/model.pt",
        splits=splits_file(),
        features=[features_index(s) for s in EVAL_SPLITS],
    output:
        [f"results/captions/{{run}}/{s}.json" for s in EVAL_SPLITS],
    params:
        spec=spec(dc.generate_spec(config)),
        splits=" ".join(EVAL_SPLITS),
    threads: 1
    log:
        "results/logs/generate/{run}.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "dico generate --spec-json {params.spec:q} --model {input.model} --splits {input.splits}"
        " --split {params.splits} --features {input.features} --out {output}"
        " --threads {threads} > {log} 2>&1"


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        [f"results/metrics/{{run}}/{s}.json" for s in EVAL_SPLITS],
    params:
        spec=spec(dc.evaluate_spec(config)),
        models=evaluate_args,
        splits=" ".join(EVAL_SPLITS),
        runs=lambda wc: wc.run,
    threads: 1
    log:
        "results/logs/evaluate/{run}.log",
    conda:
        "../../envs/eval.yaml"
    shell:
        "dico evaluate --spec-json {params.spec:q} --run {params.runs} --captions {input.captions}"
        " --splits {input.splits} --split {params.splits} {params.models}"
        " --model-checkpoint {input.model} --out {output} --threads {threads} > {log} 2>&1"


# evaluate.group_runs (the demo): one job captions every run and one scores them all, by the same
# commands (several --model / --run); the per-run rules above stay the twins' base and lose to these.
if config["evaluate"]["group_runs"]:

    ruleorder: generate_runs > generate
    ruleorder: evaluate_runs > evaluate

    use rule generate as generate_runs with:
        input:
            model=[f"results/runs/{r}/model.pt" for r in RUNS],
            splits=splits_file(),
            features=[features_index(s) for s in EVAL_SPLITS],
        output:
            [f"results/captions/{r}/{s}.json" for r in RUNS for s in EVAL_SPLITS],
        threads: 2
        log:
            "results/logs/generate/all_runs.log",

    use rule evaluate as evaluate_runs with:
        input:
            unpack(evaluate_runs_inputs),
        output:
            [f"results/metrics/{r}/{s}.json" for r in RUNS for s in EVAL_SPLITS],
        params:
            spec=spec(dc.evaluate_spec(config)),
            models=evaluate_args,
            splits=" ".join(EVAL_SPLITS),
            runs=" ".join(RUNS),
        threads: 2
        log:
            "results/logs/evaluate/all_runs.log",


# The extra evaluation sets (evaluate.datasets): every run captioned and scored on each, one job per
# run and set, by the same commands as above (use rule: one shell line to keep right). The set's
# split file links COCO's train split (dico.data, splits_from): % novel counts against the captions
# the model was trained on.
use rule generate as generate_ood with:
    input:
        model="results/runs/{run}/model.pt",
        splits=lambda wc: ood_splits_file(wc.dataset),
        features=lambda wc: features_index(f"ood/{wc.dataset}"),
    output:
        ood_captions("{run}", "{dataset}"),
    params:
        spec=spec(dc.generate_spec(config)),
        splits=lambda wc: wc.dataset,
    log:
        "results/logs/generate/ood/{dataset}/{run}.log",


use rule evaluate as evaluate_ood with:
    input:
        unpack(evaluate_ood_inputs),
    output:
        ood_metrics("{run}", "{dataset}"),
    params:
        spec=spec(dc.evaluate_spec(config)),
        models=evaluate_ood_args,
        splits=lambda wc: wc.dataset,
        runs=lambda wc: wc.run,
    log:
        "results/logs/evaluate/ood/{dataset}/{run}.log",
