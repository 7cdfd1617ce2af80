"""CLIP: equal to open_clip's ViT-B-32-quickgelu with copied random weights, the contrastive loss's identities and
open_clip's ClipLoss, a causal text tower, the training script's smoke run and bad input, and conditioning a
diffusion model on the frozen CLIP text tower (cached outputs, self-contained checkpoint)."""
import contextlib
import io
import math

import pytest
import torch

import sample.__main__ as sample_cli
from core.checkpoint import load_checkpoint
from models.clip import CLIP, CLIPConfig, VisionConfig, contrastive_loss, load_clip
from models.text2image import load_text2image
from models.text_encoder import TextEncoderConfig
from tests.reference_imports import import_open_clip
from tests.test_train_diffusion import TINY, cli_error
from train import clip as train_clip
from train import diffusion


def tiny_cfg(kind="conv", vocab_size=300):
    text = TextEncoderConfig(vocab_size=vocab_size, max_length=16, width=32, layers=2, heads=4, causal=True)
    vision = VisionConfig(kind=kind, image_size=16, patch_size=4, width=16, layers=2, heads=2)
    return CLIPConfig(embed_dim=24, text=text, vision=vision)


def test_equals_open_clip_vit_b_32_quickgelu_with_copied_random_weights():
    open_clip = import_open_clip()
    torch.manual_seed(0)
    theirs = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    with torch.no_grad():  # move every LayerNorm and bias off its initial value, so a swapped one shows
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = CLIPConfig(embed_dim=512,
                     text=TextEncoderConfig(vocab_size=49408, max_length=77, width=512, layers=12, heads=8, causal=True),
                     vision=VisionConfig(kind="vit", image_size=224, patch_size=32, width=768, layers=12, heads=12))
    ours = CLIP(cfg).eval()
    state = theirs.state_dict()
    assert set(ours.state_dict()) == set(state)  # OpenAI's names, nothing more, nothing less
    ours.load_state_dict(state)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ids = open_clip.get_tokenizer("ViT-B-32-quickgelu")(["a red circle", "Two YELLOW stars, left of a cat!", ""])
    mask = torch.arange(77)[None, :] <= ids.argmax(-1)[:, None]  # <start> ... <end>, the end token has the top id
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_text(ids, mask), theirs.encode_text(ids), atol=1e-5, rtol=1e-5)
        assert torch.allclose(ours.logit_scale, theirs.logit_scale)


def test_contrastive_loss_identities_and_open_clip_clip_loss():
    B, E = 6, 8
    same = torch.ones(B, E)
    loss, logits = contrastive_loss(same, same, torch.tensor(3.0))
    torch.testing.assert_close(loss, torch.tensor(math.log(B)))  # all logits equal: cross-entropy = log B
    eye = torch.eye(B, E)
    loss, _ = contrastive_loss(eye, 5 * eye, torch.tensor(math.log(100.0)))  # scale-free: only directions count
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + (B - 1) * math.exp(-100.0))))
    open_clip = import_open_clip()
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(B, E, generator=g), torch.randn(B, E, generator=g)
    scale = torch.tensor(2.0)
    theirs = open_clip.ClipLoss()(torch.nn.functional.normalize(image, dim=-1),
                                  torch.nn.functional.normalize(text, dim=-1), scale.exp())
    torch.testing.assert_close(contrastive_loss(image, text, scale)[0], theirs)


def test_text_tower_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    model = CLIP(tiny_cfg()).eval()
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.arange(10)[None, :] < torch.tensor([[10], [6]])
    tokens, pooled = model.text_features(ids, mask)
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 300
    changed[1, 7:] = 0  # padding of row 1
    tokens2, pooled2 = model.text_features(changed, mask)
    assert torch.equal(tokens2[0, :5], tokens[0, :5]) and not torch.allclose(tokens2[0, 5:], tokens[0, 5:])
    torch.testing.assert_close(tokens2[1, :6], tokens[1, :6], atol=1e-6, rtol=0)
    assert torch.equal(pooled[1], tokens[1, 5])  # pooled at <end> = the last real token
    with pytest.raises(ValueError, match="causal"):
        CLIP(CLIPConfig(text=TextEncoderConfig(vocab_size=10, causal=False)))


@pytest.mark.parametrize("kind", ["conv", "vit"])
def test_image_towers_and_text_only_subset(kind):
    full = CLIP(tiny_cfg(kind))
    assert full.encode_image(torch.randn(3, 3, 16, 16)).shape == (3, 24)
    text_only = CLIP(tiny_cfg(kind), text_only=True)
    expected = {k for k in full.state_dict() if not k.startswith("visual.") and k not in ("text_projection",
                                                                                           "logit_scale")}
    assert set(text_only.state_dict()) == expected
    full.logit_scale.data.fill_(10.0)
    full.clamp_logit_scale()
    assert full.logit_scale.item() == pytest.approx(math.log(100))


