"""The pieces every training script shares, each a few lines: the `train:` config section, opening a run (fresh or
resumed), the learning-rate schedule, the data order, per-step random draws and the EMA of the weights. Not a
Trainer: each script keeps its own loop and calls these (and core/ for the device, checkpoints and configs).

One convention for every script (train/diffusion.py, vae.py, clip.py, classifier.py, text_lm.py):
    python -m train.<script> --config FILE section.key=value ...
    train.out_dir   where ckpt.pt, config.yaml and the logs go ('' = runs/<config file name>)
    train.resume    never | auto | always | <path>; a resumed run continues exactly where it stopped: the data order
                    (batch_indices) and every random draw of a step (step_generator) are functions of (seed, step),
                    and the checkpoint holds the weights, the optimizer and the RNG states
    train.stop_after, train.ckpt_every, train.min_lr_ratio, ... (TrainConfig below)
"""
import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from core.checkpoint import load_checkpoint, load_weights, rng_state, set_rng_state
from core.config import config_to_dict, default_out_dir, stored_config_changes
from core.runtime import cleanup_distributed, setup_distributed


@dataclass
class TrainConfig:
    """The fields of the `train:` section that every training script has; a script's own section adds its fields
    (EMA, conditioning dropout, evaluation sizes, ...) and states its defaults by redeclaring them."""
    out_dir: str = ""             # '' = runs/<config file name>
    steps: int = 1000             # optimizer steps
    batch_size: int = 64          # samples per step (the global batch under DDP)
    lr: float = 1e-3              # peak AdamW learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moments
    weight_decay: float = 0.0     # AdamW decoupled weight decay
    warmup_steps: int = 100       # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1     # final learning rate as a fraction of lr
    grad_clip: float = 0.0        # max global gradient norm (0 = off)
    bf16: bool = False            # bf16 autocast for forward and loss
    channels_last: bool = False   # convolutions in NHWC memory order (weights and batches; memory_format below): the
                                  # same function to float rounding, 1.2-1.5x faster for the 32 px conv nets on CPUs
    seed: int = 0                 # seeds the init, the data order and every random draw of a step
    device: str = "auto"          # auto | cpu | cuda | cuda:N | mps
    log_every: int = 100          # steps between log lines (and tensorboard scalars)
    ckpt_every: int = 1000        # steps between checkpoints (always one at the end)
    stop_after: int = 0           # end this invocation after this many steps (0 = run to train.steps); resume later
    resume: str = "never"         # never: refuse to overwrite out_dir/ckpt.pt | auto: continue it if present |
                                  # always: continue it | <path>: continue that checkpoint, writing to out_dir


def check_train_config(tc: TrainConfig):
    if tc.steps < 1 or tc.batch_size < 1:
        raise ValueError("train.steps and train.batch_size must be at least 1")
    if not 0 <= tc.min_lr_ratio <= 1 or tc.warmup_steps < 0 or tc.stop_after < 0 or tc.ckpt_every < 1:
        raise ValueError("train.min_lr_ratio must be in [0, 1], train.warmup_steps and train.stop_after >= 0, "
                         "train.ckpt_every >= 1")


