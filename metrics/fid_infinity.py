"""FID at N -> infinity: FID depends on how many images it is computed from; extrapolate that away.

Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to find them", arXiv 1911.07023
(CVPR 2020), Sec. 3: FID computed from N generated images is biased upwards (even two samples of the same
distribution give FID > 0), and to first order the bias falls as 1/N:

    FID_N = FID_inf + k / N                                                       (Chong & Forsyth Sec. 3)

So FID is computed for random subsets of the generated set A at `points` sizes from N_min to N (linearly
spaced, as their code does), a least-squares line is fitted to FID_N against 1/N, and its intercept at
1/N = 0 is FID_inf: a figure that does not depend on N, so papers that used different N can be compared.
The reference set B keeps all its images throughout (their protocol, with B's statistics precomputed).

    python -m metrics.fid A B --fid-infinity --plot fid_against_n.png     # any two image folders
    python -m metrics.fid_infinity --features runs/shapes_classifier/ckpt.pt --out runs/fid_against_n.png
        # two curves on built-in shapes renders held in memory: A from B's distribution (FID_inf ~ 0) and A
        # of the held-out (colour, shape) pairs; offline (classifier features, not comparable with papers)

The docs figure docs/figures/fid_against_n.png is the first command's plot on exported shapes renders
(the commands are in the README).

Fast subsets: for a subset of n < D images with centred features scaled by 1/sqrt(n - 1), Z (n, D), S_a = Z^T Z
and S_b^(1/2) S_a S_b^(1/2) = G^T G with G = Z S_b^(1/2); its non-zero eigenvalues are those of
G G^T = Z S_b Z^T (n, n): one small eigenvalue problem per subset, and no square root at all.
"""
import argparse
import textwrap

import numpy as np
import torch

from core.runtime import run_cli
from metrics.frechet import psd_eigenvalues, sqrt_factor, stats_of, symmetric


def subset_fid(features, mu_b, sigma_b, factor_b=None):
    """FID of the features (n, D) against B's mean (D,) and covariance (D, D). For n < D the eigenvalues come
    from the n x n matrix Z S_b Z^T; otherwise from F_b^T S_a F_b with S_b = F_b F_b^T (factor_b (D, r),
    computed once by the caller: fid.sqrt_factor)."""
    n, D = features.shape
    x = torch.as_tensor(features).to(torch.float64)
    mu_a = x.mean(dim=0)                                                          # (D,)
    Z = (x - mu_a) / (n - 1) ** 0.5                                               # (n, D): S_a = Z^T Z
    s_b = torch.as_tensor(sigma_b, dtype=torch.float64)
    if n < D:
        small = Z @ s_b @ Z.T                                                     # (n, n)
    else:
        G = Z @ (sqrt_factor(s_b) if factor_b is None else factor_b)              # (n, r)
        small = G.T @ G                                                           # (r, r) = F_b^T S_a F_b
    lam = psd_eigenvalues(torch.linalg.eigvalsh(symmetric(small)))                # those of S_b^1/2 S_a S_b^1/2
    diff = mu_a - torch.as_tensor(mu_b, dtype=torch.float64)
    return (diff @ diff + (Z * Z).sum() + s_b.trace() - 2 * lam.sqrt().sum()).item()  # Heusel Eq. 6


