"""Byte-level byte-pair encoding (BPE): the tokenizer in front of every text encoder.

Papers: Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words with Subword Units",
arXiv 1508.07909 (BPE: start from single symbols, repeatedly merge the most frequent adjacent pair; Algorithm 1);
Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2), Sec. 2.2 (byte-level BPE:
the base symbols are the 256 bytes, so any unicode string encodes and nothing is ever unknown; a regex splits
text into words first so that merges never cross a letter/number/punctuation boundary).

Training (`BPETokenizer.train`) is Sennrich's Algorithm 1 run over *unique* words with their counts, with the
pair counts updated incrementally after each merge (only the words that contain the merged pair are touched),
so a few thousand captions train to a vocabulary of ~1000 in well under a second (5,000 lines of Python
source, 156 kB, to vocab 1000: 0.4 s on one core of this 2-core CPU).
Encoding (`encode`) applies the learned merges to each word in the order they were learned (lowest rank
first), with a per-word cache. That loop only needs `merge_ranks`; it does not care how the merges were
obtained, so a published merge list (GPT-2's, CLIP's) can be loaded into the same class.

Token strings. As in GPT-2 and CLIP, a token is stored as a str in which every byte is replaced by one
printable character (`bytes_to_unicode`, e.g. the space byte 0x20 becomes 'Ġ'); the vocabulary and the merges
are then plain readable strings, and the published vocabulary files use the same alphabet.

Word-end convention (a documented choice, stored in the state as `end_of_word`):
    ""      GPT-2 style, used by `train`: the space before a word belongs to the word (" circle" is one word),
            so decode(encode(s)) == s exactly, whitespace included.
    "</w>"  Sennrich's and CLIP's style: the marker is appended to the last symbol of every word ("circle</w>"),
            the split regex drops whitespace, and decode turns each marker into a space. Not produced by
            `train`; it is here for CLIP's published vocabulary (`BPETokenizer.from_clip_vocab`).

CLIP's tokenizer (Radford et al. 2021, arXiv 2103.00020; OpenAI's clip/simple_tokenizer.py, copied by open_clip).
`BPETokenizer.from_clip_vocab("bpe_simple_vocab_16e6.txt.gz")` reads the published merge list (the file the
open_clip wheel ships) into this class: vocab = 256 byte symbols, the same 256 with "</w>", one token per merge
(the first 48,894 merges), <|startoftext|> <|endoftext|> = 49,408 tokens; pad id 0 (CLIP pads with zeros);
CLIP_SPLIT_PATTERN; lower-case; and the cleaning step `clean="clip"`: html.unescape twice, Unicode NFC, runs of
whitespace collapsed. tests/test_clip_tokenizer.py shows the ids equal open_clip's. One difference: CLIP also
runs ftfy.fix_text (repairs mojibake, uncurls quotes, undoes ligatures and full-width forms); we do not depend
on ftfy, so a prompt holding such characters can get other ids (the test shows ours(ftfy(s)) == open_clip(s)).
Over-long prompts are cut as CLIP's tokenize(truncate=True) cuts them (see __call__).

Special tokens: <|startoftext|> <|endoftext|> <|pad|> (CLIP's names for the first two) come after the merges.
`__call__` builds the model input: <start> tokens <end> <pad> ... with a mask that is True on real tokens.

Notation (Sennrich Algorithm 1 -> code):
    vocab {"l o w </w>": 5}        word_counts (word -> count) with words held as lists of symbol ids
    get_stats(vocab)               pair_counts (adjacent symbol pair -> count summed over words)
    merge_vocab(pair, vocab)       merge_pair(symbols, pair, merged), applied to the words holding the pair
    merge number i                 rank i in merge_ranks
"""
import gzip
import heapq
import html
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass

import regex
import torch
from tqdm import tqdm

