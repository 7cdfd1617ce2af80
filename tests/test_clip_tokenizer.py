"""CLIP's tokenizer: our BPETokenizer reading the published bpe_simple_vocab_16e6.txt.gz gives open_clip's ids
(punctuation, casing, unicode, html entities, whitespace, truncation of over-long text); the one documented
difference (no ftfy) is shown to be the only one; trained tokenizers keep splitting with `re` as before."""
import gzip
import os
import re

import pytest
import torch

from models.tokenizer import GPT2_SPLIT_PATTERN, BPETokenizer
from tests.reference_imports import import_open_clip

TEXTS = [
    "a red circle", "A Red CIRCLE", "Two YELLOW stars, left of a cat!!! (really?) -- yes; 100% sure...",
    "it's they're I'd we'll you've I'm IT'S", "x=3.14, y=-2e10 & z<5 #hashtag @user under_score",
    "naïve café Ünïcödé ΑΒΓ αβγ Жук 日本語のキャプション 한국어 x²½ Ⅻ", "emoji 🐱🐶 family 👨‍👩‍👧 flag 🇫🇷 👍🏽",
    "  tabs\tand\nnew\r\nlines   and  runs of spaces  ", "e\u0301 combining accent (NFC makes it é)",
    "&amp; &lt;b&gt;bold&lt;/b&gt; Tom &amp;amp; Jerry &quot;quoted&quot;", "a", "!!!", "1234567890",
]


@pytest.fixture(scope="module")
def pair():
    open_clip = import_open_clip()
    vocab_file = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    return BPETokenizer.from_clip_vocab(vocab_file), open_clip.get_tokenizer("ViT-B-32-quickgelu"), vocab_file


def test_same_ids_as_open_clip(pair):
    ours, theirs, _ = pair
    assert ours.vocab_size == 49408 and (ours.start_id, ours.end_id, ours.pad_id) == (49406, 49407, 0)
    ids, mask = ours(TEXTS, max_length=77)
    expected = theirs(TEXTS)
    assert torch.equal(ids, expected)
    assert torch.equal(mask, torch.arange(77)[None, :] <= expected.argmax(-1)[:, None])


@pytest.mark.parametrize("context_length", [77, 8])
def test_over_long_text_is_cut_the_same_way(pair, context_length):
    ours, theirs, _ = pair
    long = " ".join(TEXTS * 3)
    assert len(ours.encode(long)) + 2 > 77
    ids, mask = ours([long, "a red circle"], max_length=context_length, truncate=True)
    assert torch.equal(ids, theirs([long, "a red circle"], context_length=context_length))
    assert ids[0, -1] == ours.end_id and mask[0].all()
    with pytest.raises(ValueError, match="truncate=True"):  # without truncate=True it is an error, as everywhere
        ours([long], max_length=context_length)


def test_decode_matches_open_clip(pair):
    ours, theirs, _ = pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids)


def test_the_only_difference_is_ftfy(pair):
    """CLIP runs ftfy.fix_text first; we do not. Through ftfy first, ours equals open_clip; without, these differ."""
    import ftfy

    ours, theirs, _ = pair
    fixed_by_ftfy = ["\u201ccurly quotes\u201d and \u2018single\u2019", "the \ufb01rst of\ufb02ow ligatures",
                     "\uff21\uff22\uff23 full width", "mojibake: cafÃ©"]
    ids = ours([ftfy.fix_text(t) for t in fixed_by_ftfy], max_length=77)[0]
    assert torch.equal(ids, theirs(fixed_by_ftfy))
    raw = ours(fixed_by_ftfy, max_length=77)[0]
    assert all(not torch.equal(raw[i], ids[i]) for i in range(len(fixed_by_ftfy)))


def test_state_round_trip_keeps_the_clip_settings(pair, tmp_path):
    ours, _, _ = pair
    torch.save({"tokenizer": ours.state_dict()}, tmp_path / "t.pt")
    loaded = BPETokenizer.from_state_dict(torch.load(tmp_path / "t.pt", weights_only=True)["tokenizer"])
    assert loaded.clean == "clip" and loaded.encode(TEXTS[5]) == ours.encode(TEXTS[5])


def test_trained_tokenizers_split_with_re_as_before():
    tok = BPETokenizer.train(["a red circle", "e\u0301 x²"], vocab_size=270, progress=False)
    assert isinstance(tok.word_re, re.Pattern) and tok.pattern == GPT2_SPLIT_PATTERN
    assert tok.word_re.findall("e\u0301") == ["e", "\u0301"]  # `regex` would keep the mark with its letter
    state = tok.state_dict()
    del state["clean"]  # a tokenizer saved before the field existed
    assert BPETokenizer.from_state_dict(state).encode("a red circle") == tok.encode("a red circle")


def test_bad_vocabulary_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read CLIP vocabulary"):
        BPETokenizer.from_clip_vocab(tmp_path / "missing.txt.gz")
    with gzip.open(tmp_path / "short.txt.gz", "wt") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="not CLIP's merge list"):
        BPETokenizer.from_clip_vocab(tmp_path / "short.txt.gz")