CLIP_TINY = ["model.embed_dim=16", "model.text.width=32", "model.text.layers=1", "model.text.max_length=16",
             "model.text.causal=true", "model.vision.kind=conv", "model.vision.image_size=16", "model.vision.width=8",
             "model.vision.layers=2", "tokenizer.vocab_size=300", "data.resolution=16", "data.num_images=64",
             "train.steps=3", "train.batch_size=16", "train.log_every=1", "train.eval_images=20", "train.device=cpu"]


PRINTED = {}  # what the module's training run printed


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_clip.main(CLIP_TINY + [f"train.out_dir={out}"])
    PRINTED["clip"] = printed.getvalue()
    return out / "ckpt.pt"


def test_training_smoke_run_and_evaluation(clip_ckpt):
    ckpt = load_checkpoint(clip_ckpt, "clip")
    assert ckpt["step"] == 3 and ckpt["config"]["model"]["vision"]["kind"] == "conv"
    model, tokenizer, cfg = load_clip(clip_ckpt)
    assert cfg.text.vocab_size == tokenizer.vocab_size and not model.training
    out = PRINTED["clip"]
    for line in ("zero-shot heldin", "zero-shot heldout", "retrieval heldin", "retrieval heldout"):
        assert line in out


def test_bad_training_input(clip_ckpt, capsys):
    err = cli_error(train_clip.main, CLIP_TINY + ["model.vision.widht=8"], capsys)
    assert "unknown config key 'model.vision.widht'; did you mean 'model.vision.width'?" in err
    err = cli_error(train_clip.main, CLIP_TINY + ["data.resolution=32"], capsys)
    assert "model.vision.image_size (16) must equal data.resolution (32)" in err
    err = cli_error(train_clip.main, CLIP_TINY + ["data.seed=2"], capsys)  # eval_seed 1: retrieval renders seed 2
    assert "both must differ from data.seed (2)" in err
    before = clip_ckpt.read_bytes()
    err = cli_error(train_clip.main, CLIP_TINY + [f"train.out_dir={clip_ckpt.parent}"], capsys)
    assert "exists; pass train.resume=auto" in err and clip_ckpt.read_bytes() == before


def test_diffusion_conditioned_on_frozen_clip(clip_ckpt, tmp_path, capsys):
    out = tmp_path / "diff"
    diffusion.main(TINY + ["train.steps=2", f"train.out_dir={out}", f"text_encoder=clip:{clip_ckpt}"])
    assert "cached the frozen text encoder's outputs" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "ckpt.pt", "diffusion")
    clip_weights = load_checkpoint(clip_ckpt, "clip")["model"]
    frozen = {k[len("text_encoder.encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("text_encoder.")}
    assert frozen and all(torch.equal(v, clip_weights[k]) for k, v in frozen.items())  # stored and unchanged
    ema = {k[len("text_encoder.encoder."):]: v for k, v in ckpt["ema"]["weights"].items()
           if k.startswith("text_encoder.")}
    assert ema.keys() == frozen.keys() and all(torch.equal(v, clip_weights[k]) for k, v in ema.items())  # EMA too
    assert ckpt["tokenizer"] == load_checkpoint(clip_ckpt, "clip")["tokenizer"]
    # the cache gives what the encoder computes
    pipe = load_text2image(ckpt, "cpu")
    model, tokenizer = pipe.model, pipe.tokenizer
    ids, mask = tokenizer(["a red circle", "a photo of a blue square"], max_length=model.text_encoder.cfg.max_length)
    fresh = model.text_encoder(ids, mask)
    assert model.text_encoder.cache_outputs(ids, mask) == 2
    cached = model.text_encoder(ids, mask)
    for a, b in zip(cached, fresh):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # self-contained: sampling works with the CLIP checkpoint gone
    clip_ckpt.rename(tmp_path / "moved.pt")
    try:
        sample_cli.main(["--ckpt", str(out / "ckpt.pt"), "--prompt", "a red circle", "--n", "1", "--steps", "2",
                         "--device", "cpu", "--out", str(tmp_path / "s.png")])
    finally:
        (tmp_path / "moved.pt").rename(clip_ckpt)
    assert (tmp_path / "s" / "0000.png").is_file()
    capsys.readouterr()
    err = cli_error(diffusion.main, TINY + [f"train.out_dir={tmp_path / 'x'}", f"text_encoder=clip:{clip_ckpt}",
                                            "unet.context_dim=64"], capsys)
    assert "must equal the width of the frozen encoder" in err and "set unet.context_dim=32" in err