# GPT-2's pre-tokenisation regex, written for Python's built-in `re`:
#   's|'t|...      English contractions split off ("it's" -> "it", "'s")
#   ' ?[^\W\d_]+'  an optional space then letters      (GPT-2: ' ?\p{L}+')
#   ' ?\d+'        an optional space then digits       (GPT-2: ' ?\p{N}+')
#   ' ?(?:[^\w\s]|_)+'  an optional space then anything else but whitespace (GPT-2: ' ?[^\s\p{L}\p{N}]+')
#   '\s+(?!\S)|\s+'     runs of whitespace, leaving the last space to the next word
# The four classes (whitespace, letters, digits, other) cover every character, so the words concatenate
# back to the text. `re` has no \p{L}/\p{N}; the only difference from the `regex` module's classes is that
# numeric characters outside Nd ('²', '½', 'Ⅻ') count as letters here instead of numbers.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+"""

# CLIP's split (OpenAI's simple_tokenizer.py): contractions, runs of letters, single digits, runs of other
# non-space characters; whitespace is dropped. \p{L} / \p{N} need the `regex` module: the built-in `re` has no
# Unicode property classes. Patterns without \p{...} keep compiling with `re`, so trained tokenizers (and the
# checkpoints that hold them) split exactly as before.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_NUM_MERGES = 49152 - 256 - 2  # merges OpenAI reads from bpe_simple_vocab_16e6.txt.gz (vocab 49,408)

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

WORD_CACHE_SIZE = 100_000  # the per-word encode cache is cleared when it holds this many words


@dataclass
class TokenizerConfig:
    vocab_size: int = 512  # byte-level BPE trained on the captions: 256 bytes + merges + 3 special tokens


