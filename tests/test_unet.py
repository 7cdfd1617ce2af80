"""Tests for models/unet.py: equality with diffusers' UNet2DConditionModel on random weights, conditioning
properties (prompt, padding mask, classifier-free-guidance null token), zero-init gradient flow, attention maps,
Imagen options (pooled vector, super-resolution input, no self-attention at high resolution), patching (space-to-depth
in, depth-to-space out), bad config, bf16."""
import re

import pytest
import torch
import torch.nn.functional as F

from models.attention import Attention, TransformerBlock
from models.conditioning import Conditioning
from models.unet import UNet, UNetConfig, timestep_embedding

# Tiny: 16x16, levels of width 16/32/32, attention at 8 and 4; norm_groups 8 so every width divides.
TINY = dict(image_size=16, in_channels=3, out_channels=3, channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(8, 4), num_heads=2, context_dim=12, norm_groups=8)


def tiny(**overrides):
    return UNetConfig(**{**TINY, **overrides})


def randomize(model, std=0.1):
    """Overwrite every parameter (zero-inits included) so that no branch of the network is silent."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def inputs(cfg, B=3, L=5, H=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = H or cfg.image_size
    x = torch.randn(B, cfg.in_channels, H, H, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    context = torch.randn(B, L, cfg.context_dim, generator=g)
    return x, t, context


# ---------------------------------------------------------------- reference equality with diffusers

def diffusers_name(name):
    """Our parameter name -> the corresponding UNet2DConditionModel parameter name."""
    name = name.replace("time_embed.0.", "time_embedding.linear_1.")
    name = name.replace("time_embed.2.", "time_embedding.linear_2.")
    name = re.sub(r"^(down|up)_blocks\.(\d+)\.(\d+)\.res\.", r"\1_blocks.\2.resnets.\3.", name)
    name = re.sub(r"^(down|up)_blocks\.(\d+)\.(\d+)\.attn\.", r"\1_blocks.\2.attentions.\3.", name)
    name = re.sub(r"^downsamplers\.(\d+)\.", r"down_blocks.\1.downsamplers.0.", name)
    name = re.sub(r"^upsamplers\.(\d+)\.", r"up_blocks.\1.upsamplers.0.", name)
    name = name.replace("mid_res1.", "mid_block.resnets.0.").replace("mid_res2.", "mid_block.resnets.1.")
    name = name.replace("mid_attn.", "mid_block.attentions.0.").replace("norm_out.", "conv_norm_out.")
    name = name.replace(".emb_proj.", ".time_emb_proj.").replace(".skip.", ".conv_shortcut.")
    return name.replace(".blocks.", ".transformer_blocks.").replace(".to_out.", ".to_out.0.")


def diffusers_twin(cfg):
    from diffusers import UNet2DConditionModel

    levels = len(cfg.channel_mult)
    has_attn = [cfg.image_size // 2**i in cfg.attention_resolutions for i in range(levels)]
    return UNet2DConditionModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult), layers_per_block=cfg.num_res_blocks,
        attention_head_dim=cfg.num_heads,  # diffusers' historical name for the number of heads
        cross_attention_dim=cfg.context_dim, transformer_layers_per_block=cfg.transformer_depth,
        norm_num_groups=cfg.norm_groups, use_linear_projection=True,
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
    )


@pytest.mark.parametrize("use_scale_shift_norm", [True, False])
def test_equals_diffusers_unet2dconditionmodel(use_scale_shift_norm):
    cfg = tiny(use_scale_shift_norm=use_scale_shift_norm, transformer_depth=2, attention_resolutions=(8,))
    ours = randomize(UNet(cfg)).eval()
    theirs = diffusers_twin(cfg).eval()
    state = {diffusers_name(k): v for k, v in ours.state_dict().items() if k != "null_context"}
    assert set(state) == set(theirs.state_dict()), "parameter sets differ"
    theirs.load_state_dict(state)  # strict: every name and shape must match
    x, t, context = inputs(cfg)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True, False, True, False, True]])
    with torch.no_grad():
        ours_out = ours(x, t, Conditioning(tokens=context, mask=mask))
        theirs_out = theirs(x, t, context, encoder_attention_mask=mask).sample
    assert ours_out.abs().max() > 0.1  # the randomised network is not silent
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-4, atol=1e-5)


def test_timestep_embedding_equals_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    ours = timestep_embedding(t, 32)
    theirs = get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(ours[0], torch.cat([torch.ones(16), torch.zeros(16)]))  # t = 0: cos 0 = 1, sin 0 = 0


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("overrides, H", [
    (dict(), 16),
    (dict(channel_mult=(1,), attention_resolutions=()), 16),  # a single level: no down/up sampling
    (dict(channel_mult=(1, 1, 2, 2), attention_resolutions=(16,), image_size=16), 16),  # attention at full size
    (dict(in_channels=4, out_channels=8), 16),  # latents in, eps and variance out
    (dict(pooled_dim=7), 16),
    (dict(low_res_channels=3, self_attention_max_resolution=4), 16),
    (dict(), 24),  # fully convolutional: another size divisible by 4
    (dict(patch_size=2, low_res_channels=3, pooled_dim=7), 16),  # patches of 2x2 pixels: levels 8, 4, 2
])
def test_output_shape_equals_input_shape(overrides, H):
    cfg = tiny(**overrides)
    model = UNet(cfg)
    x, t, context = inputs(cfg, H=H)
    kwargs = {}
    if cfg.pooled_dim:
        kwargs["pooled"] = torch.randn(3, cfg.pooled_dim)
    if cfg.low_res_channels:
        kwargs["low_res"] = torch.randn(3, cfg.low_res_channels, H // 4, H // 4)
        kwargs["aug_level"] = torch.tensor([0, 100, 250])
    out = model(x, t, Conditioning(tokens=context, **kwargs))
    assert out.shape == (3, cfg.out_channels, H, H)
    assert out.is_contiguous()


def test_scalar_timestep_is_broadcast():
    cfg = tiny()
    model = randomize(UNet(cfg))
    x, _, context = inputs(cfg)
    text = Conditioning(tokens=context)
    torch.testing.assert_close(model(x, 7, text), model(x, torch.full((3,), 7), text))


# ---------------------------------------------------------------- conditioning

def test_prompt_changes_output_and_drop_removes_it():
    cfg = tiny()
    model = randomize(UNet(cfg))
    x, t, context = inputs(cfg)
    other = torch.randn_like(context)
    assert not torch.allclose(model(x, t, Conditioning(tokens=context)), model(x, t, Conditioning(tokens=other)),
                              atol=1e-4)
    drop = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(model(x, t, Conditioning(tokens=context, drop=drop)),
                               model(x, t, Conditioning(tokens=other, drop=drop)))


def test_drop_is_per_sample():
    cfg = tiny()
    model = randomize(UNet(cfg))
    x, t, context = inputs(cfg)
    drop = torch.tensor([False, True, False])
    mixed = model(x, t, Conditioning(tokens=context, drop=drop))
    cond = model(x, t, Conditioning(tokens=context))
    uncond = model(x, t, Conditioning(tokens=context, drop=torch.ones(3, dtype=torch.bool)))
    torch.testing.assert_close(mixed[~drop], cond[~drop])
    torch.testing.assert_close(mixed[drop], uncond[drop])
    assert not torch.allclose(cond[1], uncond[1], atol=1e-4)  # the null token really is a different condition
    # context=None is the null context for everyone
    torch.testing.assert_close(model(x, t, Conditioning()), uncond)


def test_masked_out_tokens_change_nothing():
    cfg = tiny()
    model = randomize(UNet(cfg))
    x, t, context = inputs(cfg)
    mask = torch.tensor([[True, True, True, False, False]] * 3)
    edited = context.clone()
    edited[:, 3:] = torch.randn(3, 2, cfg.context_dim) * 10
    torch.testing.assert_close(model(x, t, Conditioning(tokens=context, mask=mask)),
                               model(x, t, Conditioning(tokens=edited, mask=mask)))
    edited[:, 2] += 1.0  # a real token does matter
    assert not torch.allclose(model(x, t, Conditioning(tokens=context, mask=mask)),
                              model(x, t, Conditioning(tokens=edited, mask=mask)), atol=1e-4)
    # dropped samples attend to the null token at every position, padding included, so even a sample with no
    # real token at all (an empty prompt, mask row all False) gets the unconditional output instead of NaN
    empty = mask.clone()
    empty[1] = False
    drop = torch.tensor([True, True, False])
    out = model(x, t, Conditioning(tokens=context, mask=empty, drop=drop))
    torch.testing.assert_close(out[:2], model(x, t, Conditioning())[:2])
    torch.testing.assert_close(out[2], model(x, t, Conditioning(tokens=context, mask=mask))[2])


def test_pooled_vector_and_its_null():
    cfg = tiny(pooled_dim=6)
    model = randomize(UNet(cfg))
    x, t, context = inputs(cfg)
    pooled = torch.randn(3, 6)
    assert not torch.allclose(model(x, t, Conditioning(tokens=context, pooled=pooled)),
                              model(x, t, Conditioning(tokens=context, pooled=pooled + 1)), atol=1e-4)
    drop = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(model(x, t, Conditioning(tokens=context, pooled=pooled, drop=drop)),
                               model(x, t, Conditioning(tokens=context + 1, pooled=pooled + 1, drop=drop)))


def test_super_resolution_inputs():
    cfg = tiny(low_res_channels=3)
    model = randomize(UNet(cfg))
    x, t, context = inputs(cfg)
    low = torch.randn(3, 3, 8, 8)
    aug = torch.tensor([0, 0, 0])
    out = model(x, t, Conditioning(tokens=context, low_res=low, aug_level=aug))
    assert not torch.allclose(out, model(x, t, Conditioning(tokens=context, low_res=low + 1, aug_level=aug)), atol=1e-4)
    assert not torch.allclose(out, model(x, t, Conditioning(tokens=context, low_res=low, aug_level=aug + 200)),
                              atol=1e-4)
    # the low-res image is upsampled bilinearly (align_corners=False) to x's size
    up = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, model(x, t, Conditioning(tokens=context, low_res=up, aug_level=aug)))
    with pytest.raises(ValueError, match="low_res"):
        model(x, t, Conditioning(tokens=context))


def test_self_attention_max_resolution_removes_high_res_self_attention():
    def count(model):
        blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
        attentions = [m for m in model.modules() if isinstance(m, Attention)]
        return len(blocks), sum(b.self_attention for b in blocks), len(attentions)

    full = UNet(tiny())  # attention at 8 (1 down + 2 up blocks) and 4 (1 + 2) + middle = 7 transformer blocks
    assert count(full) == (7, 7, 14)
    cut = UNet(tiny(self_attention_max_resolution=4))  # the three blocks at 8x8 keep only cross-attention
    assert count(cut) == (7, 4, 11)
    for name, m in cut.named_modules():
        if isinstance(m, TransformerBlock):
            size = 8 if name.startswith(("down_blocks.1", "up_blocks.1")) else 4
            assert m.self_attention == (size <= 4), name
            assert hasattr(m, "attn2")


def test_patch_size_folds_pixels_into_channels_around_an_unpatched_unet():
    """patch_size p is pixel_unshuffle before conv_in and pixel_shuffle after conv_out, nothing else (simple
    diffusion Sec. 3.4): the patched U-Net on 16x16 pixels equals, with the same weights, a p = 1 U-Net with
    in/out channels x p^2 on the 8x8 grid of patches; attention_resolutions are that grid's sizes."""
    cfg = tiny(patch_size=2, attention_resolutions=(4, 2))
    patched = randomize(UNet(cfg))
    inner = UNet(tiny(image_size=8, in_channels=12, out_channels=12, attention_resolutions=(4, 2)))
    inner.load_state_dict(patched.state_dict())  # same names and shapes: conv_in takes 12, conv_out gives 12
    x, t, context = inputs(cfg)
    out = patched(x, t, Conditioning(tokens=context))
    assert out.shape == x.shape
    torch.testing.assert_close(out, F.pixel_shuffle(inner(F.pixel_unshuffle(x, 2), t, Conditioning(tokens=context)), 2))
    blocks = [n for n, m in patched.named_modules() if isinstance(m, TransformerBlock)]
    assert len(blocks) == 7  # attention at 4 (1 down + 2 up), 2 (1 + 2) and the middle, as tiny() at 8 and 4


