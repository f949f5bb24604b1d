# Stage 1-2: the data. The demo generates images and captions in the Karpathy schema; COCO comes
# as dataset_coco.json + images. Both end in one normalised split file.


rule make_demo_data:
    output:
        "results/data/demo/dataset_demo.json",
    params:
        spec=spec(dc.demo_spec(config)),
    log:
        "results/logs/make_demo_data.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "dico make-demo-data --spec-json {params.spec:q} --out-dir $(dirname {output}) > {log} 2>&1"


rule prepare_splits:
    input:
        karpathy=karpathy_source(),
        images=coco_image_dirs(),
    output:
        splits_file(),
    params:
        image_root=lambda wildcards: image_root(),
        max_refs=(
            f"--max-refs {config['data']['max_refs']}" if config["data"]["max_refs"] else ""
        ),
    log:
        "results/logs/prepare_splits.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "dico prepare-splits --karpathy-json {input.karpathy} --image-root {params.image_root}"
        " {params.max_refs} --out {output} > {log} 2>&1"


# Extra evaluation sets (evaluate.datasets): one split file each, from its annotations (downloaded by
# download_ood_<name> when missing) or, for a demo set, generated here. A localrule: nocaps images
# are fetched by URL (compute nodes may be offline), and the rest is light.
rule prepare_ood:
    input:
        unpack(ood_inputs),
    output:
        ood_splits_file("{dataset}"),
    params:
        spec=lambda wc: spec(dd.eval_set_spec(config, wc.dataset)),
        train_from=splits_file(),
        # untracked, as the downloads' (common.smk, Untracked): retry settings rerun nothing
        fetch=Untracked(
            f"--retries {config['data']['downloads']['retries']}"
            f" --timeout {config['data']['downloads']['timeout_s']}"
        ),
    localrule: True
    log:
        "results/logs/prepare_ood/{dataset}.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "dico prepare-splits --eval-set {wildcards.dataset} --spec-json {params.spec:q}"
        " --train-from {params.train_from} {params.fetch} --out {output} > {log} 2>&1"