def open_run(cfg, config_path, kind, fixed, name, filled_in=()):
    """Where a run writes and what it continues, decided before any data loads: train.out_dir (default
    runs/<config file name>, else runs/<name>) and train.resume -> (out_dir, the checkpoint dict to continue or None).
    Refused with one line, nothing written: an existing checkpoint when not resuming; a checkpoint made with another
    config in the `fixed` sections (the model and the data; train settings may change); an EMA of another decay.
    filled_in: config keys the script sets itself before storing the config (core.config.config_changes)."""
    tc = cfg.train
    check_train_config(tc)
    out_dir = Path(tc.out_dir or default_out_dir(config_path, name))
    ckpt_path = out_dir / "ckpt.pt"
    resume_from = None
    if tc.resume == "always" or (tc.resume == "auto" and ckpt_path.exists()):
        resume_from = ckpt_path
    elif tc.resume not in ("never", "auto"):
        resume_from = Path(tc.resume)
        if ckpt_path.exists() and not (resume_from.exists() and resume_from.samefile(ckpt_path)):
            raise ValueError(f"{ckpt_path} exists and is not {resume_from}; choose another train.out_dir to continue "
                             f"{resume_from} (nothing was overwritten)")
    elif ckpt_path.exists():
        raise ValueError(f"{ckpt_path} exists; pass train.resume=auto to continue it or choose another "
                         f"train.out_dir (nothing was overwritten)")
    if resume_from is None:
        return out_dir, None
    resumed = load_checkpoint(resume_from, kind)
    changes = stored_config_changes(type(cfg), resumed["config"], config_to_dict(cfg), fixed, filled_in)
    if changes:
        raise ValueError(f"cannot resume: {resume_from} was made with another config ({changes}); only train.* may "
                         f"change when resuming; resume with the same config or choose another train.out_dir")
    if getattr(tc, "ema_decay", 0) > 0:  # here, before any data is loaded (resume_state checks again)
        if not resumed.get("ema"):
            raise ValueError(f"cannot resume with train.ema_decay > 0 from a checkpoint that has no EMA weights; "
                             f"resume with train.ema_decay=0 or choose another train.out_dir")
        EMA.check_decay(resumed["ema"], tc.ema_decay)
    return out_dir, resumed


def resume_state(resumed, model, optimizer, ema=None, what="weights"):
    """Put a resumed checkpoint's weights, optimizer, EMA and RNG states back; returns the step to continue from
    (0 for a fresh run, resumed None)."""
    if resumed is None:
        return 0
    load_weights(model, resumed["model"], what)
    optimizer.load_state_dict(resumed["optimizer"])
    if ema is not None:
        if not resumed.get("ema"):
            raise ValueError("cannot resume with train.ema_decay > 0 from a checkpoint that has no EMA weights")
        ema.load_state_dict(resumed["ema"])
    set_rng_state(resumed["rng"])
    return resumed["step"]


def training_state(kind, cfg, step, model, optimizer, ema=None, **extra):
    """The checkpoint dict of a training run: what rebuilds the model and what continues the run exactly."""
    return {"kind": kind, "config": config_to_dict(cfg), "step": step, "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(),
            "rng": rng_state(), **extra}


def end_step(tc: TrainConfig, start_step):
    """The step this invocation stops at: train.steps, or earlier by train.stop_after."""
    return min(tc.steps, start_step + tc.stop_after) if tc.stop_after else tc.steps


def step_generator(seed, step, rank=0, device="cpu"):
    """The generator of every random draw of one step (noise, timesteps, dropout, masking) on one DDP rank: a
    function of (seed, step, rank), so the run does not depend on where it was stopped and resumed."""
    return torch.Generator(device).manual_seed(seed * 2**40 + step * 2**8 + rank)


