"""Byte-level BPE: lossless round trip, Sennrich's Algorithm 1 replayed naively gives the same merges, encode by
merge ranks gives the training segmentation, state survives torch.load(weights_only=True), batch errors."""
import random
import re
from collections import Counter

import pytest
import torch

from models.tokenizer import GPT2_SPLIT_PATTERN, BPETokenizer, bytes_to_unicode


def shapes_captions(n, seed=0):
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "pink"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "ellipse"]
    sizes = ["small", "large", "tiny", "big"]
    where = ["above", "below", "left of", "right of", "next to"]
    return [f"a {rng.choice(sizes)} {rng.choice(colors)} {rng.choice(shapes)} {rng.choice(where)} "
            f"a {rng.choice(colors)} {rng.choice(shapes)}" for _ in range(n)]


MIXED = ["Ünïcödé façade — naïve café", "日本語のキャプション、猫と犬", "emoji 🐱🐶 and family 👨‍👩‍👧 👍🏽",
         "tabs\tand\nnewlines  with   runs of spaces ", "snake_case __dunder__ x²+y² ½ 3.14 it's we'll"]
CORPUS = shapes_captions(300) + MIXED * 3


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(CORPUS, vocab_size=400, progress=False)


def reference_train(texts, vocab_size):
    """Sennrich et al. Algorithm 1 taken literally: recount every pair of every word after each merge.
    Same tie rule (smaller (left id, right id)) and id reuse as BPETokenizer.train. Returns merges, segmentation."""
    byte_chars = bytes_to_unicode()
    words = Counter(w for t in texts for w in re.findall(GPT2_SPLIT_PATTERN, t))
    segmentation = {w: list(w.encode("utf-8")) for w in words}
    vocab = [byte_chars[b] for b in range(256)]
    merges = []
    while len(vocab) < vocab_size - 3:
        stats = Counter()
        for w, count in words.items():
            s = segmentation[w]
            for pair in zip(s, s[1:]):
                stats[pair] += count
        if not stats:
            break
        best = min(stats, key=lambda pair: (-stats[pair], pair))
        token = vocab[best[0]] + vocab[best[1]]
        if token not in vocab:
            vocab.append(token)
        new_id = vocab.index(token)
        if (vocab[best[0]], vocab[best[1]]) not in merges:
            merges.append((vocab[best[0]], vocab[best[1]]))
        for w, s in segmentation.items():
            out, i = [], 0
            while i < len(s):
                if tuple(s[i:i + 2]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segmentation[w] = out
    return merges, {w: [vocab[i] for i in s] for w, s in segmentation.items()}


def test_incremental_training_equals_naive_algorithm_1_and_encode_replays_it():
    texts = shapes_captions(60, seed=1) + MIXED
    tok = BPETokenizer.train(texts, vocab_size=330, progress=False)
    merges, segmentation = reference_train(texts, vocab_size=330)
    assert len(merges) > 50
    assert tok.merges == merges
    for word, tokens in segmentation.items():  # merge-rank encoding == the segmentation training ended with
        assert [tok.vocab[i] for i in tok.encode(word)] == tokens, word


def test_first_merge_is_the_most_frequent_pair(tok):
    pairs = Counter()
    for text in CORPUS:
        for word in re.findall(GPT2_SPLIT_PATTERN, text):
            b = word.encode("utf-8")
            pairs.update(zip(b, b[1:]))
    (left, right), _ = pairs.most_common(1)[0]
    byte_chars = bytes_to_unicode()
    assert tok.merges[0] == (byte_chars[left], byte_chars[right])
    # (most_common's tie order is not ours, so check there is no tie to begin with)
    assert pairs.most_common(2)[1][1] < pairs.most_common(1)[0][1]


def test_vocab_size_and_special_tokens(tok):
    assert tok.vocab_size == 400 == len(tok.merges) + 256 + 3
    assert {tok.start_id, tok.end_id, tok.pad_id} == {397, 398, 399}
    assert len(set(tok.vocab)) == tok.vocab_size


def test_merges_compress_held_out_captions(tok):
    held_out = shapes_captions(50, seed=123)
    n_tokens = sum(len(tok.encode(t)) for t in held_out)
    n_bytes = sum(len(t.encode("utf-8")) for t in held_out)
    assert n_tokens < n_bytes / 3  # every word of this grammar ends up a single token


@pytest.mark.parametrize("text", [
    "a red circle above a blue square", "Hello, World! 123 4567", "naïve Ünïcödé ΑΒΓ αβγ Ж 日本語 한국어",
    "emoji 🐱 👨‍👩‍👧 🇫🇷 👍🏽", "  leading\ttabs\n\nnewlines\r\n and trailing   ", "e\u0301 combining", "\u00a0nbsp\u3000",
    "x²½Ⅻ_under_score", "it's they're I'd", " ", "",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(0x20, 0x7F), *range(0xA0, 0x250), *range(0x370, 0x3FF), *range(0x4E00, 0x4E40),
                                 *range(0x1F600, 0x1F640), 0x200D, 0x0301, 0x09, 0x0A, 0x0D, 0x2028, 0x3000, 0x00]]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert "".join(tok.word_re.findall(text)) == text  # the split loses nothing
        assert tok.decode(tok.encode(text)) == text


def test_encode_is_deterministic(tok):
    text = "a tiny purple hexagon right of a pink star 🐱"
    first = tok.encode(text)
    tok.cache.clear()
    assert tok.encode(text) == first == tok.encode(text)  # cold cache == warm cache
    again = BPETokenizer.train(CORPUS, vocab_size=400, progress=False)
    assert again.merges == tok.merges and again.encode(text) == first


def test_lowercase_flag():
    tok = BPETokenizer.train(shapes_captions(100), vocab_size=300, progress=False, lowercase=True)
    assert tok.encode("A Red CIRCLE") == tok.encode("a red circle")
    assert tok.decode(tok.encode("A Red CIRCLE")) == "a red circle"


def test_state_dict_round_trip_through_weights_only_load(tok, tmp_path):
    text = "a big white ellipse next to a green triangle, ½ 🐶"
    path = tmp_path / "tok.pt"
    torch.save({"tokenizer": tok.state_dict()}, path)
    state = torch.load(path, weights_only=True)["tokenizer"]
    loaded = BPETokenizer.from_state_dict(state)
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.start_id, loaded.end_id, loaded.pad_id, loaded.vocab_size) == \
        (tok.start_id, tok.end_id, tok.pad_id, tok.vocab_size)
    ids, mask = loaded([text, "a star"], max_length=40)
    ids_ref, mask_ref = tok([text, "a star"], max_length=40)
    assert torch.equal(ids, ids_ref) and torch.equal(mask, mask_ref)
    with pytest.raises(ValueError, match="missing"):
        BPETokenizer.from_state_dict({"vocab": state["vocab"]})


