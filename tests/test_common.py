"""Shared training pieces: atomic checkpoints with clear load errors, EMA, LR schedule, image grids."""

import pytest
import torch
import torch.nn as nn

from core.checkpoint import load_checkpoint, load_weights, save_checkpoint
from core.images import image_grid
from train.common import EMA, TrainConfig, memory_format, warmup_cosine


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(path, {"kind": "toy", "model": model.state_dict(), "config": {"a": [1, 2]}, "step": 7})
    ckpt = load_checkpoint(path, "toy")
    assert ckpt["step"] == 7 and ckpt["config"] == {"a": [1, 2]}
    torch.testing.assert_close(ckpt["model"]["weight"], model.weight)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"kind": "toy", "step": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"kind": "toy", "bad": lambda: 0})  # lambdas cannot be pickled
    assert load_checkpoint(path, "toy")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_load_errors_are_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt", "diffusion")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt or not a checkpoint"):
        load_checkpoint(garbage, "diffusion")
    other = tmp_path / "other.pt"
    save_checkpoint(other, {"kind": "shapes_classifier"})
    with pytest.raises(ValueError, match="holds a 'shapes_classifier' checkpoint but a 'diffusion'"):
        load_checkpoint(other, "diffusion")
    pickled = tmp_path / "pickled.pt"
    torch.save({"kind": "diffusion", "obj": nn.Linear(1, 1)}, pickled)  # a module object needs unpickling code
    with pytest.raises(ValueError, match="corrupt or not a checkpoint"):
        load_checkpoint(pickled, "diffusion")


def test_load_weights_mismatch_message():
    with pytest.raises(ValueError, match=r"1 of another shape \(e.g. weight \(2, 4\) vs \(2, 3\)\)"):
        load_weights(nn.Linear(3, 2), nn.Linear(4, 2).state_dict())
    with pytest.raises(ValueError, match="1 missing"):
        load_weights(nn.Linear(3, 2), {"weight": torch.zeros(2, 3)})


def test_memory_format_puts_weights_and_batches_in_nhwc_order_and_changes_no_value():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(2, 2))
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    assert memory_format(TrainConfig(), conv)(torch.ones(1, 3, 4, 4)).is_contiguous()  # off: nothing moves
    layout = memory_format(TrainConfig(channels_last=True), conv, None)
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last) and not conv[0].weight.is_contiguous()
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())
    x = torch.randn(2, 3, 5, 5)
    y = layout(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    tokens = torch.randn(2, 7)
    assert layout(tokens) is tokens


def test_ema_is_the_exponential_average():
    model = nn.Linear(2, 1, bias=False)
    ema = EMA(model, decay=0.9, warmup=False)
    start = model.weight.detach().clone()
    targets = [torch.full((1, 2), float(v)) for v in (1.0, 2.0, 3.0)]
    expected = start
    for target in targets:
        with torch.no_grad():
            model.weight.copy_(target)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * target
    torch.testing.assert_close(ema.model.weight, expected)


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, min_ratio=0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    values = [warmup_cosine(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_image_grid_layout():
    images = torch.stack([torch.full((3, 4, 5), v) for v in (-1.0, 1.0, 0.0)])
    grid = image_grid(images, nrow=2, pad=1)
    assert grid.size == (2 * 5 + 3, 2 * 4 + 3)
    px = grid.load()
    assert px[1, 1] == (0, 0, 0) and px[7, 1] == (255, 255, 255) and px[1, 6] == (128, 128, 128)


def test_ema_refuses_a_checkpoint_of_another_decay():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.999)
    ema.update(model)
    state = ema.state_dict()
    with pytest.raises(ValueError, match="EMA decay is 0.999 but this run asks for 0.99"):
        EMA(model, decay=0.99).load_state_dict(state)
    again = EMA(model, decay=0.999)
    again.load_state_dict(state)
    assert again.num_updates == 1
