# Stage 1 (paper config): the public inputs, fetched only when missing. Every download is
# resumable, size- and sha256-checked and renamed into place when verified (dico.download). A file
# or folder that already exists is an existing output to Snakemake, so pointing the config at a
# copy you have means no download job at all. The URLs and sha256 pins travel as untracked params
# (common.smk, Untracked): editing them later reruns nothing. localrule: compute nodes may have no
# internet; `snakemake download_all` fetches everything up front on the login node.
#
# Then the released DiCO checkpoint: download_official -> convert_official ->
# generate/evaluate as run dico_official (target evaluate_official).


for _name, _model in clip_downloads().items():

    rule:
        name:
            f"download_{_name}"
        output:
            _model["path"],
        params:
            source=download_args(_model["url"], _model["sha256"]),
        localrule: True
        retries: 2
        log:
            f"results/logs/download/{_name}.log",
        conda:
            "../../envs/data.yaml"
        shell:
            "dico download file {params.source} --out {output} > {log} 2>&1"


if config["data"]["source"] == "karpathy":
    _dl = config["data"]["downloads"]

    rule download_karpathy:
        output:
            config["data"]["karpathy_json"],
        params:
            source=download_args(
                _dl["karpathy"]["url"],
                _dl["karpathy"]["sha256"],
                archive=f"{_dl['archive_dir']}/caption_datasets.zip",
                member=_dl["karpathy"]["member"],
                keep_archive=_dl["keep_archives"],
            ),
        localrule: True
        retries: 2
        log:
            "results/logs/download/karpathy.log",
        conda:
            "../../envs/data.yaml"
        shell:
            "dico download zip {params.source} --out {output} > {log} 2>&1"

    for _part, _zip in _dl["coco_images"].items():

        rule:
            name:
                f"download_coco_{_part}"
            output:
                directory(f"{image_root()}/{_part}"),
            params:
                source=download_args(
                    _zip["url"],
                    _zip["sha256"],
                    archive=coco_archive(_part),
                    keep_archive=_dl["keep_archives"],
                ),
            localrule: True
            retries: 2
            log:
                f"results/logs/download/coco_{_part}.log",
            conda:
                "../../envs/data.yaml"
            shell:
                "dico download zip {params.source} --out {output} > {log} 2>&1"


# The annotations of the extra evaluation sets (evaluate.datasets.<name>.url): a file, or one entry
# of a zip (Flickr30k / Flickr8k: Karpathy's caption_datasets.zip, fetched to an archive of its own so
# that it never shares a .part file with download_karpathy). Their images: see prepare_ood.
for _name, _set in ood_downloads().items():

    rule:
        name:
            f"download_ood_{_name}"
        output:
            _set["annotations"],
        params:
            kind="zip" if _set["member"] else "file",
            source=download_args(
                _set["url"],
                _set["sha256"],
                **(
                    {
                        "archive": f"{config['data']['downloads']['archive_dir']}/ood_{_name}.zip",
                        "member": _set["member"],
                        "keep_archive": config["data"]["downloads"]["keep_archives"],
                    }
                    if _set["member"]
                    else {}
                ),
            ),
        localrule: True
        retries: 2
        log:
            f"results/logs/download/ood_{_name}.log",
        conda:
            "../../envs/data.yaml"
        shell:
            "dico download {params.kind} {params.source} --out {output} > {log} 2>&1"


rule download_all:
    input:
        download_targets(),
    localrule: True


# -- the released DiCO checkpoint, scored like our runs ------------------------------------------
if config["official"]["url"]:

    rule download_official:
        output:
            config["official"]["path"],
        params:
            source=download_args(config["official"]["url"], config["official"]["sha256"]),
        localrule: True
        retries: 2
        log:
            "results/logs/download/official.log",
        conda:
            "../../envs/data.yaml"
        shell:
            "dico download file {params.source} --out {output} > {log} 2>&1"


rule convert_official:
    input:
        src=config["official"]["path"],
    output:
        f"results/runs/{OFFICIAL_RUN}/model.pt",
    params:
        backbone=BACKBONE,
        # a pickle that holds more than tensors is read only when pinned or trusted (untracked: pinning
        # a file that converted fine changes nothing)
        trust=Untracked(" ".join(
            ([f"--sha256 {shlex.quote(config['official']['sha256'])}"] if config["official"]["sha256"] else [])
            + (["--trust-pickle"] if config["official"]["trust_pickle"] else []))),
    log:
        "results/logs/convert_official.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "dico convert-official --src {input.src} --out {output} --backbone {params.backbone} {params.trust} > {log} 2>&1"


# generate/evaluate (evaluate.smk) are constrained to the config's runs (common.smk); these copies
# take only dico_official, so the official model is scored by exactly the same commands.
use rule generate as generate_official with:
    wildcard_constraints:
        run=OFFICIAL_RUN,


use rule evaluate as evaluate_dico_official with:
    wildcard_constraints:
        run=OFFICIAL_RUN,


rule evaluate_official:
    input:
        [metrics_file(OFFICIAL_RUN, s) for s in EVAL_SPLITS],
    localrule: True
