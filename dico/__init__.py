"""dico: a small library that reproduces DiCO (Moratelli et al., BMVC 2024) end to end.

One module per concern: data, demo, tokenizer, features, model, decoding, losses, rewards, cider,
metrics, evaluator, evaluate, train, runtime, report, download, config, cli. No Snakemake imports
inside; the Snakefile's rules call `python -m dico <step>`.
"""
__version__ = "0.1.0"
