# Stages 7-8: beam-search captions for every run and split, then every metric of the paper's tables.


rule generate:
    input:
        model="results/runs/{run}/model.pt",
        splits=splits_file(),
        features=lambda wc: features_index(wc.eval_split),
    output:
        "results/captions/{run}/{eval_split}.json",
    params:
        spec=spec(dc.generate_spec(config)),
    threads: 1
    log:
        "results/logs/generate/{run}_{eval_split}.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "dico generate --spec-json {params.spec:q} --model {input.model} --splits {input.splits}"
        " --split {wildcards.eval_split} --features {input.features} --out {output}"
        " --threads {threads} > {log} 2>&1"


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        "results/metrics/{run}/{eval_split}.json",
    params:
        spec=spec(dc.evaluate_spec(config)),
        models=evaluate_args,
    threads: 1
    log:
        "results/logs/evaluate/{run}_{eval_split}.log",
    conda:
        "../../envs/eval.yaml"
    shell:
        "dico evaluate --spec-json {params.spec:q} --run {wildcards.run} --captions {input.captions}"
        " --splits {input.splits} --split {wildcards.eval_split} {params.models}"
        " --model-checkpoint {input.model} --out {output} --threads {threads} > {log} 2>&1"