def warmup_cosine(step, warmup_steps, total_steps, min_ratio=0.1):
    """Multiplier of the base learning rate: linear warm-up, then cosine decay to `min_ratio`
    (Loshchilov & Hutter 2017, arXiv 1608.03983, without restarts)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer, tc: TrainConfig, step):
    """Every parameter group at lr * warmup_cosine(step); returns the rate."""
    lr = tc.lr * warmup_cosine(step, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def memory_format(tc: TrainConfig, *modules):
    """train.channels_last: put the modules' 4-D weights in NHWC order (channels_last), in place, before the optimizer
    and the EMA copy them; return the function a training loop passes each image batch through (NHWC too, or as it
    is). Values do not change, only their order in memory, so checkpoints, fingerprints (core.checkpoint.
    weights_sha256) and resuming are the same; the convolutions take other kernels, so results agree to float
    rounding, not bit for bit (tests/test_train_common.py)."""
    if not tc.channels_last:
        return lambda x: x
    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)
    return lambda x: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


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


class Ranks:
    """This process's share of a data-parallel run under torchrun (one process per GPU, or per core on a CPU:
    `torchrun --standalone --nproc_per_node N -m train.<script> ...`); rank 0 of world 1 when not distributed.

    Data parallelism in four lines: every rank takes its slice of the global batch (`share`), computes the gradient
    of the mean loss over that slice, the ranks average their gradients (`average_gradients`, or DDP's hooks when
    the model is `wrap`ped), and every rank takes the same optimizer step, so the replicas stay identical
    (`check_replicas` says so at the end). With equal slices the averaged gradient is the gradient of the global
    batch's mean loss: the run trains what one process on the whole batch would, up to the order of float sums and
    the random draws of a step, which are per rank (step_generator). Only rank 0 (`is_main`) logs and writes."""

    def __init__(self, batch_size):
        world = int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1  # as torchrun sets them
        if batch_size % world:  # refused before joining the group, on every rank alike
            raise ValueError(f"train.batch_size ({batch_size}) must be divisible by the {world} DDP ranks; give a "
                             f"multiple of {world} or start fewer processes")
        self.rank, self.world = setup_distributed()
        self.is_main = self.rank == 0

    def share(self, idx):
        """This rank's rows of the global batch's indices (B,) -> (B / world,)."""
        return idx[self.rank::self.world]

    def wrap(self, model):
        """DistributedDataParallel(model) under torchrun (gradients averaged by its hooks during backward, in
        buckets overlapping the backward pass), else the model itself. For models called through their forward."""
        return DistributedDataParallel(model) if self.world > 1 else model

    def average_gradients(self, module):
        """After backward: every parameter's gradient replaced by the mean over the ranks, in one all-reduce of
        the flattened gradients. For models trained through methods other than forward, or with parts frozen in
        some phases (the dVAE's decoder phase), which DDP's hooks do not follow; parameters without a gradient
        (the same on every rank) are left out."""
        if self.world == 1:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))

    @torch.no_grad()
    def map_batches(self, fn, n, batch_size, device, desc, progress=True):
        """fn(idx) -> a tensor (len(idx), ...) for every batch of range(n), in order: (n, ...) on the CPU. What a
        frozen model makes of every training item once (latents, tokens). Under torchrun each rank computes every
        world-th batch and the ranks add up their shares (zeros elsewhere, so the sum is exact): every rank gets
        all of them in 1 / world of the time."""
        starts = range(0, n, batch_size)
        out = None
        for i in tqdm(starts[self.rank::self.world], desc=desc, disable=not (progress and self.is_main),
                      dynamic_ncols=True):
            idx = torch.arange(i, min(i + batch_size, n))
            y = fn(idx).cpu()
            if out is None:
                out = torch.zeros(n, *y.shape[1:], dtype=y.dtype)
            out[idx] = y
        if self.world > 1:
            like = [None if out is None else (tuple(out.shape), out.dtype)]
            dist.broadcast_object_list(like, src=0)  # rank 0 always has the first batch; a rank with none learns
            if out is None:                          # the shape and dtype from it
                out = torch.zeros(*like[0][0], dtype=like[0][1])
            out = out.to(device)
            dist.all_reduce(out)
            out = out.cpu()
        return out

    def mean(self, value):
        """A logged figure (a 0-d tensor) averaged over the ranks (every rank must call it)."""
        if self.world == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
        return value

    def check_replicas(self, model):
        """At the end of a distributed run: raise if the ranks' weights differ (the optimizer steps must have been
        the same everywhere); rank 0 prints that they agree."""
        if self.world == 1:
            return
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(gathered, flat)
        if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
            raise RuntimeError("DDP replicas diverged: the ranks hold different weights")
        if self.is_main:
            print(f"DDP: the {self.world} replicas hold identical weights", flush=True)

    def close(self):
        cleanup_distributed()


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


def log_grid(writer, out_dir, tag, grid, step):
    """A PIL image grid -> out_dir/<tag>/step_<step>.png, and tensorboard's image `tag` at `step`."""
    (out_dir / tag).mkdir(exist_ok=True)
    grid.save(out_dir / tag / f"step_{step:07d}.png")
    writer.add_image(tag, torch.from_numpy(np.array(grid)), step, dataformats="HWC")


def stopped_early(writer, ckpt_path, end, tc: TrainConfig, train_time):
    """True (the writer closed, a line saying how to go on) when this run stopped before train.steps
    (train.stop_after); the evaluation at the end is then left to the run that finishes."""
    if end >= tc.steps:
        return False
    writer.close()
    print(f"saved {ckpt_path} at step {end} of {tc.steps} ({train_time:.0f}s this run); continue with "
          f"train.resume=auto", flush=True)
    return True
