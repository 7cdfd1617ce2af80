"""The Frechet distance between two Gaussians fitted to feature sets, and the statistics it needs: the arithmetic
of FID (Heusel et al. 2017, arXiv 1706.08500, Eq. 6), KID-free and network-free, used by metrics/fid.py (the command
line) and metrics/fid_infinity.py (FID of subsets against 1/N).

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))                              (Heusel Eq. 6)

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
from pathlib import Path

import numpy as np
import torch

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
