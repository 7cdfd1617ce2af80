"""Frechet Inception Distance, and the command line of all the distribution metrics.

Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
arXiv 1706.08500: fit a Gaussian to the Inception pool3 features of each image set and report the Frechet
(2-Wasserstein) distance between the two Gaussians (Dowson & Landau 1982),

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))                              (Heusel Eq. 6)

    python -m metrics.fid A B                         # A, B: image folders or statistics files (.npz)
    python -m metrics.fid --save-stats A stats.npz    # A's statistics, for pytorch-fid too
    python -m metrics.fid A B --kid --isc --prc       # + KID, Inception Score (of A), precision/recall
    python -m metrics.fid A B --fid-infinity --plot fid_against_n.png   # FID at N -> infinity
    python -m metrics.fid A B --features runs/shapes_classifier/ckpt.pt  # offline: NOT comparable with papers

A holds the generated images, B the reference (real) images. --features inception needs the published
weights (--inception-weights or $FID_INCEPTION_WEIGHTS, see metrics/inception.py). Prints one line per metric,
each naming the feature network and preprocessing; bad input is one line `error: ...` and exit code 2.

How the numbers are computed:
- Statistics: float64 mean and covariance (N - 1 in the denominator, as numpy.cov), accumulated batch by
  batch with Chan et al.'s pairwise update (memory D^2 whatever N), equal to numpy.cov over all features.
- Tr (S_1 S_2)^(1/2): S_1 S_2 is not symmetric, but it is similar to M = S_1^(1/2) S_2 S_1^(1/2), which is
  symmetric positive semi-definite (M = A^T A with A = S_2^(1/2) S_1^(1/2)); so Tr (S_1 S_2)^(1/2) =
  sum_i sqrt(lambda_i(M)), from one eigenvalues-only symmetric eigendecomposition of M rotated into F^T S_2 F,
  where F F^T = S_1 is Cholesky's factor or, for a singular S_1 (N <= D), the eigen factor V diag(sqrt w)
  (trace_sqrt_product). pytorch-fid's scipy.linalg.sqrtm (a Schur decomposition of the non-symmetric
  S_1 S_2) gives the same figure (tests: to 1e-6 relative, also for N < D) ~7x slower at D = 2048
  (tests/bench_fid.py), and sometimes a complex number for singular covariances; this never does.
- Statistics files: pytorch-fid's layout (`mu`, `sigma`, float64), plus `n` and `features` (which network
  made them); either program reads the other's files.

Notation: mu_i (D,) and S_i (D, D) are the mean and covariance of set i; N images; D feature dimension.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from train.common import get_device, run_cli


# ---------------------------------------------------------------- statistics

class RunningStats:
    """Mean and covariance of feature vectors that arrive in batches, in float64, in O(D^2) memory.

    Chan, Golub & LeVeque 1979 (the pairwise update): merging a batch b of n_b vectors with mean m_b and
    scatter M_b = sum (x - m_b)(x - m_b)^T into the running (n, m, M):
        delta = m_b - m;  n' = n + n_b;  m' = m + delta n_b / n';  M' = M + M_b + delta delta^T n n_b / n'
    and the covariance is M / (N - 1). Centring every batch first avoids the cancellation of sum x x^T - N m m^T.
    """

    def __init__(self, dim):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features):
        B, D = features.shape
        assert D == self.mean.shape[0], f"features of dimension {D}, statistics of {self.mean.shape[0]}"
        x = features.detach().to("cpu", torch.float64)                           # (B, D)
        batch_mean = x.mean(dim=0)                                                # (D,)
        centred = x - batch_mean                                                  # (B, D)
        n, n_new = self.n, self.n + B
        delta = batch_mean - self.mean                                            # (D,)
        self.mean += delta * (B / n_new)
        self.scatter += centred.T @ centred + torch.outer(delta, delta) * (n * B / n_new)  # (D, D)
        self.n = n_new
        return self

    def mu_sigma(self):
        """numpy float64 mu (D,) and sigma (D, D), as pytorch-fid computes them."""
        if self.n < 2:
            raise ValueError(f"statistics of {self.n} image(s); a covariance needs at least 2")
        return self.mean.numpy().copy(), (self.scatter / (self.n - 1)).numpy()


def stats_of(features):
    """All features at once (N, D) -> (mu, sigma); the same as a RunningStats fed batch by batch."""
    return RunningStats(features.shape[1]).update(features).mu_sigma()


# ---------------------------------------------------------------- the Frechet distance

def symmetric(sigma):
    """float64 tensor, exactly symmetric (files and float64 sums may carry rounding)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return (sigma + sigma.T) / 2