def test_batch_padding_and_mask(tok):
    texts = ["a red circle", "a small blue square below a large yellow star"]
    ids, mask = tok(texts, max_length=16)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == torch.long and mask.dtype == torch.bool
    for b, text in enumerate(texts):
        n = len(tok.encode(text))
        assert ids[b, 0] == tok.start_id and ids[b, n + 1] == tok.end_id
        assert ids[b, 1:n + 1].tolist() == tok.encode(text)
        assert (ids[b, n + 2:] == tok.pad_id).all()
        assert mask[b].tolist() == [True] * (n + 2) + [False] * (16 - n - 2)
        assert tok.decode(ids[b]) == text
    assert tok.decode(ids[0], skip_special=False).startswith("<|startoftext|>a red circle<|endoftext|><|pad|>")


def test_empty_prompt_is_an_error(tok):
    for bad in ["", "   ", "\n\t"]:
        with pytest.raises(ValueError, match="empty prompt"):
            tok(["a red circle", bad], max_length=16)
    with pytest.raises(TypeError, match="list of prompts"):
        tok("a red circle", max_length=16)


def test_over_limit_prompt_is_an_error_naming_prompt_count_and_limit(tok):
    text = "a small blue square below a large yellow star"
    n = len(tok.encode(text)) + 2
    with pytest.raises(ValueError) as err:
        tok([text], max_length=n - 1)
    message = str(err.value)
    assert text in message and f"{n} tokens" in message and f"max_length={n - 1}" in message
    assert "truncate=True" in message
    ids, mask = tok([text], max_length=n)  # exactly at the limit is fine
    assert mask.all()


def test_truncation_keeps_first_tokens_and_ends_with_end(tok):
    text = "a small blue square below a large yellow star"
    full = tok.encode(text)
    L = 6
    assert len(full) + 2 > L
    ids, mask = tok([text, "a star"], max_length=L, truncate=True)
    assert ids[0].tolist() == [tok.start_id] + full[:L - 2] + [tok.end_id]
    assert mask[0].all() and mask[1].sum() == len(tok.encode("a star")) + 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(["a red circle"], vocab_size=100, progress=False)
    with pytest.raises(ValueError, match="no texts"):
        BPETokenizer.train([], vocab_size=300, progress=False)
    tok = BPETokenizer.train(["a red circle"], vocab_size=300, progress=False)
    assert tok.vocab_size < 300  # training stops when every word is one token
    with pytest.raises(ValueError, match="max_length"):
        tok(["a red circle"], max_length=2)
    with pytest.raises(ValueError, match="outside the vocab"):
        tok.decode([tok.vocab_size])


def test_end_of_word_convention_clip_style():
    """The merge-rank loop with Sennrich/CLIP's '</w>' word-end marker: a hand-written CLIP-like state
    (base = bytes and bytes+'</w>', whitespace dropped by the split) encodes by ranks and decodes with spaces."""
    byte_chars = [bytes_to_unicode()[b] for b in range(256)]
    merges = [("l", "o"), ("lo", "w</w>"), ("lo", "w"), ("e", "s"), ("es", "t</w>")]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    tok = BPETokenizer(vocab, merges, pattern=r"[^\W\d_]+|\d|(?:[^\w\s]|_)+", lowercase=True, end_of_word="</w>",
                       pad_id=0)
    ids = tok.encode("Low  lowest")
    assert [tok.vocab[i] for i in ids] == ["low</w>", "low", "est</w>"]
    assert tok.decode(ids) == "low lowest "
    batch, mask = tok(["low"], max_length=5)
    assert batch[0].tolist() == [tok.start_id, vocab.index("low</w>"), tok.end_id, 0, 0]


def test_over_length_counts_what_truncation_cuts(tok):
    texts = ["a red circle", "a small red circle above a large blue square " * 3, "a star"]
    lengths = [len(tok.encode(t)) + 2 for t in texts]
    L = lengths[1] - 1  # only the second is too long
    assert tok.over_length(texts, L) == (1, lengths[1])
    ids, mask = tok(texts, max_length=L, truncate=True)
    assert mask[1].all() and ids[1, -1] == tok.end_id  # the one counted is the one cut
    assert tok.over_length(texts, max(lengths)) == (0, 0) and tok.truncation_report(texts, max(lengths)) == ""
    assert tok.truncation_report(texts, L).startswith(f"1 of 3 caption(s) are longer than max_length={L}")
