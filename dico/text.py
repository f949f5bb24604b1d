"""The official DiCO post-processing of generated captions (`decoding.postprocess: official`).

The official code saves and scores captions after two steps (official utils.py, `save_predictions`
and `compute_metrics`, both through `postprocess_text`):

  1. `tokenizer.batch_decode(ids, skip_special_tokens=True)` with the CLIP tokenizer of
     transformers 4.20 (`AutoTokenizer.from_pretrained('openai/clip-vit-large-patch14')`, official
     main.py). That is byte-level BPE decoding, "</w>" -> " ", strip (CLIPTokenizerFast's wrapped
     backend decode), and then `clean_up_tokenization`, because `clean_up_tokenization_spaces`
     defaulted to True in 4.20. That step glues " ." " ?" " !" " ," " ' " " n't" " 'm" " 's"
     " 've" " 're" to the word before them.
  2. `postprocess_text`: `nltk.word_tokenize(text.strip())`, drop the PTB punctuation tokens
     below, lower-case, and join with single spaces.

`CaptionTokenizer.decode` already does the first half of step 1 (byte decode, "</w>" -> " ", strip),
so `postprocess_official` starts from our decoded text. tests/test_text.py checks it against a real
transformers CLIPTokenizer and nltk.

Two traps, both checked in tests/test_text.py:
  - transformers 5 *ignores* `clean_up_tokenization_spaces=True` for BPE tokenizers unless
    `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True` is also set.
    A reference built on 5.x without that flag therefore does not reproduce 4.20.
  - `nltk.word_tokenize` first splits sentences with the Punkt model (`punkt_tab` data), which
    rule download_punkt_tab fetches into `decoding.nltk_data` (searched first). Where the data
    cannot be had, we use the word tokenizer alone, as `word_tokenize(..., preserve_line=True)`
    does, and log why once. The two differ only for a
    caption in which Punkt would find a sentence break, i.e. a period inside the caption
    followed by more words. Punkt would split "a dog. a cat" and drop that period. The word
    tokenizer alone splits only the final period, so "dog." stays one token and is kept.

The official environment pins nltk 3.8.1 (official requirements.txt); we run 3.10.4, whose word
tokenizer changed two quote rules. On 2,328 decoded captions (tests/test_text.py's set), 5 tokenise
differently, all with a lone single quote next to a one-letter word ("the boys ' 2 dogs").
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger("dico")

# postprocess_text's punctuation list (official utils.py), the same as pycocoevalcap's PTBTokenizer
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                         ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# PreTrainedTokenizerBase.clean_up_tokenization of transformers 4.20, as (old, new), in this order
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))

MODES = ("official", "none")


def clean_up_tokenization(text: str) -> str:
    """transformers 4.20's default decode clean-up, applied after the BPE decode."""
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text


def use_nltk_data(folder: str | None) -> None:
    """Search `folder` (decoding.nltk_data) first for nltk's data, before NLTK_DATA and ~/nltk_data."""
    import nltk

    if folder and str(Path(folder).resolve()) not in nltk.data.path:
        nltk.data.path.insert(0, str(Path(folder).resolve()))


def _punkt_available() -> bool:
    import nltk

    try:
        nltk.sent_tokenize("a.")
    except LookupError:
        return False
    return True


@lru_cache(maxsize=1)
def word_tokenizer(nltk_data: str | None = None) -> Callable[[str], list[str]]:
    """nltk.word_tokenize where the Punkt data is installed (in `nltk_data` or nltk's own search
    path); otherwise the word tokenizer alone."""
    import nltk

    use_nltk_data(nltk_data)
    if _punkt_available():
        return nltk.word_tokenize
    where = f"in {nltk_data} (decoding.nltk_data) nor " if nltk_data else ""
    log.warning("nltk's Punkt sentence model (punkt_tab) is not installed %sin nltk's search path, so captions are "
                "word-tokenized as one sentence each (nltk.word_tokenize(..., preserve_line=True)). This differs "
                "from the official nltk.word_tokenize only for a caption with a sentence break inside it (its inner "
                "period is kept, glued to its word). Fetch the data with `snakemake download_punkt_tab --cores 1` "
                "(into decoding.nltk_data) or `python -m nltk.downloader -d DIR punkt_tab`", where)
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize


def postprocess_official(caption: str, nltk_data: str | None = None) -> str:
    """Decoded caption -> the text the official code saves and scores (see the module docstring)."""
    words = word_tokenizer(nltk_data)(clean_up_tokenization(caption).strip())
    return " ".join(w.lower() for w in words if w not in PUNCTUATION)


def postprocess_official_batch(captions: Iterable[str], nltk_data: str | None = None) -> list[str]:
    return [postprocess_official(c, nltk_data) for c in captions]


def postprocess(captions: Iterable[str], mode: str, nltk_data: str | None = None) -> list[str]:
    """`decoding.postprocess`: 'official' (the paper's) or 'none' (the decoded text as it is);
    `nltk_data`: decoding.nltk_data, where the official mode's punkt_tab is searched first."""
    if mode == "official":
        return postprocess_official_batch(captions, nltk_data)
    if mode == "none":
        return list(captions)
    raise ValueError(f"decoding.postprocess must be one of {', '.join(MODES)}, got {mode!r}")