def bytes_to_unicode():
    """GPT-2's reversible map byte -> printable character (also CLIP's). Printable latin-1 bytes map to
    themselves; the other 68 bytes (control characters, space, ...) map to chr(256 + n), n = 0, 1, ...
    Returns a dict {byte (int 0..255): char}."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_to_char = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(256 + n)
            n += 1
    return byte_to_char


def merge_pair(symbols, pair, merged):
    """Sennrich's merge step on one word: replace every occurrence of `pair` (left to right, not overlapping,
    so 'a a a' -> 'aa a') by `merged`. Works on ids (training) and on token strings (encoding)."""
    out = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


class BPETokenizer:
    """Byte-level BPE tokenizer. Build one with `BPETokenizer.train(texts, vocab_size)` or
    `BPETokenizer.from_state_dict(d)`; the constructor takes the state fields directly."""

    def __init__(self, vocab, merges, pattern=GPT2_SPLIT_PATTERN, lowercase=False, end_of_word="",
                 start_id=None, end_id=None, pad_id=None, clean=""):
        # vocab: list[str], id -> token string (bytes_to_unicode alphabet, plus end_of_word and special tokens)
        # merges: list of (left, right) token-string pairs in the order they were learned (= rank)
        self.vocab = list(vocab)
        self.merges = [tuple(m) for m in merges]
        self.pattern = pattern
        self.lowercase = lowercase
        if clean not in ("", "clip"):
            raise ValueError(f"unknown tokenizer clean step {clean!r}; use '' (none) or 'clip'")
        self.clean = clean  # '' none | 'clip': html.unescape twice, NFC, whitespace collapsed (before lowercase)
        self.end_of_word = end_of_word
        self.token_to_id = {token: i for i, token in enumerate(self.vocab)}
        if len(self.token_to_id) != len(self.vocab):
            dupes = [t for t, c in Counter(self.vocab).items() if c > 1][:5]
            raise ValueError(f"tokenizer vocab has duplicate tokens {dupes}; each token string must appear once")
        self.merge_ranks = {}
        for rank, (left, right) in enumerate(self.merges):
            if left not in self.token_to_id or right not in self.token_to_id or left + right not in self.token_to_id:
                raise ValueError(f"merge #{rank} ({left!r}, {right!r}) uses or makes a token missing from the vocab")
            self.merge_ranks.setdefault((left, right), rank)
        self._start_id = self.token_to_id[START_TOKEN] if start_id is None else start_id
        self._end_id = self.token_to_id[END_TOKEN] if end_id is None else end_id
        self._pad_id = self.token_to_id[PAD_TOKEN] if pad_id is None else pad_id
        for name, i in [("start_id", self._start_id), ("end_id", self._end_id), ("pad_id", self._pad_id)]:
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"{name}={i} is outside the vocab of {len(self.vocab)} tokens")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.word_re = (regex if r"\p{" in pattern else re).compile(pattern)
        self.cache = {}  # word -> list of ids

    # ------------------------------------------------------------------ training (Sennrich Algorithm 1)
    @classmethod
    def train(cls, texts, vocab_size, progress=True, lowercase=False):
        """Learn merges from `texts` until the vocabulary (256 bytes + merges + 3 special tokens) has
        `vocab_size` tokens, or until no adjacent pair is left (then the vocabulary is smaller).
        Ties between equally frequent pairs go to the pair with the smaller (left id, right id).
        lowercase=True lower-cases the text before splitting, here and in every later encode (shapes captions
        are lower-case already; with it decode(encode(s)) == s.lower())."""
        if isinstance(texts, str):
            raise TypeError("BPETokenizer.train expects a list of texts, got one str; wrap it in a list")
        n_special = 3
        if vocab_size < 256 + n_special:
            raise ValueError(f"vocab_size={vocab_size} is too small: it needs 256 byte tokens + {n_special} "
                             f"special tokens; use vocab_size >= {256 + n_special}")
        if len(texts) == 0:
            raise ValueError("BPETokenizer.train got no texts; pass a non-empty list of captions")
        byte_encoder = bytes_to_unicode()
        word_re = re.compile(GPT2_SPLIT_PATTERN)

        # Word counts: BPE only ever looks inside words, so each unique word is processed once.
        word_counts = Counter()
        for text in texts:
            word_counts.update(word_re.findall(text.lower() if lowercase else text))
        words = [list(word.encode("utf-8")) for word in word_counts]  # symbol ids; ids 0..255 are the bytes
        counts = list(word_counts.values())

        vocab = [byte_encoder[b] for b in range(256)]  # id -> token string
        token_to_id = {token: i for i, token in enumerate(vocab)}
        merges = []  # (left, right) token strings, in rank order
        learned = set()  # the same pairs as ids

        # get_stats: pair -> count over all words, and pair -> indices of the words that hold it.
        pair_counts = Counter()
        pair_words = defaultdict(set)
        for w, (symbols, count) in enumerate(zip(words, counts)):
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
                pair_words[pair].add(w)
        # Max-heap of (-count, left, right). A pair's count changes only when a merge touches it, and then a
        # fresh entry is pushed; entries whose count no longer matches pair_counts are stale and skipped.
        heap = [(-count, left, right) for (left, right), count in pair_counts.items()]
        heapq.heapify(heap)

        target = vocab_size - n_special
        bar = tqdm(total=target - len(vocab), desc="BPE merges", disable=not progress)
        while len(vocab) < target:
            while heap and pair_counts.get((heap[0][1], heap[0][2]), 0) != -heap[0][0]:
                heapq.heappop(heap)
            if not heap:
                break  # every word is a single token: nothing left to merge
            _, left, right = heapq.heappop(heap)
            best = (left, right)
            token = vocab[left] + vocab[right]
            # Two different merges can spell the same string ('a'+'bc' and 'ab'+'c'): reuse its id.
            new_id = token_to_id.get(token)
            if new_id is None:
                new_id = len(vocab)
                vocab.append(token)
                token_to_id[token] = new_id
                bar.update(1)
            if best not in learned:  # a pair can come back only through a reused id; keep its first rank
                learned.add(best)
                merges.append((vocab[left], vocab[right]))

            # merge_vocab, restricted to the words holding the pair; update the pair counts by difference.
            delta = Counter()
            for w in pair_words.pop(best):
                old = words[w]
                new = merge_pair(old, best, new_id)
                if len(new) == len(old):
                    continue  # stale index entry: an earlier merge already removed the pair from this word
                for pair in zip(old, old[1:]):
                    delta[pair] -= counts[w]
                for pair in zip(new, new[1:]):
                    delta[pair] += counts[w]
                    pair_words[pair].add(w)
                words[w] = new
            for pair, change in delta.items():
                if change == 0:
                    continue
                pair_counts[pair] += change
                if pair_counts[pair] == 0:
                    del pair_counts[pair]
                else:
                    heapq.heappush(heap, (-pair_counts[pair], *pair))
        bar.close()

        vocab += [START_TOKEN, END_TOKEN, PAD_TOKEN]
        return cls(vocab, merges, pattern=GPT2_SPLIT_PATTERN, lowercase=lowercase, end_of_word="")

    # ------------------------------------------------------------------ encoding and decoding
    def bpe(self, symbols):
        """Apply the merges to one word given as a list of token strings: repeatedly merge the adjacent pair
        learned first (lowest rank) until no learned pair is left. Same result as replaying training."""
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            symbols = merge_pair(symbols, best, best[0] + best[1])
        return symbols

    def encode_word(self, word):
        """Ids of one pre-tokenised word (cached)."""
        ids = self.cache.get(word)
        if ids is None:
            symbols = [self.byte_encoder[b] for b in word.encode("utf-8")]
            if self.end_of_word:
                symbols[-1] += self.end_of_word
            ids = [self.token_to_id[token] for token in self.bpe(symbols)]
            if len(self.cache) >= WORD_CACHE_SIZE:
                self.cache.clear()
            self.cache[word] = ids
        return ids

    def encode(self, text):
        """Token ids of `text`, without special tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if self.clean == "clip":  # OpenAI's basic_clean + whitespace_clean, without ftfy (see the docstring)
            text = " ".join(unicodedata.normalize("NFC", html.unescape(html.unescape(text))).split())
        if self.lowercase:
            text = text.lower()
        ids = []
        for word in self.word_re.findall(text):
            ids.extend(self.encode_word(word))
        return ids

    def decode(self, ids, skip_special=True):
        """Text of a sequence of ids (list or 1-D tensor). With skip_special, <start>/<end>/<pad> are dropped,
        so a row of a padded batch decodes to its prompt. Bytes that do not form valid UTF-8 (a sequence cut
        inside a character) become U+FFFD."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (1-D), got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        special = {self._start_id, self._end_id, self._pad_id} if skip_special else set()
        tokens = []
        for i in ids:
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i} is outside the vocab of {len(self.vocab)} tokens")
            if i not in special:
                tokens.append(self.vocab[i])
        # Special tokens and the end-of-word marker are printable ASCII, which the byte map leaves unchanged.
        text = bytes(self.byte_decoder[c] for c in "".join(tokens)).decode("utf-8", errors="replace")
        if self.end_of_word:
            text = text.replace(self.end_of_word, " ")
        return text

    def __call__(self, texts, max_length, truncate=False):
        """Batch of prompts -> (ids LongTensor (B, max_length), mask BoolTensor (B, max_length)).

        Each row is <start> prompt tokens <end> followed by <pad>; mask is True on <start>, the prompt tokens and
        <end>. A prompt longer than max_length - 2 tokens is an error unless truncate=True, which keeps the
        first max_length - 1 tokens of <start> prompt (i.e. max_length - 2 prompt tokens) and ends with <end>,
        as CLIP's tokenize(truncate=True) does.
        """
        if isinstance(texts, str):
            raise TypeError("the tokenizer expects a list of prompts, got one str; call it as tokenizer([text], ...)")
        if max_length < 3:
            raise ValueError(f"max_length={max_length} leaves no room for a prompt token between <start> and "
                             f"<end>; use max_length >= 3")
        B = len(texts)
        ids = torch.full((B, max_length), self._pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros(B, max_length, dtype=torch.bool)  # (B, L)
        for b, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompt {b} is a {type(text).__name__}, not a str")
            if not text.strip():
                raise ValueError(f"empty prompt: texts[{b}] = {text!r} has no non-space character; "
                                 f"give every image a caption")
            row = [self._start_id] + self.encode(text) + [self._end_id]
            if len(row) > max_length:
                if not truncate:
                    raise ValueError(
                        f"prompt {text!r} is {len(row)} tokens with <start> and <end>, over the limit "
                        f"max_length={max_length}; shorten the prompt or pass truncate=True (keeps the first "
                        f"{max_length - 1} tokens and ends with <end>)")
                row = row[: max_length - 1] + [self._end_id]
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = True
        return ids, mask

    def over_length(self, texts, max_length):
        """How many of `texts` are longer than max_length tokens with <start> and <end> (those that
        truncate=True cuts to max_length), and the length of the longest of them (0 when none is)."""
        over = [n for n in (len(self.encode(t)) + 2 for t in texts) if n > max_length]
        return len(over), max(over, default=0)

    def truncation_report(self, texts, max_length):
        """One line for a training script to print when it tokenizes with truncate=True, '' when nothing is cut."""
        n, longest = self.over_length(texts, max_length)
        if not n:
            return ""
        return (f"{n} of {len(texts)} caption(s) are longer than max_length={max_length} tokens (the longest "
                f"{longest}, with <start> and <end>); they were cut to their first {max_length - 1} tokens + <end>")

    # ------------------------------------------------------------------ properties and state
    @property
    def vocab_size(self):
        return len(self.vocab)

    @property
    def start_id(self):
        return self._start_id

    @property
    def end_id(self):
        return self._end_id

    @property
    def pad_id(self):
        return self._pad_id

    def state_dict(self):
        """Plain python types only (str, int, bool, list), so a checkpoint holding it loads with
        torch.load(weights_only=True)."""
        return {
            "vocab": list(self.vocab),
            "merges": [[left, right] for left, right in self.merges],
            "pattern": self.pattern,
            "lowercase": self.lowercase,
            "end_of_word": self.end_of_word,
            "clean": self.clean,
            "start_id": self._start_id,
            "end_id": self._end_id,
            "pad_id": self._pad_id,
        }

    @classmethod
    def from_state_dict(cls, d):
        missing = [k for k in ("vocab", "merges", "pattern", "lowercase", "end_of_word",
                               "start_id", "end_id", "pad_id") if k not in d]
        if missing:
            raise ValueError(f"tokenizer state is missing {missing}; was it saved with BPETokenizer.state_dict()?")
        return cls(d["vocab"], d["merges"], pattern=d["pattern"], lowercase=d["lowercase"],
                   end_of_word=d["end_of_word"], start_id=d["start_id"], end_id=d["end_id"], pad_id=d["pad_id"],
                   clean=d.get("clean", ""))  # states saved before `clean` existed have none

    @classmethod
    def from_clip_vocab(cls, path):
        """CLIP's tokenizer from OpenAI's published merge list `bpe_simple_vocab_16e6.txt.gz` (gzip text: a
        version line, then one merge "left right" per line, in rank order)."""
        try:
            lines = gzip.open(path).read().decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read CLIP vocabulary {path} ({e}); pass bpe_simple_vocab_16e6.txt.gz, e.g. "
                             f"the one inside the open_clip package") from None
        merges = [tuple(line.split()) for line in lines[1: CLIP_NUM_MERGES + 1]]
        if len(merges) != CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} is not CLIP's merge list: expected {CLIP_NUM_MERGES} lines 'left right' "
                             f"after the first")
        byte_chars = list(bytes_to_unicode().values())  # OpenAI's order: the byte map's values, not sorted
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
        return cls(vocab, merges, pattern=CLIP_SPLIT_PATTERN, lowercase=True, end_of_word="</w>", pad_id=0,
                   clean="clip")

    @classmethod
    def from_clip_files(cls, vocab, merges, pad_token=END_TOKEN):
        """CLIP's tokenizer from Hugging Face's files: vocab {token: id} (vocab.json) and merges [(left, right)]
        in rank order (merges.txt). Hugging Face pads with pad_token, <|endoftext|> in Stable Diffusion's
        tokenizer/ (OpenAI's tokenize pads with id 0): padding is read by SD's text encoder, so the id matters."""
        tokens = sorted(vocab, key=vocab.get)
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError("the vocabulary's ids are not 0 .. N-1, each once; it is not a CLIP tokenizer's vocab.json")
        missing = [t for t in (START_TOKEN, END_TOKEN, pad_token) if t not in vocab]
        if missing or not any(t.endswith("</w>") for t in tokens[:512]):
            raise ValueError(f"the vocabulary is not CLIP's (no {missing or 'word-end </w>'} tokens); Stable Diffusion "
                             f"v1's tokenizer/ holds CLIP's vocab.json and merges.txt")
        return cls(tokens, merges, pattern=CLIP_SPLIT_PATTERN, lowercase=True, end_of_word="</w>",
                   pad_id=vocab[pad_token], clean="clip")

    def __repr__(self):
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"lowercase={self.lowercase}, end_of_word={self.end_of_word!r}, clean={self.clean!r})")