# ---------------------------------------------------------------- training from zero-init

def test_gradient_reaches_every_parameter_from_zero_init():
    """conv_out, every ResBlock's conv2 and every SpatialTransformer's proj_out start at zero, so the untrained
    net outputs 0 and its blocks are identities. Step 1: only conv_out gets a gradient (everything upstream is
    multiplied by its zero weight). Step 2: conv_out != 0, so the residual stream and the zero-init layers
    (conv2, proj_out) get gradients, but what sits behind them does not. Step 3: every parameter does."""
    cfg = tiny(pooled_dim=4, low_res_channels=3)
    torch.manual_seed(0)
    model = UNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, context = inputs(cfg)
    kwargs = dict(pooled=torch.randn(3, 4), drop=torch.tensor([False, True, False]),
                  mask=torch.tensor([[True] * 4 + [False]] * 3),
                  low_res=torch.randn(3, 3, 8, 8), aug_level=torch.tensor([3, 50, 900]))
    names = dict(model.named_parameters())
    for step in range(1, 4):
        opt.zero_grad(set_to_none=False)
        out = model(x, t, Conditioning(tokens=context, **kwargs))
        if step == 1:
            assert out.abs().max() == 0  # zero-init output conv
        F.mse_loss(out, torch.randn_like(out)).backward()
        reached = {n for n, p in names.items() if p.grad is not None and p.grad.abs().sum() > 0}
        if step == 1:
            assert reached == {"conv_out.weight", "conv_out.bias"}
        if step == 2:
            assert "down_blocks.0.0.res.conv2.weight" in reached and "mid_attn.proj_out.weight" in reached
            assert "down_blocks.0.0.res.conv1.weight" not in reached  # behind conv2, which was still 0
        opt.step()
    assert reached == set(names), f"no gradient for {sorted(set(names) - reached)}"


