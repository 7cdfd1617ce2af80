"""Masked language model: BERT's masking rule, the loss counts only the chosen positions, the encoder reads both
ways, the training script's smoke run and bad input, and a diffusion model conditioned on the frozen LM encoder
(plus the bad `text_encoder` values)."""
import contextlib
import io

import pytest
import torch
import torch.nn.functional as F

import sample.__main__ as sample_cli
from core.checkpoint import load_checkpoint
from data.shapes import sample_scene
from models.text_encoder import TextEncoderConfig
from models.text_lm import MaskedLanguageModel, load_text_lm, mask_tokens, masked_lm_loss
from tests.test_train_diffusion import TINY, cli_error
from train import diffusion, text_lm


def test_masking_follows_bert():
    B, L, V = 400, 20, 50
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V - 1, (B, L), generator=g)
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    ids[:, 0] = 0  # <start>
    ids[torch.arange(B), lengths - 1] = 1  # <end>
    ids[~mask] = 2  # <pad>
    corrupted, chosen = mask_tokens(ids, mask, {0, 1, 2}, V - 1, V, g)
    eligible = mask & (ids > 2)
    assert not (chosen & ~eligible).any()  # never <start>, <end> or padding
    assert torch.equal(corrupted[~chosen], ids[~chosen])  # only chosen tokens change
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.01
    n = chosen.sum()
    as_mask = (corrupted[chosen] == V - 1).sum() / n
    kept = (corrupted[chosen] == ids[chosen]).sum() / n  # kept, or replaced by a random equal token (1 in 46)
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1 - 0.1 / 46) < 0.02
    assert corrupted.max() < V and not torch.isin(corrupted[chosen], torch.tensor([0, 1, 2])).any()


def test_loss_counts_only_chosen_positions_and_weights_are_tied():
    torch.manual_seed(0)
    model = MaskedLanguageModel(TextEncoderConfig(vocab_size=40, max_length=8, width=16, layers=1, heads=2))
    ids = torch.randint(0, 39, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.bool)
    chosen = torch.zeros(3, 8, dtype=torch.bool)
    chosen[0, 2] = chosen[2, 5] = True
    logits = model(ids, mask)
    expected = (F.cross_entropy(logits[0, 2], ids[0, 2]) + F.cross_entropy(logits[2, 5], ids[2, 5])) / 2
    torch.testing.assert_close(masked_lm_loss(logits, ids, chosen), expected)
    other = logits.clone()
    other[~chosen] = torch.randn_like(other[~chosen])
    torch.testing.assert_close(masked_lm_loss(other, ids, chosen), expected)
    expected.backward()
    assert model.encoder.token_embedding.weight.grad[ids[0, 2]].abs().sum() > 0  # the tied output matrix
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 39
    assert not torch.allclose(model(changed, mask)[0, 0], logits[0, 0])  # bidirectional: a later token matters
    with pytest.raises(ValueError, match="causal=false"):
        MaskedLanguageModel(TextEncoderConfig(vocab_size=40, causal=True))


LM_TINY = ["text.width=32", "text.layers=1", "text.max_length=16", "tokenizer.vocab_size=300", "data.num_images=200",
           "train.steps=5", "train.batch_size=32", "train.log_every=1", "train.eval_captions=50", "train.device=cpu"]
PRINTED = {}


@pytest.fixture(scope="module")
def lm_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        text_lm.main(LM_TINY + [f"train.out_dir={out}"])
    PRINTED["lm"] = printed.getvalue()
    return out / "ckpt.pt"


def test_training_smoke_run(lm_ckpt, capsys):
    model, tokenizer, cfg = load_text_lm(lm_ckpt)
    assert cfg.vocab_size == tokenizer.vocab_size + 1 and model.mask_id == tokenizer.vocab_size
    assert load_checkpoint(lm_ckpt, "text_lm")["step"] == 5
    assert "masked-token accuracy" in PRINTED["lm"] and "heldout" in PRINTED["lm"]
    before = lm_ckpt.read_bytes()
    err = cli_error(text_lm.main, LM_TINY + [f"train.out_dir={lm_ckpt.parent}"], capsys)
    assert "exists; pass train.resume=auto" in err and lm_ckpt.read_bytes() == before
    err = cli_error(text_lm.main, LM_TINY + ["masking.mask_prob=1.5"], capsys)
    assert "masking.mask_prob" in err
    err = cli_error(text_lm.main, LM_TINY + ["text.causal=true", f"train.out_dir={lm_ckpt.parent / 'c'}"], capsys)
    assert "text.causal=false" in err


