"""The creative preset's prompt model (models/prompt_lm.py, train/prompt_lm.py, python -m sample --prompt-lm):
causality, the loss over real tokens only, training lowers the loss and resumes exactly, seeded rewrites that keep
the prompt as a prefix, temperature -> 0 is the greedy continuation, the pipeline's token limit cuts the
continuation, the CLI prints and records the prompts it drew, and the bad input one-liners."""
import contextlib
import io
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import sample.__main__ as sample_cli
from core.checkpoint import load_checkpoint
from data.shapes import sample_scene
from models.prompt_lm import (PromptLM, PromptLMConfig, continue_tokens, load_prompt_lm, perplexity,
                              perplexity_floor, pipeline_fits, rewrite)
from models.pipeline import load_pipeline
from models.tokenizer import BPETokenizer
from tests.test_train_diffusion import TINY as DIFFUSION_TINY
from tests.test_train_diffusion import cli_error
from train import diffusion, prompt_lm as train_prompt_lm

TINY = ["model.width=32", "model.layers=1", "model.heads=2", "model.max_length=24", "tokenizer.vocab_size=300",
        "data.num_images=64", "train.batch_size=16", "train.warmup_steps=5", "train.log_every=1",
        "train.eval_captions=50", "train.floor_captions=500", "train.device=cpu"]
PRINTED = {}


def tiny_model(vocab=40, max_length=12):
    torch.manual_seed(0)
    return PromptLM(PromptLMConfig(max_length=max_length, vocab_size=vocab, width=32, layers=2, heads=4)).eval()


def losses(text):
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+) \| loss ([0-9.]+)", text)}


@pytest.fixture(scope="module")
def lm_ckpt(tmp_path_factory):
    """A tiny run of 80 steps: a handful of captions (64), its loss must fall."""
    out = tmp_path_factory.mktemp("prompt_lm") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_prompt_lm.main(TINY + ["train.steps=80", f"train.out_dir={out}"])
    PRINTED["run"] = printed.getvalue()
    return out / "ckpt.pt"


@pytest.fixture(scope="module")
def diffusion_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        diffusion.main(DIFFUSION_TINY + ["train.steps=1", f"train.out_dir={out}"])
    return out / "ckpt.pt"


def test_changing_a_token_leaves_earlier_logits_unchanged():
    model = tiny_model()
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 6] = (ids[:, 6] + 1) % 40
    a, b = model(ids), model(changed)  # (2, 12, V)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # positions 0..5 never read position 6
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    cache = [dict() for _ in model.blocks]  # the KV cache gives the same logits as recomputation
    stepwise = torch.cat([model(ids[:, i: i + 1], cache, i) for i in range(12)], dim=1)
    torch.testing.assert_close(stepwise, a, rtol=1e-5, atol=1e-5)


def test_loss_counts_only_real_tokens():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 40, (3, 12), generator=g)
    lengths = torch.tensor([12, 5, 8])
    mask = torch.arange(12)[None] < lengths[:, None]  # (3, 12)
    ids[~mask] = 2  # <pad>
    logits = model(ids[:, :-1])
    expected = torch.cat([F.cross_entropy(logits[b, : n - 1], ids[b, 1:n], reduction="none")
                          for b, n in enumerate(lengths.tolist())]).mean()  # the real targets 1 .. n - 1 of each row
    torch.testing.assert_close(model.loss(ids, mask), expected)
    other = ids.clone()
    other[~mask] = torch.randint(3, 40, (int((~mask).sum()),), generator=g)  # anything in the padding
    torch.testing.assert_close(model.loss(other, mask), expected)