def psd_eigenvalues(lam):
    """Eigenvalues of a symmetric PSD matrix as computed (D,) -> those below the rounding floor set to 0.
    A singular covariance (N <= D) has exact zeros that come out as +-1e-16 ||S||; their square roots
    (1e-8 sqrt||S|| each, D - N of them) would bias the trace. The floor is numpy.linalg.matrix_rank's:
    max|lam| * D * eps."""
    if lam.numel() == 0:
        return lam
    floor = lam.abs().max() * lam.shape[0] * torch.finfo(lam.dtype).eps
    return torch.where(lam > floor, lam, torch.zeros_like(lam))


def root_factor(sigma):
    """P = V_+ diag(sqrt(w_+)) from S = V diag(w) V^T (symmetric PSD, (D, D)), keeping the r eigenvalues
    above the rounding floor: S = P P^T (D, r) and S^(1/2) = P V_+^T."""
    w, V = torch.linalg.eigh(symmetric(sigma))                # (D,), (D, D)
    keep = psd_eigenvalues(w) > 0                             # (D,) bool, r of them True
    return V[:, keep] * w[keep].sqrt()                        # (D, r): column i scaled by sqrt(w_i)


def sqrt_factor(sigma):
    """Some F (D, r) with F F^T = S (symmetric PSD (D, D)). Positive definite S (N > D, the usual case):
    Cholesky's lower-triangular L, D^3/3 flops. Singular S (N <= D, or features that are constant or
    linearly dependent): Cholesky fails and the eigen factor root_factor is used, ~10x the flops."""
    S = symmetric(sigma)
    L, info = torch.linalg.cholesky_ex(S)
    return L if info.item() == 0 else root_factor(S)


def trace_sqrt_product(sigma1, sigma2):
    """Tr (S_1 S_2)^(1/2) = sum_i sqrt(lambda_i(S_1^(1/2) S_2 S_1^(1/2))), the symmetric eigen route: S_1 S_2
    is similar to S_1^(1/2) S_2 S_1^(1/2), which is symmetric PSD. Any factor S_1 = F F^T gives that matrix's
    non-zero eigenvalues without forming the root: F = S_1^(1/2) U with U^T U = I (U = S_1^(-1/2) L for
    Cholesky's L; U = V_+ for the eigen factor), so M = F^T S_2 F = U^T (S_1^(1/2) S_2 S_1^(1/2)) U.
    Cost for D = 2048: one Cholesky, two products, one eigenvalues-only eigh (eigh with vectors for singular
    S_1, three times the time)."""
    F = sqrt_factor(sigma1)                                   # (D, r)
    if F.shape[1] == 0:                                       # S_1 = 0: a set of identical images
        return 0.0
    M = F.T @ symmetric(sigma2) @ F                           # (r, r) symmetric PSD
    lam = psd_eigenvalues(torch.linalg.eigvalsh(symmetric(M)))  # (r,)
    return lam.sqrt().sum().item()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Heusel Eq. 6 between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} / {mu2.shape}, sigma "
                         f"{sigma1.shape} / {sigma2.shape}; they were made with different feature networks")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


# ---------------------------------------------------------------- statistics files

def save_stats(path, mu, sigma, n, features):
    """pytorch-fid's npz (mu, sigma) plus the number of images and the feature network's description."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics files end in .npz (numpy's savez appends it otherwise), got {path}")
    if path.exists():
        raise ValueError(f"{path} exists; remove it or choose another name (statistics are never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, mu=mu, sigma=sigma, n=np.int64(n), features=np.str_(features))


def load_stats(path):
    """-> (mu, sigma, n or None, features description or None); pytorch-fid's files have only mu and sigma."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"statistics file {path} not found (make one with --save-stats FOLDER {path})")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (it has {', '.join(f.files) or 'none'}); "
                                 f"it is not a statistics file")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f else None
            features = str(f["features"]) if "features" in f else None
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read statistics file {path} ({type(e).__name__}); it is corrupt or not an npz") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return mu, sigma, n, features


