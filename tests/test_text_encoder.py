"""Text encoder: equals PyTorch's own pre-LN nn.TransformerEncoder with the same weights, ignores padding,
is causal when asked, pools at <end>, and rejects bad config / input with clear errors."""
import pytest
import torch
import torch.nn as nn

from models.text_encoder import TextEncoder, TextEncoderConfig
from models.tokenizer import BPETokenizer

CAPTIONS = ["a red circle above a blue square", "a small green triangle", "a large yellow star left of a pink hexagon"]


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(CAPTIONS * 5, vocab_size=300, progress=False)


def make_encoder(causal, vocab_size=300, max_length=16, seed=0):
    torch.manual_seed(seed)
    cfg = TextEncoderConfig(vocab_size=vocab_size, max_length=max_length, width=32, layers=2, heads=4, causal=causal)
    return TextEncoder(cfg).eval()


def random_batch(B=3, L=12, vocab_size=300, lengths=(12, 7, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (B, L), generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L) prefix of Trues
    return ids, mask


@pytest.mark.parametrize("causal", [False, True])
def test_equals_torch_transformer_encoder(causal):
    """Same weights in nn.TransformerEncoder(norm_first=True, gelu) + final LayerNorm give the same tokens."""
    enc = make_encoder(causal)
    for p in enc.parameters():  # move LayerNorms off their identity init so the copy is really checked
        if p.dim() == 1:
            nn.init.normal_(p, std=0.1)
    D = enc.cfg.width
    layer = nn.TransformerEncoderLayer(D, nhead=4, dim_feedforward=4 * D, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    ref = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(D), enable_nested_tensor=False).eval()
    with torch.no_grad():
        for ours, theirs in zip(enc.blocks, ref.layers):
            a = ours.attn
            theirs.self_attn.in_proj_weight.copy_(torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]))
            theirs.self_attn.in_proj_bias.copy_(torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]))
            theirs.self_attn.out_proj.load_state_dict(a.to_out.state_dict())
            theirs.linear1.load_state_dict(ours.mlp.net[0][0].state_dict())
            theirs.linear2.load_state_dict(ours.mlp.net[2].state_dict())
            theirs.norm1.load_state_dict(ours.norm1.state_dict())
            theirs.norm2.load_state_dict(ours.norm2.state_dict())
        ref.norm.load_state_dict(enc.final_norm.state_dict())
    ids, mask = random_batch()
    L = ids.shape[1]
    x = enc.token_embedding(ids) + enc.position_embedding[:L]
    causal_mask = torch.ones(L, L, dtype=torch.bool).triu(1) if causal else None  # True = not allowed
    expected = ref(x, mask=causal_mask, src_key_padding_mask=~mask, is_causal=causal)
    tokens, pooled = enc(ids, mask)
    torch.testing.assert_close(tokens[mask], expected[mask], atol=1e-5, rtol=1e-5)
    end = mask.sum(1) - 1
    torch.testing.assert_close(pooled, expected[torch.arange(3), end], atol=1e-5, rtol=1e-5)


def test_shapes_and_pooling_at_the_end_token(tok):
    enc = make_encoder(causal=False, vocab_size=tok.vocab_size, max_length=32)
    ids, mask = tok(CAPTIONS, max_length=32)
    tokens, pooled = enc(ids, mask)
    assert tokens.shape == (3, 32, 32) and pooled.shape == (3, 32)
    for b in range(3):
        end = int(mask[b].sum()) - 1
        assert ids[b, end] == tok.end_id
        assert torch.equal(pooled[b], tokens[b, end])
    short_ids, short_mask = tok(CAPTIONS, max_length=25)  # any length up to max_length
    assert enc(short_ids, short_mask)[0].shape == (3, 25, 32)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_ids_change_nothing(causal):
    enc = make_encoder(causal)
    ids, mask = random_batch()
    tokens, pooled = enc(ids, mask)
    other = ids.clone()
    other[~mask] = torch.randint(0, 300, (int((~mask).sum()),), generator=torch.Generator().manual_seed(5))
    assert not torch.equal(other, ids)
    tokens2, pooled2 = enc(other, mask)
    torch.testing.assert_close(tokens2[mask], tokens[mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled2, pooled, atol=1e-6, rtol=0)
    real = ids.clone()
    real[1, 2] = (ids[1, 2] + 1) % 300  # a real token does change the pooled vector
    assert not torch.allclose(enc(real, mask)[1][1], pooled[1], atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_changing_token_j_leaves_earlier_outputs_unchanged_only_when_causal(causal):
    enc = make_encoder(causal)
    ids, mask = random_batch()
    j = 5
    changed = ids.clone()
    changed[0, j] = (ids[0, j] + 7) % 300
    before, _ = enc(ids, mask)
    after, _ = enc(changed, mask)
    diff = (after[0] - before[0]).abs().amax(dim=-1)  # (L,)
    assert (diff[j:] > 1e-4).all()
    if causal:
        assert diff[:j].max() == 0
    else:
        assert (diff[:j] > 1e-4).all()


def test_gradient_reaches_embeddings():
    enc = make_encoder(causal=True).train()
    ids, mask = random_batch()
    tokens, pooled = enc(ids, mask)
    (tokens[mask].square().mean() + pooled.square().mean()).backward()
    used = ids[mask].unique()
    assert enc.token_embedding.weight.grad[used].abs().sum(-1).min() > 0
    assert enc.position_embedding.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_under_bf16_autocast_the_pooled_vector_is_still_the_end_token():
    """bf16 autocast (train.bf16) changes the precision, not the contract: the pooled vector is the output at each
    row's <end> token (the last True of the mask), and padding does not reach the real tokens."""
    enc = make_encoder(causal=False)
    ids, mask = random_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, pooled = enc(ids, mask)
        edited = ids.clone()
        edited[~mask] = (edited[~mask] + 1) % enc.cfg.vocab_size  # change only the padding
        tokens_edited, _ = enc(edited, mask)
    end = mask.long().cumsum(1).argmax(1)  # (B,) the last True of each row
    assert torch.equal(pooled, tokens[torch.arange(len(ids)), end])
    assert torch.equal(tokens[mask], tokens_edited[mask])


def test_clear_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoder(TextEncoderConfig())
    enc = make_encoder(causal=False, max_length=8)
    ids, mask = random_batch(L=12, lengths=(12, 7, 3))
    with pytest.raises(ValueError, match="max_length=8"):
        enc(ids, mask)
    ids, mask = random_batch(L=8, lengths=(8, 5, 3))
    with pytest.raises(ValueError, match="bool"):
        enc(ids, mask.long())
    with pytest.raises(ValueError, match="prefix"):
        enc(ids, mask.flip(-1))  # left padding
    with pytest.raises(ValueError, match="divisible"):
        TextEncoder(TextEncoderConfig(vocab_size=10, width=30, heads=4))
