"""The pieces every training script shares, each a few lines: the learning-rate schedule, the data order and the
EMA of the weights. Not a Trainer: each script keeps its own loop and calls these (and core/ for the device,
checkpoints and configs).
"""
import copy
import math

import torch

from core.checkpoint import load_weights


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
