import torch

from dico.tokenizer import CLIP_BOS, CLIP_EOS, CLIP_PAD, CLIP_VOCAB, CaptionTokenizer, clip_encode


def test_full_vocab_is_the_official_layout():
    tok = CaptionTokenizer.build("full")
    assert tok.vocab_size == CLIP_VOCAB == 49409
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (CLIP_BOS, CLIP_EOS, CLIP_PAD)
    ids = tok.encode("A man riding a horse.", max_len=77)
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:-1] == clip_encode("a man riding a horse .")


def test_round_trip_lowercases_and_splits_punctuation():
    tok = CaptionTokenizer.build("full")
    text = "A red circle, left of a BLUE square."
    assert tok.decode(tok.encode(text, 77)) == "a red circle , left of a blue square ."


def test_train_vocab_is_compact_and_round_trips():
    caps = ["a red circle left of a blue square", "two shapes: a big green box and a tiny disk"]
    tok = CaptionTokenizer.build("train", caps)
    assert tok.vocab_size < 40
    for c in caps:
        assert tok.decode(tok.encode(c, 32)) == c.replace(":", " :").replace("  ", " ")
    # unseen words cannot be produced by a compact vocabulary: they are dropped
    assert tok.decode(tok.encode("a purple circle", 32)) == "a circle"
    clone = CaptionTokenizer.from_state_dict(tok.state_dict())
    assert clone.clip_ids == tok.clip_ids


def test_batch_encode_pads_and_truncates_keeping_eos():
    tok = CaptionTokenizer.build("train", ["a b c d e f g h"])
    batch = tok.batch_encode(["a b c d e f g h", "a b"], max_len=6)
    assert batch.shape == (2, 6)
    assert batch[0, -1] == tok.eos_id and batch[0, 0] == tok.bos_id
    assert batch[1].tolist()[-2:] == [tok.pad_id, tok.pad_id]
    assert tok.decode_batch(batch) == ["a b c d", "a b"]


def test_decode_stops_at_eos_and_skips_specials():
    tok = CaptionTokenizer.build("train", ["red circle"])
    red, circle = tok.encode("red circle", 8)[1:3]
    ids = torch.tensor([tok.bos_id, red, circle, tok.eos_id, red, tok.pad_id])
    assert tok.decode(ids) == "red circle"


def test_our_bpe_equals_open_clip_token_for_token():
    import random

    from open_clip.tokenizer import SimpleTokenizer

    from dico import demo
    from dico.tokenizer import ClipBPE

    ours, theirs = ClipBPE(), SimpleTokenizer()
    rng = random.Random(0)
    texts = [c for _ in range(200) for c in demo.captions(demo.random_scene(rng), rng)]
    texts += ["A man's dog isn't 12 years old!!", "Ünïcödé café naïve — “quotes” &amp; emojis 🐶🍕",
              "tab\tand\nnewline  spaces", "", "e.g. x-ray 3.5kg", "日本語のテキスト", "a" * 60,
              "<start_of_text> hi <end_of_text>", "COCO_val2014_000000391895.jpg"]
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.;:!?'\"-0123456789éüß漢字😀\u00a0"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for t in texts:
        assert ours.encode(t) == theirs.encode(t), t
        assert ours.decode(ours.encode(t)) == theirs.decode(theirs.encode(t)), t
