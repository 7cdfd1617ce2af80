"""The pieces every training script shares, each a few lines: device, seeds, distributed set-up, learning-rate
schedule, EMA, atomic checkpoints, image grids and the command-line error convention.

Not a Trainer: each script keeps its own loop and calls these.

Checkpoints are plain dicts (tensors, numbers, strings, lists, dicts) so that they load with
torch.load(weights_only=True), which refuses to run pickled code. Every checkpoint carries
    kind     which component it holds ("diffusion", "shapes_classifier", ...), checked on load
    config   the resolved config as a plain dict, so the checkpoint alone rebuilds its model
"""
import copy
import math
import os
import random
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


# ---------------------------------------------------------------- device, seeds, distributed

def get_device(name="auto"):
    """'auto' picks CUDA, then Apple's MPS, then the CPU; any torch device string is accepted."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' asked for but CUDA is not available here; use device=cpu or auto")
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device, enabled):
    """bf16 autocast on any device type (a no-op context when disabled)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def setup_distributed():
    """Under torchrun (RANK/WORLD_SIZE set) join the process group: NCCL on GPUs, gloo on CPUs.
    Returns (rank, world_size); (0, 1) when not distributed."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- optimisation

def warmup_cosine(step, warmup_steps, total_steps, min_ratio=0.1):
    """Multiplier of the base learning rate: linear warm-up, then cosine decay to `min_ratio`
    (Loshchilov & Hutter 2017, arXiv 1608.03983, without restarts)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step, batch_size, num_items, seed):
    """Indices of the global batch at `step`: consecutive slices of a fresh permutation each epoch, so the
    data order is a function of (seed, step) alone and a resumed run sees the same batches."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_items)
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out += perm[offset: offset + batch_size - len(out)].tolist()
    return torch.tensor(out)


def shuffled_batches(n, batch_size, generator):
    """Endless batches of indices into n items: a fresh random permutation each epoch (drawn from `generator`
    when the previous one is used up), the last incomplete batch of an epoch dropped."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start: start + batch_size]


class EMA:
    """Exponential moving average of a model's weights: theta_ema <- decay * theta_ema + (1 - decay) * theta.

    Buffers (e.g. batch-norm statistics) are copied, not averaged. `warmup` ramps the decay as
    min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the random initialisation.
    """

    def __init__(self, model, decay=0.999, warmup=True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model):
        self.num_updates += 1
        decay = self.decay
        if self.warmup:
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return {"weights": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    @staticmethod
    def check_decay(state, decay):
        """Refuse to resume an EMA with another decay: that would silently change what it averages."""
        if state["decay"] != decay:
            raise ValueError(f"the checkpoint's EMA decay is {state['decay']} but this run asks for {decay}; "
                             f"resume with train.ema_decay={state['decay']} or choose another train.out_dir")

    def load_state_dict(self, state):
        self.check_decay(state, self.decay)
        load_weights(self.model, state["weights"], "EMA weights")
        self.num_updates = state["num_updates"]


# ---------------------------------------------------------------- checkpoints

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
    """Load with weights_only=True; a missing file, a file that is not a checkpoint, or a checkpoint of
    another component is a ValueError/FileNotFoundError with one line that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; train one first or pass the path of an "
                                f"existing {expected_kind} checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read checkpoint {path} ({first[:120]}); it is corrupt or not a checkpoint "
                         f"of this codebase") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this codebase (no 'kind' entry)")
    if ckpt["kind"] != expected_kind:
        raise ValueError(f"{path} holds a '{ckpt['kind']}' checkpoint but a '{expected_kind}' checkpoint is "
                         f"needed here; pass the right file")
    return ckpt


def load_weights(module, state_dict, what="weights"):
    """load_state_dict(strict=True) with a one-line error that says which keys or shapes do not fit."""
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
    module.load_state_dict(state_dict)


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


# ---------------------------------------------------------------- pictures

def to_uint8(images):
    """(B, 3, H, W) floats in [-1, 1] -> (B, H, W, 3) uint8 numpy array."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images, nrow=None, pad=2):
    """(B, 3, H, W) in [-1, 1] -> one PIL image with the batch laid out in rows of `nrow`."""
    arr = to_uint8(images)
    B, H, W, _ = arr.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = math.ceil(B / nrow)
    grid = np.full((ncol * (H + pad) + pad, nrow * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = arr[i]
    return Image.fromarray(grid)


# ---------------------------------------------------------------- command-line convention

def run_cli(main):
    """Run `main()`; bad input (ValueError, FileNotFoundError) prints one line `error: ...` and exits 2.
    Set DEBUG=1 to see the traceback instead."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
