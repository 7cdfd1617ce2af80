"""The KV cache of models/dalle.py: seconds to draw the image tokens of a batch with and without it.

    .venv/bin/python -m tests.bench_dalle                  # the tiny preset (configs/shapes/dalle.yaml), batch 16
    .venv/bin/python -m tests.bench_dalle --config configs/shapes/dalle.yaml --batch 16 --repeats 3

Without the cache every one of the N = 64 steps runs the whole prefix (T + n positions) through the transformer;
with it, step n runs one position against the kept keys and values. Both draw the same tokens from the same
seed (checked here, as tests/test_dalle.py checks the logits). Random weights: the time does not depend on them.
Prints the best of --repeats for each, the speed-up, and the seconds per image with the cache (tokens only; the
dVAE decoder adds little). Target of issue 18: a speed-up of at least 5x at batch 16.
"""
import argparse
import time

import torch

from core.config import load_config
from models.dalle import DalleTransformer, sample_image_tokens
from train.dalle import DalleTrainConfig


def best_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/shapes/dalle.yaml")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--guidance", type=float, default=3.0, help="guidance doubles the batch (null captions)")
    args = p.parse_args()
    cfg = load_config(DalleTrainConfig, args.config).model
    cfg.text_vocab = 512
    torch.manual_seed(0)
    model = DalleTransformer(cfg).eval()
    text = torch.randint(0, cfg.text_vocab, (args.batch, cfg.text_length))
    draw = lambda cache: sample_image_tokens(model, text, guidance=args.guidance, use_cache=cache,
                                             generator=torch.Generator().manual_seed(0))
    t_cache, a = best_time(lambda: draw(True), args.repeats)
    t_full, b = best_time(lambda: draw(False), args.repeats)
    assert torch.equal(a, b), "the KV cache drew other tokens than recomputation"
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg.text_length} text + "
          f"{cfg.image_tokens} image tokens, batch {args.batch}, guidance {args.guidance}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"without cache {t_full:.3f} s | with KV cache {t_cache:.3f} s | speed-up {t_full / t_cache:.1f}x | "
          f"{t_cache / args.batch * 1000:.1f} ms per image with the cache (same tokens: yes)")


if __name__ == "__main__":
    main()
