"""Tests for models/dalle.py (DALL-E's transformer, Ramesh et al. 2021, arXiv 2102.12092): the attention masks of
App. B.1 / Fig. 11 (causal, and reaching exactly the positions the figure shows), causality of the whole model,
the KV cache against recomputation, the sampling filters against Hugging Face transformers' logits warpers, guidance
on the logits, seeds, the per-position pad tokens and the loss weights."""
import pytest
import torch
import torch.nn.functional as F

from models.dalle import (DalleConfig, DalleTransformer, attention_mask, filter_logits, guided_logits,
                          sample_image_tokens, top_k_filter, top_p_filter)

T, h = 6, 4  # Fig. 11's hypothetical model: 6 text tokens, a 4 x 4 image


def tiny(**overrides):
    cfg = dict(text_length=T, text_vocab=20, image_size=h, image_vocab=16, width=32, layers=4, heads=4,
               attention=["row", "column", "full", "conv"])
    return DalleTransformer(DalleConfig(**{**cfg, **overrides})).eval()


def reach(kind, token, kernel=3):
    """The image tokens (row, column) that the position holding image token `token` attends to."""
    mask = attention_mask(kind, T, h, kernel)
    row = mask[T + token]
    assert row[:T].all()  # every image position sees the whole text
    return {divmod(j, h) for j in range(h * h - 1) if row[T + j]}


def test_masks_are_causal_and_text_is_causal():
    for kind in ("full", "row", "column", "conv"):
        m = attention_mask(kind, T, h)
        assert m.shape == (T + h * h - 1,) * 2
        assert not m.triu(1).any()  # nothing later than the query
        assert m.diagonal().all()  # every position sees itself
        assert torch.equal(m[:T, :T], torch.ones(T, T, dtype=torch.bool).tril())  # text: causal


def test_masks_reach_the_positions_of_fig_11():
    token = 2 * h + 2  # image token (2, 2) of the 4 x 4 grid
    assert reach("full", token) == {divmod(j, h) for j in range(token + 1)}
    assert reach("row", token) == {(2, 0), (2, 1), (2, 2)}  # (a) its row, up to itself
    assert reach("column", token) == {(0, 2), (1, 2), (2, 2)}  # (b) its column, up to itself
    assert reach("conv", token) == {(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)}  # (d) the 3 x 3 window, causal
    assert reach("conv", token, kernel=5) == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3),
                                              (2, 0), (2, 1), (2, 2)}
    assert reach("row", 0) == {(0, 0)} and reach("column", 0) == {(0, 0)}


def test_changing_a_token_leaves_earlier_logits_unchanged():
    torch.manual_seed(0)
    model = tiny()
    text = torch.randint(0, 26, (2, T))
    image = torch.randint(0, 16, (2, h * h))
    t0, i0 = model(text, image)
    image2 = image.clone()
    image2[:, 7] = (image2[:, 7] + 1) % 16  # the token at image position 7 feeds the logits of positions >= 8
    t1, i1 = model(text, image2)
    torch.testing.assert_close(t0, t1)
    torch.testing.assert_close(i0[:, :8], i1[:, :8])  # image logits 0..7 predict tokens 0..7: unchanged
    assert not torch.allclose(i0[:, 8:], i1[:, 8:])
    text2 = text.clone()
    text2[:, 3] += 1
    t2, i2 = model(text2, image)
    torch.testing.assert_close(t0[:, :3], t2[:, :3])
    assert not torch.allclose(i0, i2)  # every image token sees the text


def test_kv_cache_equals_recomputation():
    torch.manual_seed(1)
    model = tiny(attention=["row", "column", "row", "conv"])
    text = model.text_ids(torch.randint(0, 20, (3, T)), torch.tensor([[1] * 4 + [0] * 2] * 3).bool())
    image = torch.randint(0, 16, (3, h * h))
    _, full = model(text, image)  # (3, N, K)
    caches = [dict() for _ in model.blocks]
    steps = [model(text, None, caches, 0)[1]]
    for n in range(1, h * h):
        steps.append(model(None, image[:, n - 1: n], caches, T + n - 1)[1])
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    g = lambda: torch.Generator().manual_seed(5)
    a = sample_image_tokens(model, text, guidance=2.0, top_k=8, generator=g())
    b = sample_image_tokens(model, text, guidance=2.0, top_k=8, generator=g(), use_cache=False)
    assert torch.equal(a, b) and a.shape == (3, h, h)


def test_seeds_give_the_same_tokens():
    model = tiny()
    text = torch.randint(0, 20, (2, T))
    draw = lambda seed: sample_image_tokens(model, text, temperature=1.5, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))


def test_filters_equal_transformers_logits_warpers():
    pytest.importorskip("transformers")
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = torch.randn(8, 50, generator=g) * 3
        for k in (1, 5, 49):
            torch.testing.assert_close(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits))
        for p in (0.05, 0.5, 0.9, 0.999):
            torch.testing.assert_close(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits))
        ref = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, logits)))
        torch.testing.assert_close(filter_logits(logits, 0.7, 10, 0.8), ref)


def test_filter_definitions():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, True, False, True]]
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_p_filter(logits, 1.0), logits)
    p = logits.softmax(-1)[0]  # 0.64, 0.09, 0.24, 0.03
    kept = ~torch.isinf(top_p_filter(logits, p[0].item() + 0.01))  # just above the top token's mass: two kept
    assert kept.tolist() == [[True, False, True, False]]
    assert (~torch.isinf(top_p_filter(logits, 0.01))).sum() == 1  # always at least one


def test_guidance_on_the_logits():
    cond, uncond = torch.randn(2, 3, 7)
    assert torch.equal(guided_logits(cond, uncond, 1.0), cond)
    torch.testing.assert_close(guided_logits(cond, uncond, 3.0), cond + 2.0 * (cond - uncond))


@pytest.mark.parametrize("kwargs, message", [(dict(top_k=-1), "top_k must be at least 1"),
                                             (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
                                             (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
                                             (dict(temperature=0.0), "temperature must be > 0")])
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_image_tokens(tiny(), torch.zeros(1, T, dtype=torch.long), **kwargs)


def test_pad_tokens_and_loss_weights():
    model = tiny(text_loss_weight=0.125)
    ids = torch.tensor([[1, 5, 2, 3, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]]).bool()
    assert model.text_ids(ids, mask).tolist() == [[1, 5, 2, 23, 24, 25]]  # pad at t -> V + t (V = 20)
    assert model.null_text(1, "cpu").tolist() == [[20, 21, 22, 23, 24, 25]]
    text, image = model.text_ids(ids, mask), torch.randint(0, 16, (1, h * h))
    loss, text_ce, image_ce = model.loss(text, image)
    text_logits, image_logits = model(text, image)
    assert text_logits.shape == (1, T - 1, 26) and image_logits.shape == (1, h * h, 16)
    torch.testing.assert_close(text_ce, F.cross_entropy(text_logits[0], text[0, 1:]))
    torch.testing.assert_close(loss, 0.125 * text_ce + 0.875 * image_ce)


def test_bad_config():
    with pytest.raises(ValueError, match="model.attention must list masks"):
        tiny(attention=["diagonal"])
    with pytest.raises(ValueError, match="conv_kernel must be odd"):
        tiny(conv_kernel=4)