# ---------------------------------------------------------------- command line

def build_parser():
    p = argparse.ArgumentParser(description="FID (and KID, IS, precision/recall) between two image sets.",
                                epilog="A: generated images; B: reference images. Each an image folder or, for "
                                       "FID, an .npz statistics file (pytorch-fid's or ours).")
    p.add_argument("paths", nargs=2, metavar="PATH", help="A and B; with --save-stats: the folder and the .npz")
    p.add_argument("--features", default="inception",
                   help="inception (needs the published weights) or a shapes classifier checkpoint (offline; "
                        "NOT comparable with published FIDs)")
    p.add_argument("--inception-weights", default="",
                   help="pt_inception-2015-12-05-6726825d.pth (default: $FID_INCEPTION_WEIGHTS)")
    p.add_argument("--resize", choices=["pytorch-fid", "tf1"], default="pytorch-fid",
                   help="Inception preprocessing: pytorch-fid's bilinear resize or TF1's (torch-fidelity, TTUR)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--save-stats", action="store_true", help="write the statistics of folder A to the .npz B")
    p.add_argument("--kid", action="store_true", help="also KID (Binkowski et al. 2018)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000, help="(cut to the smaller set's size)")
    p.add_argument("--isc", action="store_true", help="also the Inception Score of A (10 splits)")
    p.add_argument("--prc", action="store_true", help="also precision and recall (Kynkaanniemi et al. 2019, k=3)")
    p.add_argument("--fid-infinity", action="store_true",
                   help="also FID at N -> infinity: FID of random subsets of A fitted against 1/N (Chong & Forsyth 2020)")
    p.add_argument("--fid-infinity-points", type=int, default=15, help="subset sizes for the fit")
    p.add_argument("--plot", help="with --fid-infinity: a PNG of FID against 1/N with the fitted line")
    p.add_argument("--seed", type=int, default=2020, help="subsets of KID, IS and FID-infinity (torch-fidelity's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def folder_features(folder, net, args, keep):
    """Statistics of an image folder (streamed), and all its features when `keep` (KID, IS, PR, FID-inf)."""
    from metrics.features import check_images, extract, list_images, read_batches

    files = list_images(folder)
    H, W = check_images(files)
    stats, kept = RunningStats(net.dim), []
    for features in extract(net, read_batches(files, args.batch_size), total=len(files),
                            desc=f"{Path(folder).name} ({len(files)} x {W}x{H})", progress=not args.no_progress):
        stats.update(features)
        if keep:
            kept.append(features)
    return stats, (torch.cat(kept) if keep else None)


def main(argv=None):
    """Prints the figures; returns them as a dict (fid, and kid / isc / precision / recall / fid_infinity when
    asked, features, n_a, n_b) for callers such as sample/demo.py."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.plot and not args.fid_infinity:
        raise ValueError("--plot draws the FID-infinity fit; add --fid-infinity")
    if args.isc and args.features != "inception":
        raise ValueError("the Inception Score needs --features inception (a class distribution over ImageNet); "
                         "a shapes classifier has no single class output")
    from metrics.features import load_feature_net

    a, b = (Path(p) for p in args.paths)
    is_stats = [p.suffix == ".npz" for p in (a, b)]
    if args.save_stats:
        if is_stats[0] or not is_stats[1]:
            raise ValueError("--save-stats reads an image folder and writes an .npz: --save-stats FOLDER OUT.npz")
        if b.exists():
            raise ValueError(f"{b} exists; remove it or choose another name (statistics are never overwritten)")
    if is_stats[0] and (args.kid or args.isc or args.prc or args.fid_infinity):
        raise ValueError(f"{a} is a statistics file; KID, IS, precision/recall and FID-infinity need the images of A")
    if is_stats[1] and (args.kid or args.prc):
        raise ValueError(f"{b} is a statistics file; KID and precision/recall need the images of B")

    net = None
    if not all(is_stats):
        net = load_feature_net(args.features, args.inception_weights, args.resize, get_device(args.device))
    if args.save_stats:
        stats, _ = folder_features(a, net, args, keep=False)
        mu, sigma = stats.mu_sigma()
        save_stats(b, mu, sigma, stats.n, net.description)
        print(f"saved statistics of {stats.n} images of {a} to {b} ({net.description})")
        return

    sides = []
    for path, stats_file, keep in ((a, is_stats[0], args.kid or args.isc or args.prc or args.fid_infinity),
                                   (b, is_stats[1], args.kid or args.prc)):
        if stats_file:
            mu, sigma, n, described = load_stats(path)
            sides.append({"mu": mu, "sigma": sigma, "n": n, "features": described, "all": None})
        else:
            stats, kept = folder_features(path, net, args, keep)
            mu, sigma = stats.mu_sigma()
            sides.append({"mu": mu, "sigma": sigma, "n": stats.n, "features": net.description, "all": kept})
    description = check_same_features(sides, net, args)
    count = lambda s: f"{s['n']}" if s["n"] is not None else "?"

    fid = frechet_distance(sides[0]["mu"], sides[0]["sigma"], sides[1]["mu"], sides[1]["sigma"])
    print(f"FID: {fid:.6f}  (A: {count(sides[0])} images, B: {count(sides[1])} images; {description})")
    results = {"fid": fid, "features": description, "n_a": sides[0]["n"], "n_b": sides[1]["n"]}
    if args.fid_infinity:
        from metrics.fid_infinity import fid_infinity, plot_fid_against_n

        fit = fid_infinity(sides[0]["all"], sides[1]["mu"], sides[1]["sigma"], args.fid_infinity_points, args.seed)
        results["fid_infinity"] = float(fit["fid_infinity"])
        print(f"FID-infinity: {fit['fid_infinity']:.6f}  (FID_N = {fit['fid_infinity']:.4f} + {fit['slope']:.1f} / N "
              f"fitted on {len(fit['n'])} subset sizes {fit['n'][0]}..{fit['n'][-1]} of A; {description})")
        if args.plot:
            plot_fid_against_n({f"A = {a.name}, B = {b.name}": fit}, args.plot,
                               title=f"FID of subsets of A ({count(sides[0])} images) against all of B "
                                     f"({count(sides[1])}); features: {description}")
            print(f"wrote {args.plot}")
    if args.kid:
        from metrics.kid import kernel_inception_distance

        size = min(args.kid_subset_size, len(sides[0]["all"]), len(sides[1]["all"]))
        mean, std = kernel_inception_distance(sides[0]["all"], sides[1]["all"], args.kid_subsets, size, args.seed)
        results["kid"] = (float(mean), float(std))
        print(f"KID: {mean:.6f} +- {std:.6f}  ({args.kid_subsets} subsets of {size}; {description})")
    if args.isc:
        from metrics.inception_score import inception_score

        mean, std = inception_score(net.logits(sides[0]["all"]), splits=10, shuffle_seed=args.seed)
        results["isc"] = (float(mean), float(std))
        print(f"IS: {mean:.6f} +- {std:.6f}  (of A, 10 splits; logits without bias; {description})")
    if args.prc:
        from metrics.precision_recall import precision_recall

        precision, recall = precision_recall(sides[0]["all"], sides[1]["all"], k=3)
        print(f"precision: {precision:.6f}  recall: {recall:.6f}  (k = 3; {description})")
        results["precision"], results["recall"] = float(precision), float(recall)
    return results


def check_same_features(sides, net, args):
    """Both sides must come from the same feature network; a pytorch-fid file (no description) is taken for
    Inception pool3 with pytorch-fid's preprocessing. Returns the description to print."""
    described = [s["features"] or "Inception pool3 (2048-d, pytorch-fid preprocessing)" for s in sides]
    for s, path in zip(sides, args.paths):
        if s["features"] is None:
            print(f"note: {path} does not say which network made it (pytorch-fid's file?); taken for Inception "
                  f"pool3 with pytorch-fid preprocessing")
    if described[0] != described[1]:
        raise ValueError(f"the two sides come from different feature networks: '{described[0]}' vs '{described[1]}'; "
                         f"compute both with the same --features and --resize")
    return described[0]


if __name__ == "__main__":
    run_cli(main)