# ---------------------------------------------------------------- attention maps

def test_attention_maps_shape_and_rows_sum_to_one():
    cfg = tiny()
    model = randomize(UNet(cfg))
    x, t, context = inputs(cfg, L=5)
    mask = torch.tensor([[True, True, True, False, False]] * 3)
    plain = model(x, t, Conditioning(tokens=context, mask=mask))
    with model.attention_maps() as maps:
        recorded = model(x, t, Conditioning(tokens=context, mask=mask))
    torch.testing.assert_close(recorded, plain)  # the explicit-softmax path computes the same function
    assert len(maps) == 7
    assert maps["down_blocks.1.0.attn.blocks.0.attn2"].shape == (3, 2, 8 * 8, 5)  # (B, heads, H*W, L)
    assert maps["mid_attn.blocks.0.attn2"].shape == (3, 2, 4 * 4, 5)
    for name, w in maps.items():
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), msg=name)
        assert (w[..., 3:] == 0).all(), name  # padding gets no attention
    # switched off on exit
    assert all(not m.store_weights and m.last_weights is None for m in model.modules() if isinstance(m, Attention))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, message", [
    (dict(channels=20), "norm_groups"),
    (dict(channels=16, num_heads=3), "num_heads"),
    (dict(image_size=18), "divisible by 2"),
    (dict(attention_resolutions=(6,)), "attention resolution 6"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(patch_size=0), "patch_size"),
    (dict(patch_size=3), "not divisible by .* patch_size=12"),  # 16 is not a multiple of 2**2 * 3
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNet(tiny(**overrides))


