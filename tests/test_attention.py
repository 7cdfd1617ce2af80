"""Attention through F.scaled_dot_product_attention equals the explicit softmax of Vaswani et al. Eq. 1."""
import pytest
import torch

from models.attention import Attention, TransformerBlock


def reference_attention(module, x, context, key_mask, causal):
    """softmax(Q K^T / sqrt(d)) V written with plain matmuls, heads split by hand."""
    h = module.heads
    q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
    B, N, inner = q.shape
    d = inner // h
    q = q.view(B, N, h, d).transpose(1, 2)
    k = k.view(B, -1, h, d).transpose(1, 2)
    v = v.view(B, -1, h, d).transpose(1, 2)
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / d**0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], -1e9)
    if causal:
        scores = scores.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), -1e9)
    out = torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), v)
    return module.to_out(out.transpose(1, 2).reshape(B, N, inner))


@pytest.mark.parametrize("cross,masked,causal", [(False, False, False), (True, False, False), (True, True, False),
                                                 (False, False, True), (False, True, True)])
def test_sdpa_matches_explicit_softmax(cross, masked, causal):
    torch.manual_seed(0)
    attn = Attention(32, heads=4, context_dim=24 if cross else None).eval()
    x = torch.randn(3, 7, 32)
    context = torch.randn(3, 5, 24) if cross else x
    M = context.shape[1]
    key_mask = None
    if masked:
        key_mask = torch.ones(3, M, dtype=torch.bool)
        key_mask[0, -2:] = False
        key_mask[2, 1:] = False
    expected = reference_attention(attn, x, context, key_mask, causal)
    fused = attn(x, context if cross else None, key_mask=key_mask, causal=causal)
    attn.store_weights = True
    explicit = attn(x, context if cross else None, key_mask=key_mask, causal=causal)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=1e-5)
    weights = attn.last_weights
    assert weights.shape == (3, 4, 7, M)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 7))
    if masked:
        assert weights[0, :, :, -2:].abs().max() == 0


def test_masked_key_changes_nothing():
    torch.manual_seed(0)
    block = TransformerBlock(32, heads=4, context_dim=16).eval()
    x, context = torch.randn(2, 9, 32), torch.randn(2, 6, 16)
    key_mask = torch.ones(2, 6, dtype=torch.bool)
    key_mask[:, 4:] = False
    changed = context.clone()
    changed[:, 4:] = torch.randn(2, 2, 16)
    torch.testing.assert_close(block(x, context, key_mask), block(x, changed, key_mask))
    assert not torch.allclose(block(x, context), block(x, changed))


def test_width_not_divisible_by_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible"):
        Attention(30, heads=4)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_bf16_attention_runs_under_lowered_cpu_dispatch(capability):
    """With ATen's CPU dispatch lowered below AVX-512 (ATEN_CPU_CAPABILITY), torch 2.13's fused bf16 kernel fails
    for long sequences on processors that have AVX-512 bf16; ours falls back to the math kernel there and gives
    the float32 result to bf16 precision."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    code = ("import torch\n"
            "from models.attention import Attention\n"
            "torch.manual_seed(0)\n"
            "attn = Attention(32, heads=2).eval()\n"
            "x = torch.randn(2, 256, 32)\n"
            "with torch.no_grad():\n"
            "    full = attn(x)\n"
            "    half = attn.bfloat16()(x.bfloat16()).float()\n"
            "assert (half - full).abs().max() < 0.05, (half - full).abs().max()\n"
            "print('ok', torch.backends.cpu.get_cpu_capability())\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]
    assert result.stdout.split() == ["ok", capability.upper()]
