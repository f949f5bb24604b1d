# Stage 3: frozen CLIP-architecture models. Demo models are trained here; the backbone's grid
# features and every scorer's image embeddings are cached once per split.


rule train_clip:
    input:
        splits=splits_file(),
    output:
        "results/clip_models/{name}.pt",
    params:
        spec=lambda wc: spec(dc.clip_model_spec(config, wc.name)),
    threads: 1
    log:
        "results/logs/train_clip/{name}.log",
    conda:
        "../../envs/features.yaml"
    shell:
        "dico train-clip --spec-json {params.spec:q} --name {wildcards.name} --splits {input.splits}"
        " --out {output} --threads {threads} > {log} 2>&1"


rule cache_features:
    input:
        splits=splits_file(),
        checkpoint=clip_model_path(BACKBONE),
    output:
        f"results/features/{BACKBONE}/{{split}}/index.json",
    params:
        spec=spec(dc.features_spec(config)),
    threads: 1
    log:
        "results/logs/cache_features/{split}.log",
    conda:
        "../../envs/features.yaml"
    shell:
        "dico cache-features --spec-json {params.spec:q} --splits {input.splits} --split {wildcards.split}"
        " --checkpoint {input.checkpoint} --out-dir $(dirname {output}) --threads {threads} > {log} 2>&1"


rule cache_embeddings:
    input:
        splits=splits_file(),
        checkpoint=lambda wc: clip_model_path(wc.name),
    output:
        "results/embeddings/{name}/{split}.pt",
    params:
        # features.skip_broken_images reaches the spec only when on: the default leaves params unchanged
        spec=lambda wc: spec(
            {**dc.clip_model_spec(config, wc.name), "skip_broken_images": True}
            if config["features"]["skip_broken_images"]
            else dc.clip_model_spec(config, wc.name)
        ),
    threads: 1
    log:
        "results/logs/cache_embeddings/{name}_{split}.log",
    conda:
        "../../envs/features.yaml"
    shell:
        "dico cache-embeddings --spec-json {params.spec:q} --name {wildcards.name} --splits {input.splits}"
        " --split {wildcards.split} --checkpoint {input.checkpoint} --out {output}"
        " --threads {threads} > {log} 2>&1"
