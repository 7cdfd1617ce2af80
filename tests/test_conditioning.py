"""models/conditioning.py: one object carries every conditioning to the denoiser; classifier-free guidance puts the
conditional rows first, drops only what guidance contrasts (text, pooled vector, image embedding), never the
super-resolution input; the U-Net's low-resolution inputs are reachable from training and from guided sampling."""
import pytest
import torch

from models.conditioning import Conditioning, guided_prediction
from models.samplers import guidance
from models.text2image import TextConditionedUNet
from models.text_encoder import TextEncoderConfig
from models.unet import UNetConfig


def two_faced_denoise(x_t, t, cond):
    """A denoiser whose conditional output is +1 and unconditional output -1 everywhere (cond.drop selects)."""
    out = torch.ones_like(x_t)
    if cond.drop is not None:
        out[cond.drop] = -1.0
    return out


def test_guided_prediction_puts_the_conditional_half_first():
    """CFG Eq. 6: uncond + s (cond - uncond) = -1 + 2 s here; swapping the halves would give 1 - 2 s."""
    B = 3
    x_t, t = torch.zeros(B, 2, 4, 4), torch.zeros(B, dtype=torch.long)
    cond = Conditioning(tokens=torch.randn(B, 5, 8), mask=torch.ones(B, 5, dtype=torch.bool))
    for scale in (0.0, 3.0, 7.5):
        out = guided_prediction(two_faced_denoise, x_t, t, cond, scale)
        assert torch.equal(out, guidance(torch.ones_like(x_t), -torch.ones_like(x_t), scale))
        assert torch.equal(out, torch.full_like(x_t, -1 + 2 * scale))


def test_guidance_drops_the_text_but_keeps_the_low_resolution_input():
    B = 2
    low_res, aug = torch.randn(B, 3, 4, 4), torch.tensor([0, 200])
    cond = Conditioning(tokens=torch.randn(B, 5, 8), mask=torch.ones(B, 5, dtype=torch.bool),
                        pooled=torch.randn(B, 8), low_res=low_res, aug_level=aug)
    seen = []

    def denoise(x_t, t, c):
        seen.append(c)
        return torch.zeros_like(x_t)
    guided_prediction(denoise, torch.zeros(B, 3, 8, 8), torch.zeros(B, dtype=torch.long), cond, 4.0)
    (both,) = seen
    assert torch.equal(both.drop, torch.tensor([False, False, True, True]))  # conditional rows, then unconditional
    assert torch.equal(both.low_res, torch.cat([low_res, low_res])) and torch.equal(both.aug_level, torch.cat([aug, aug]))
    assert torch.equal(both.tokens[:B], both.tokens[B:])  # the U-Net swaps the dropped rows' text for its null
    seen.clear()
    guided_prediction(denoise, torch.zeros(B, 3, 8, 8), torch.zeros(B, dtype=torch.long), cond, 1.0)
    assert seen[0] is cond  # scale 1: the conditional model alone, one pass


def test_cat_and_unconditional():
    a = Conditioning(tokens=torch.zeros(2, 3, 4), drop=torch.tensor([True, False]))
    b = Conditioning(tokens=torch.ones(1, 3, 4))  # drop None: no sample dropped
    both = a.cat(b)
    assert both.tokens.shape == (3, 3, 4) and torch.equal(both.drop, torch.tensor([True, False, False]))
    assert both.pooled is None and both.batch_size() == 3
    assert torch.equal(b.unconditional().drop, torch.tensor([True]))
    with pytest.raises(ValueError, match="'pooled' is set in one and not in the other"):
        a.cat(Conditioning(tokens=torch.ones(1, 3, 4), pooled=torch.ones(1, 4)))
    with pytest.raises(ValueError, match="nothing to guide by"):
        Conditioning().unconditional()


def test_a_super_resolution_unet_trains_and_samples_through_the_text_conditioned_denoiser():
    """low_res and aug_level reach the U-Net from training (forward with a Conditioning) and from guided sampling
    (denoise with the encoded text), and both change its output."""
    torch.manual_seed(0)
    text = TextEncoderConfig(vocab_size=50, max_length=8, width=16, layers=1, heads=2)
    unet = UNetConfig(image_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                      num_heads=2, context_dim=16, norm_groups=8, low_res_channels=3, pooled_dim=16)
    model = TextConditionedUNet(text, unet)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.normal_(0, 0.05)  # no zero-init silence
    ids, mask = torch.randint(0, 50, (2, 8)), torch.ones(2, 8, dtype=torch.bool)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    low, aug = torch.randn(2, 3, 8, 8), torch.tensor([0, 100])
    out = model(x, t, ids, mask, Conditioning(low_res=low, aug_level=aug))
    assert not torch.allclose(out, model(x, t, ids, mask, Conditioning(low_res=low + 1, aug_level=aug)), atol=1e-4)
    assert not torch.allclose(out, model(x, t, ids, mask, Conditioning(low_res=low, aug_level=aug + 300)), atol=1e-4)
    out.square().mean().backward()
    assert model.unet.aug_embed[0].weight.grad.abs().sum() > 0  # the augmentation level's embedding trains
    cond = model.encode_text(ids, mask, Conditioning(low_res=low, aug_level=aug))
    with torch.no_grad():
        guided = guided_prediction(model.denoise, x, t, cond, 3.0)
        conditional = model.denoise(x, t, cond)
        unconditional = model.denoise(x, t, cond.unconditional())
    torch.testing.assert_close(guided, guidance(conditional, unconditional, 3.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="super-resolution U-Net"):
        model(x, t, ids, mask)