def fid_infinity(features_a, mu_b, sigma_b, points=15, seed=2020, min_n=None):
    """FID_N of random subsets of A (N, D) at `points` sizes, and the fit FID_N = FID_inf + slope / N.
    min_n: the smallest subset (default N / 5, at least 2). Returns a dict of lists and the two fitted numbers."""
    N = features_a.shape[0]
    min_n = max(2, N // 5) if min_n is None else min_n
    if points < 2 or not 2 <= min_n < N:
        raise ValueError(f"FID-infinity needs >= 2 subset sizes between 2 and N - 1 = {N - 1} (got {points} from {min_n}); "
                         f"use more images")
    ns = sorted(set(np.linspace(min_n, N, points).astype(int).tolist()))
    factor_b = sqrt_factor(sigma_b) if ns[-1] >= features_a.shape[1] else None
    rng = np.random.RandomState(seed)
    fids = [subset_fid(features_a[torch.from_numpy(rng.choice(N, n, replace=False))], mu_b, sigma_b, factor_b)
            for n in ns]
    slope, intercept = np.polyfit(1.0 / np.array(ns), np.array(fids), deg=1)     # least squares in 1/N
    return {"n": ns, "fid": fids, "fid_infinity": float(intercept), "slope": float(slope)}


def plot_fid_against_n(fits, path, title=""):
    """fits: one fid_infinity() dict, or {label: dict}. FID_N against 1/N, the fitted lines and FID_inf."""
    import matplotlib
    from matplotlib.figure import Figure  # not pyplot: a notebook that calls this keeps its backend

    fits = fits if "n" not in fits else {"A vs B": fits}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    title = textwrap.fill(title, 95)
    for (label, fit), colour in zip(fits.items(), matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]):
        inv_n = 1.0 / np.array(fit["n"])
        ax.plot(inv_n, fit["fid"], "o", color=colour, label=f"{label}: FID_N of subsets")
        line = np.linspace(0, inv_n.max(), 50)
        ax.plot(line, fit["fid_infinity"] + fit["slope"] * line, "-", color=colour, alpha=0.6,
                label=f"fit: FID_inf = {fit['fid_infinity']:.4g}, slope {fit['slope']:.3g}")
        ax.plot([0], [fit["fid_infinity"]], "*", color=colour, markersize=12)
    x_max = max(1.0 / min(fit["n"]) for fit in fits.values())
    ax.set_xlim(-0.03 * x_max, 1.05 * x_max)                                    # room for the star at 1/N = 0
    ax.set_xlabel("1 / N   (N = images of A in the subset)")
    ax.set_ylabel("FID")
    top = ax.secondary_xaxis("top", functions=(lambda v: 1 / np.maximum(v, 1e-9), lambda v: 1 / np.maximum(v, 1e-9)))
    top.set_xlabel("N")
    top.set_ticks([n for n in (100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000) if 0.1 * x_max <= 1 / n <= x_max])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- the figure in the docs

def build_parser():
    p = argparse.ArgumentParser(description="FID against N on the built-in shapes (the docs figure).")
    p.add_argument("--features", default="runs/shapes_classifier/ckpt.pt", help="shapes classifier checkpoint")
    p.add_argument("--n", type=int, default=5000, help="images of each generated set A")
    p.add_argument("--n-ref", type=int, default=10000, help="images of the reference set B")
    p.add_argument("--points", type=int, default=15)
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--out", default="runs/fid_against_n.png")
    return p


def main(argv=None):
    """B: renders of the training split (seed 1). A, same distribution: renders of seed 2 (FID_inf should be
    ~0, yet every FID_N is > 0); A, shifted: renders of the held-out (colour, shape) pairs."""
    from pathlib import Path

    from data.shapes import render_dataset
    from metrics.features import image_batches, load_feature_net

    args = build_parser().parse_args(argv)
    net = load_feature_net(args.features)
    resolution = net.model.cfg.resolution

    def features_of(n, seed, split):
        images = render_dataset(n, resolution, seed=seed, split=split, progress=False)[0]    # (n, R, R, 3)
        images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()                  # (n, 3, R, R)
        return torch.cat([net(batch) for batch in image_batches(images, 500)])              # (n, D)

    mu_b, sigma_b = stats_of(features_of(args.n_ref, 1, "train"))
    fits = {}
    for label, seed, split in (("same distribution (train split, seed 2)", 2, "train"),
                               ("held-out (colour, shape) pairs", 3, "heldout")):
        fit = fid_infinity(features_of(args.n, seed, split), mu_b, sigma_b, args.points, args.seed)
        fits[label] = fit
        print(f"{label}: FID_N {fit['fid'][0]:.4f} at N = {fit['n'][0]} ... {fit['fid'][-1]:.4f} at N = "
              f"{fit['n'][-1]}; FID-infinity {fit['fid_infinity']:.4f} (slope {fit['slope']:.1f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_fid_against_n(fits, args.out, title=f"FID against N, {args.n_ref} reference renders at {resolution} px; "
                                             f"features: {net.description}")
    print(f"wrote {args.out} ({net.description})")


if __name__ == "__main__":
    run_cli(main)
