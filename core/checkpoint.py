"""Checkpoints: plain dicts written atomically and read back with torch.load(weights_only=True).

Checkpoints hold only tensors, numbers, strings, lists and dicts, so they load with weights_only=True, which refuses
to run pickled code. Every checkpoint carries
    kind     which component it holds ("diffusion", "vae", "clip", "shapes_classifier", ...), checked on load
    config   the resolved config as a plain dict (core/config.py), so the checkpoint alone rebuilds its model
and a training checkpoint also step, optimizer, rng (for exact resumption) and the weights ("model", "ema").
"""
import hashlib
import os
import random
import tempfile
from pathlib import Path

import torch


def save_checkpoint(path, ckpt):
    """Write atomically: to a temporary file in the same folder, then rename over the target, so an
    interrupted save never leaves a half-written checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, expected_kind):
    """Load with weights_only=True; a missing file, a file that is not a checkpoint, or a checkpoint of another
    component is a ValueError/FileNotFoundError with one line that says what to do. expected_kind: a kind, or a
    tuple of the kinds that are welcome."""
    kinds = (expected_kind,) if isinstance(expected_kind, str) else tuple(expected_kind)
    wanted = " or ".join(f"'{k}'" for k in kinds)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; train one first or pass the path of an "
                                f"existing {wanted.replace(chr(39), '')} checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read checkpoint {path} ({first[:120]}); it is corrupt or not a checkpoint "
                         f"of this codebase") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this codebase (no 'kind' entry)")
    if ckpt["kind"] not in kinds:
        raise ValueError(f"{path} holds a '{ckpt['kind']}' checkpoint but a {wanted} checkpoint is needed here; "
                         f"pass the right file")
    return ckpt


def load_weights(module, state_dict, what="weights", assign=False):
    """load_state_dict(strict=True) with a one-line error that says which keys or shapes do not fit.
    assign=True makes the tensors of state_dict the module's parameters (a module built on the meta device then
    costs no second copy of the weights)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]})")
        raise ValueError(f"{what} do not fit the model built from the config: " + "; ".join(parts)
                         + "; the checkpoint was made with another configuration or code version")
    module.load_state_dict(state_dict, assign=assign)


def rng_state():
    """Global RNG states as tensors/ints (weights_only-safe), for exact resumption."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()[1][:625],
             "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_sha256(module, prefix=b""):
    """SHA-256 (hex) of `prefix` followed by every (name, float32 bytes) of module.state_dict() in name order: what a
    checkpoint stores of a frozen part it was trained on, so that joining it to another part is refused."""
    h = hashlib.sha256(prefix)
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