class Oracle(torch.nn.Module):
    """A stand-in LM that knows the caption distribution: p(next token | prefix) from the counts of the captions
    that start with that prefix. Its perplexity on those same captions is the floor exactly."""

    def __init__(self, tokenizer, captions, max_length):
        super().__init__()
        self.cfg = PromptLMConfig(max_length=max_length, vocab_size=tokenizer.vocab_size)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.counts = {}
        for c in captions:
            row = [tokenizer.start_id] + tokenizer.encode(c) + [tokenizer.end_id]
            for i in range(1, len(row)):
                key = tuple(row[:i])
                self.counts.setdefault(key, torch.zeros(tokenizer.vocab_size))[row[i]] += 1

    def loss(self, ids, mask):
        nll = []
        for row, m in zip(ids.tolist(), mask.tolist()):
            n = sum(m)
            for i in range(1, n):
                c = self.counts[tuple(row[:i])]
                nll.append(-math.log(c[row[i]] / c.sum()))
        return torch.tensor(sum(nll) / len(nll))


def test_perplexity_floor_is_the_perplexity_of_the_true_distribution():
    distinct = list(dict.fromkeys(sample_scene(0, i)[0] for i in range(100)))[:40]
    captions = distinct * 3 + distinct[:10]  # a known distribution: 10 captions 4 times, 30 captions 3 times
    tokenizer = BPETokenizer.train(captions, 300, progress=False)
    floor = perplexity_floor(captions, tokenizer)
    assert perplexity(Oracle(tokenizer, captions, 32), tokenizer, captions, batch_size=50) == pytest.approx(floor)
    p = [4 / 130] * 10 + [3 / 130] * 30  # exp(H / E[targets]) by hand
    H = -sum(q * math.log(q) for q in p)
    targets = sum(q * (len(tokenizer.encode(c)) + 1) for q, c in zip(p, distinct))
    assert floor == pytest.approx(math.exp(H / targets))
    assert perplexity(tiny_model(tokenizer.vocab_size, 32), tokenizer, captions) > floor  # any other model: above


def test_training_lowers_the_loss_and_prints_perplexity_and_samples(lm_ckpt):
    log = losses(PRINTED["run"])
    assert sorted(log) == list(range(1, 81))
    assert sum(log[s] for s in range(76, 81)) / 5 < 0.6 * sum(log[s] for s in range(1, 6)) / 5
    assert re.search(r"perplexity per token on 50 fresh captions \(seed 1\): heldin [0-9.]+ \| heldout [0-9.]+",
                     PRINTED["run"])
    assert re.search(r"perplexity floor of the held-in captions \(their entropy per token, 500 draws\): [0-9.]+",
                     PRINTED["run"])
    for t in ("0.7", "1", "1.5"):
        assert f"temperature {t}: 'a red circle' -> 'a red circle" in PRINTED["run"]
    assert (lm_ckpt.parent / "samples.txt").read_text().count("temperature") == 9
    assert list((lm_ckpt.parent / "tensorboard").iterdir())
    assert load_checkpoint(lm_ckpt, "prompt_lm")["step"] == 80


