# Stage 1 (paper config): the public inputs, fetched only when missing (dico.config.downloads: the CLIP
# weights, COCO's Karpathy file and images, the extra evaluation sets' annotations). Every download is
# resumable, size- and sha256-checked and renamed into place when verified (dico.download). A file or
# folder that already exists is an existing output to Snakemake, so pointing the config at a copy you
# have means no download job at all. The URLs and sha256 pins travel as untracked params
# (dico.download.Untracked): editing them later reruns nothing. localrule: compute nodes may have no
# internet; `snakemake download_all` fetches everything up front on the login node.


for _d in dc.downloads(config):

    rule:
        name:
            f"download_{_d['name']}"
        output:
            directory(_d["out"]) if _d["folder"] else _d["out"],
        params:
            kind=_d["kind"],  # params are bound now; the shell command is formatted when the job runs
            source=download_args(_d),
        localrule: True
        retries: 2
        log:
            L.log("download", _d["name"]),
        conda:
            "../../envs/data.yaml"
        shell:
            "dico download {params.kind} {params.source} --out {output} > {log} 2>&1"


if SPICE_JARS:

    rule download_spice:  # `snakemake download_spice --cores 1`: SPICE's jars only (evaluate.spice_jars)
        input:
            SPICE_JARS,
        localrule: True


rule download_all:
    input:
        [d["out"] for d in dc.downloads(config)],
    localrule: True
