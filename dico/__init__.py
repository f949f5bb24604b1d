"""dico: a small library that reproduces DiCO (Moratelli et al., BMVC 2024) end to end.

One module per concern (docs/architecture.md has the import graph and the contracts):

    config        the config: schema validation with defaults, the runs it asks for, each step's settings
    layout        where everything goes under results/ (the workflow's rules use it too)
    io            atomic writes, JSON, file hashing, provenance, the error type of bad user input
    download      resumable, checked downloads
    data          the normalised split file: Karpathy files in, train / val / test records out
    own_data      your own data set: a folder of images + a captions file, split by a hash of each name
    eval_sets     extra evaluation sets (nocaps, Flickr30k, a second demo set)
    images        opening and decoding image files for a CLIP model
    clip_model    the frozen CLIP (`Evaluator`): grid features, image and text embeddings
    clip_weights  loading and saving CLIP weights (OpenAI, PAC-S, open_clip layouts)
    features      grid features cached once per split, and reading them back
    embeddings    image embeddings of a CLIP model, and the file cache_embeddings writes
    tokenizer     the captioner's CLIP-BPE vocabulary
    text          the official post-processing of generated captions
    model         the captioner (BERT-style encoder, GPT-2-style decoder with cross-attention)
    decoding      batched beam search (transformers 4.20's and M2's)
    checkpoint    the captioner checkpoint: save, load, checks, provenance
    inference     captioning cached features with a checkpoint (the generate step)
    captioning    captioning image files with a checkpoint or the release (`dico caption`)
    losses        XE, SCST and DiCO losses over plain tensors
    rewards       CIDEr-D and CLIP-score rewards of generated ids
    validation    validation during training (checkpoint selection)
    runtime       devices, seeds, AMP and loss scaling, resumable state, multi-GPU
    launch        how a training job starts (one process, or torchrun)
    gpu_slots     which GPUs of one machine each job gets (file locks; `dico gpu-run`)
    train         the training loops: XE, SCST, DiCO
    run_events    a training run's TensorBoard curves (the training log's rows as event files)
    doctor        the preflight: what a configured run needs of this machine, and whether it has it
    metrics/      the one evaluation stack of `dico evaluate` and `dico score`
    report/       the paper's tables and figures
    official/     the released DiCO checkpoint: read, convert, export
    demo/         the embedded demo: generated data and the tiny CLIP stand-ins
    cli/          `dico <step>`: parses and dispatches

No Snakemake imports inside; the Snakefile's rules call the `dico` command (dico.cli).
"""
__version__ = "0.1.0"