def test_resume_continues_exactly(tmp_path, capsys):
    run = TINY + ["train.steps=6", "train.eval_captions=0"]
    train_prompt_lm.main(run + [f"train.out_dir={tmp_path / 'whole'}"])
    whole = losses(capsys.readouterr().out)
    train_prompt_lm.main(run + [f"train.out_dir={tmp_path / 'part'}", "train.stop_after=3"])
    first = losses(capsys.readouterr().out)
    train_prompt_lm.main(run + [f"train.out_dir={tmp_path / 'part'}", "train.resume=auto"])
    second = losses(capsys.readouterr().out)
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6] and {**first, **second} == whole
    a, b = (load_checkpoint(tmp_path / n / "ckpt.pt", "prompt_lm")["model"] for n in ("whole", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_training_input(lm_ckpt, tmp_path, capsys):
    before = lm_ckpt.read_bytes()
    assert "exists; pass train.resume=auto" in cli_error(train_prompt_lm.main, TINY + [
        f"train.out_dir={lm_ckpt.parent}"], capsys)
    assert lm_ckpt.read_bytes() == before
    assert "cannot resume" in cli_error(train_prompt_lm.main, TINY + [
        f"train.out_dir={lm_ckpt.parent}", "train.resume=auto", "model.width=64"], capsys)
    assert "train.eval_seed must differ" in cli_error(train_prompt_lm.main, TINY + [
        f"train.out_dir={tmp_path / 'x'}", "train.eval_seed=0"], capsys)
    assert "divisible by model.heads" in cli_error(train_prompt_lm.main, TINY + [
        f"train.out_dir={tmp_path / 'x'}", "model.heads=3"], capsys)
    assert not (tmp_path / "x").exists()


def test_rewrite_keeps_the_prompt_and_follows_the_seed(lm_ckpt):
    model, tokenizer = load_prompt_lm(lm_ckpt)
    prompts = ["a red circle", "a small blue square", "an image of"]

    def seeded(seed, **kw):
        return rewrite(model, tokenizer, prompts, generator=torch.Generator().manual_seed(seed), **kw)

    first = seeded(0)
    assert all(used.startswith(p) for used, p in zip(first, prompts))
    assert seeded(0) == first
    assert seeded(1) != first and seeded(2) != first
    short = rewrite(model, tokenizer, prompts[:1], generator=torch.Generator().manual_seed(0), max_new_tokens=2)
    new = continue_tokens(model, [tokenizer.start_id] + tokenizer.encode(prompts[0]), tokenizer.end_id,
                          [tokenizer.start_id, tokenizer.pad_id], generator=torch.Generator().manual_seed(0),
                          max_new_tokens=2)
    assert len(new) <= 2 and short == [prompts[0] + tokenizer.decode(new)]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        seeded(0, temperature=0.0)
    long = "a red circle " * 8  # more tokens than the model's 24 positions: no room, it comes back as given
    assert len(tokenizer.encode(long)) + 1 >= model.cfg.max_length
    assert rewrite(model, tokenizer, [long], generator=torch.Generator().manual_seed(0)) == [long]


def greedy(model, tokenizer, prompt):
    """The argmax continuation, by recomputing the whole sequence at every step (no cache, no sampling)."""
    ids = [tokenizer.start_id] + tokenizer.encode(prompt)
    new = []
    while len(ids) < model.cfg.max_length:
        logits = model(torch.tensor([ids]))[0, -1]
        logits[[tokenizer.start_id, tokenizer.pad_id]] = float("-inf")
        token = int(logits.argmax())
        if token == tokenizer.end_id:
            break
        ids.append(token)
        new.append(token)
    return prompt + tokenizer.decode(new)


def test_temperature_to_zero_is_the_greedy_continuation(lm_ckpt):
    model, tokenizer = load_prompt_lm(lm_ckpt)
    prompts = ["a red circle", "two", "a large green"]
    expected = [greedy(model, tokenizer, p) for p in prompts]
    for seed in (0, 1):
        assert rewrite(model, tokenizer, prompts, temperature=1e-6, generator=torch.Generator().manual_seed(seed),
                       max_new_tokens=100) == expected


def test_the_continuation_is_cut_to_fit():
    captions = [sample_scene(0, i)[0] for i in range(200)]
    tokenizer = BPETokenizer.train(captions, 300, progress=False)
    model = tiny_model(vocab=tokenizer.vocab_size, max_length=32)  # untrained: long, random continuations
    prompts = ["a red circle", "a small blue square on a"]
    limit = max(len(tokenizer.encode(p)) for p in prompts) + 2 + 3  # the pipeline's max_length: room for 3 more

    def fits(text):
        return len(tokenizer.encode(text)) + 2 <= limit

    banned = [tokenizer.start_id, tokenizer.pad_id]
    for p in prompts:
        new = continue_tokens(model, [tokenizer.start_id] + tokenizer.encode(p), tokenizer.end_id, banned,
                              generator=torch.Generator().manual_seed(0), max_new_tokens=20)
        assert not fits(p + tokenizer.decode(new))  # the case the cut exists for
        longest = max(k for k in range(len(new) + 1) if fits(p + tokenizer.decode(new[:k])))
        used = rewrite(model, tokenizer, [p], generator=torch.Generator().manual_seed(0), max_new_tokens=20, fits=fits)
        assert used == [p + tokenizer.decode(new[:longest])] and longest >= 1 and fits(used[0])


def sample_args(ckpt, out, *flags):
    return ["--ckpt", str(ckpt), "--n", "2", "--steps", "2", "--device", "cpu", "--out", str(out), *flags]


def test_cli_prints_and_records_the_prompts_used(lm_ckpt, diffusion_ckpt, tmp_path, capsys):
    prompts = ["a red circle", "a blue square on a green"]
    flags = ["--preset", "creative", "--prompt-lm", str(lm_ckpt), "--prompt-temperature", "1.5", "--seed", "3"]
    sample_cli.main(sample_args(diffusion_ckpt, tmp_path / "s.png", "--prompt", prompts[0], "--prompt", prompts[1],
                                *flags))
    printed = capsys.readouterr().out
    used = re.findall(r"prompt '.*?' -> used '(.*?)' \(prompt LM, temperature 1.5\)", printed)
    assert len(used) == 2 and all(u.startswith(p) for u, p in zip(used, prompts))
    model, tokenizer = load_prompt_lm(lm_ckpt)
    pipe_tokenizer = BPETokenizer.from_state_dict(load_checkpoint(diffusion_ckpt, "diffusion")["tokenizer"])
    assert all(len(pipe_tokenizer.encode(u)) + 2 <= 16 for u in used)  # within the pipeline's 16 tokens
    expected = rewrite(model, tokenizer, prompts, 1.5, generator=torch.Generator().manual_seed(3),
                       fits=pipeline_fits(load_pipeline(diffusion_ckpt)))
    assert used == expected  # --seed seeds the prompt LM's draws, --prompt-temperature is its temperature
    meta = [json.loads(line) for line in (tmp_path / "s" / "metadata.jsonl").read_text().splitlines()]
    assert [m["text"] for m in meta] == [used[0], used[0], used[1], used[1]]
    sample_cli.main(sample_args(diffusion_ckpt, tmp_path / "t.png", "--prompt", prompts[0], "--prompt", prompts[1],
                                *flags))
    assert re.findall(r"-> used '(.*?)' ", capsys.readouterr().out) == used  # the same seed, the same prompts
    long = "a small red circle and a large blue square on a green background"
    assert len(pipe_tokenizer.encode(long)) + 2 > 16  # over the limit: --truncate cuts it, the LM adds nothing
    sample_cli.main(sample_args(diffusion_ckpt, tmp_path / "u.png", "--prompt", long, "--truncate", *flags))
    assert f"-> used {long!r} " in capsys.readouterr().out


def test_cli_bad_prompt_lm_input(lm_ckpt, diffusion_ckpt, tmp_path, capsys):
    out = tmp_path / "bad.png"
    run = sample_args(diffusion_ckpt, out, "--prompt", "a red circle")
    cases = [
        (["--prompt-temperature", "1.0"], "--prompt-temperature is the prompt LM's; pass --prompt-lm"),
        (["--preset", "creative", "--prompt-lm", str(lm_ckpt), "--prompt-temperature", "0"],
         "--prompt-temperature must be > 0"),
        (["--preset", "creative", "--prompt-lm", str(tmp_path / "none.pt")], "checkpoint not found"),
        (["--preset", "creative", "--prompt-lm", str(diffusion_ckpt)],
         "holds a 'diffusion' checkpoint but a 'prompt_lm' checkpoint"),
        (["--prompt-lm", str(lm_ckpt)], "add --preset creative"),
        (["--preset", "quality", "--prompt-lm", str(lm_ckpt)], "add --preset creative"),
        (["--preset", "creative", "--prompt-lm", str(lm_ckpt), "--variations", "x.png"], "drop it with --variations"),
    ]
    for flags, message in cases:
        assert message in cli_error(sample_cli.main, run + flags, capsys)
    assert not out.exists() and not out.with_suffix("").exists()