def test_bad_inputs_are_clear_errors():
    cfg = tiny()
    model = UNet(cfg)
    x, t, context = inputs(cfg)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(3, 3, 18, 18), t, Conditioning(tokens=context))
    with pytest.raises(ValueError, match="in_channels"):
        model(torch.randn(3, 4, 16, 16), t, Conditioning(tokens=context))
    with pytest.raises(ValueError, match="pooled_dim"):
        model(x, t, Conditioning(tokens=context, pooled=torch.randn(3, 4)))
    with pytest.raises(ValueError, match="tokens must be"):
        model(x, t, Conditioning(tokens=context[..., :-1]))
    with pytest.raises(ValueError, match="drop must be bool"):
        model(x, t, Conditioning(tokens=context, drop=torch.tensor([1, 0, 1])))  # must be bool, not an int mask
    with pytest.raises(ValueError, match="mask must be bool"):
        model(x, t, Conditioning(tokens=context, mask=torch.ones(3, 4, dtype=torch.bool)))  # L = 5 tokens
    with pytest.raises(ValueError, match="t must be"):
        model(x, t[:2], Conditioning(tokens=context))


# ---------------------------------------------------------------- mixed precision

def test_bf16_autocast_close_to_fp32():
    cfg = tiny()
    model = randomize(UNet(cfg), std=0.05)
    x, t, context = inputs(cfg)
    ref = model(x, t, Conditioning(tokens=context))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, Conditioning(tokens=context))
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 relative error {rel:.3f}"
