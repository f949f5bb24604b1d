# Stages 7-8: beam-search captions, then every metric of the paper's tables, one job per run and
# {split}: COCO's evaluation splits and ood/<set> of each extra evaluation set alike, and the released
# DiCO checkpoint (run dico_official, official.smk) by the same rules. An extra set's split file links
# COCO's train split (dico.eval_sets), so % novel counts against the captions the model was trained on.


rule generate:
    input:
        model=L.run_model("{run}"),
        splits=lambda wc: L.split_source(wc.split)[0],
        features=L.features_index(BACKBONE, "{split}"),
        nltk=NLTK_INPUTS,
    output:
        L.captions_file("{run}", "{split}"),
    params:
        spec=spec(dc.generate_spec(config)),
        split=split_name,
        **launch.gpu_params(GPU_SLOTS),
    resources:
        **launch.resources(config, "generate"),
    threads: 1
    log:
        L.log("generate", "{run}", "{split}"),
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.gpu}dico generate --spec-json {params.spec:q} --model {input.model} --splits {input.splits}"
        " --split {params.split} --features {input.features} --out {output}"
        " --threads {threads} > {log} 2>&1"


rule evaluate:
    input:
        unpack(lambda wc: scorer_inputs([wc.run], [wc.split])),
    output:
        L.metrics_file("{run}", "{split}"),
    params:
        spec=spec(dc.evaluate_spec(config)),
        models=lambda wc: scorer_args([wc.split]),
        split=split_name,
        runs=lambda wc: wc.run,
        **launch.gpu_params(GPU_SLOTS),
    resources:
        **launch.resources(config, "evaluate"),
    threads: 1
    log:
        L.log("evaluate", "{run}", "{split}"),
    conda:
        "../../envs/eval.yaml"
    shell:
        "{params.gpu}dico evaluate --spec-json {params.spec:q} --run {params.runs} --captions {input.captions}"
        " --splits {input.splits} --split {params.split} {params.models}"
        " --model-checkpoint {input.model} --out {output} --threads {threads} > {log} 2>&1"


# evaluate.group_runs (the demo): one job captions every run on COCO's evaluation splits and one
# scores them all, by the same commands (several --model / --run; torch, open_clip and METEOR's JVM
# start once, not per run); the per-run rules above lose to these and serve the rest.
if config["evaluate"]["group_runs"]:

    ruleorder: generate_runs > generate
    ruleorder: evaluate_runs > evaluate

    use rule generate as generate_runs with:
        input:
            model=[L.run_model(r) for r in RUNS],
            splits=L.splits_file(),
            features=[L.features_index(BACKBONE, s) for s in EVAL_SPLITS],
            nltk=NLTK_INPUTS,
        output:
            [L.captions_file(r, s) for r in RUNS for s in EVAL_SPLITS],
        params:
            spec=spec(dc.generate_spec(config)),
            split=" ".join(EVAL_SPLITS),
        threads: 2
        log:
            L.log("generate", "all_runs"),

    use rule evaluate as evaluate_runs with:
        input:
            **scorer_inputs(RUNS, EVAL_SPLITS),
        output:
            [L.metrics_file(r, s) for r in RUNS for s in EVAL_SPLITS],
        params:
            spec=spec(dc.evaluate_spec(config)),
            models=scorer_args(EVAL_SPLITS),
            split=" ".join(EVAL_SPLITS),
            runs=" ".join(RUNS),
        threads: 2
        log:
            L.log("evaluate", "all_runs"),