class PredictsOneToken(torch.nn.Module):
    """A stand-in model whose prediction is always the token `token`."""

    def __init__(self, cfg, token):
        super().__init__()
        self.cfg, self.token, self.mask_id = cfg, token, cfg.vocab_size - 1
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, mask):
        return F.one_hot(torch.full_like(ids, self.token), self.cfg.vocab_size).float()  # (B, L, V)


def test_masked_accuracy_splits_grammar_from_attribute_words(lm_ckpt):
    _, tokenizer, cfg = load_text_lm(lm_ckpt)
    captions = [sample_scene(3, i)[0] for i in range(300)]
    special = {tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id}
    ids, mask = tokenizer(captions, max_length=cfg.max_length, truncate=True)
    _, chosen = mask_tokens(ids, mask, special, cfg.vocab_size - 1, cfg.vocab_size, torch.Generator().manual_seed(4),
                            0.15, random_prob=0.0, keep_prob=0.0)  # the draw masked_accuracy makes with seed 4
    masked = ids[chosen].tolist()
    attribute = [i for i in masked if tokenizer.decode([i]).strip() in text_lm.ATTRIBUTE_WORDS]
    assert 0 < len(attribute) < len(masked)
    token = max(set(attribute), key=attribute.count)  # e.g. " square", a whole attribute word
    figures = text_lm.masked_accuracy(PredictsOneToken(cfg, token), tokenizer, captions, 0.15, seed=4)
    assert figures["grammar"] == 0.0
    assert figures["attribute words"] == pytest.approx(attribute.count(token) / len(attribute))
    assert figures["all"] == pytest.approx(masked.count(token) / len(masked))


def test_diffusion_conditioned_on_frozen_lm_and_bad_text_encoder_values(lm_ckpt, tmp_path, capsys):
    out = tmp_path / "diff"
    diffusion.main(TINY + ["train.steps=2", f"train.out_dir={out}", f"text_encoder=lm:{lm_ckpt}"])
    ckpt = load_checkpoint(out / "ckpt.pt", "diffusion")
    lm = load_checkpoint(lm_ckpt, "text_lm")["model"]
    frozen = {k[len("text_encoder.encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("text_encoder.")}
    assert frozen and all(torch.equal(v, lm["encoder." + k]) for k, v in frozen.items())
    assert ckpt["config"]["text"]["causal"] is False and ckpt["config"]["text_encoder"] == f"lm:{lm_ckpt}"
    sample_cli.main(["--ckpt", str(out / "ckpt.pt"), "--prompt", "a red circle", "--n", "1", "--steps", "2",
                     "--device", "cpu", "--out", str(tmp_path / "s.png")])
    capsys.readouterr()
    err = cli_error(diffusion.main, TINY + [f"train.out_dir={out}", "train.resume=auto"], capsys)  # joint now
    assert "cannot resume" in err and "was made with another config" in err
    run = TINY + [f"train.out_dir={tmp_path / 'x'}"]
    assert "text_encoder must be joint, lstm, clip:<ckpt> or lm:<ckpt>" in cli_error(
        diffusion.main, run + ["text_encoder=t5:foo"], capsys)
    assert "checkpoint not found" in cli_error(diffusion.main, run + [f"text_encoder=lm:{tmp_path}/no.pt"], capsys)
    assert "holds a 'text_lm' checkpoint but a 'clip' checkpoint" in cli_error(
        diffusion.main, run + [f"text_encoder=clip:{lm_ckpt}"], capsys)
    assert not (tmp_path / "x").exists()
