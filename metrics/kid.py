"""Kernel Inception Distance: the squared maximum mean discrepancy between two feature sets, unbiased.

Binkowski, Sutherland, Arbel & Gretton 2018, "Demystifying MMD GANs", arXiv 1801.01401, Sec. 3 (KID): FID's
estimator is biased (its expectation depends on N, see metrics/fid_infinity.py); the unbiased estimator of
MMD^2 (Gretton et al. 2012, JMLR, Lemma 6) is not, so KID's expectation is 0 for two samples of one
distribution, at any N. With the polynomial kernel of degree 3 on D-dimensional features

    k(x, y) = (x . y / D + 1)^3                                                        (Binkowski Sec. 3)
    MMD^2_u = 1 / (m (m - 1)) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] - 2 / m^2 sum_{i, j} k(x_i, y_j)
                                                                                     (Gretton Lemma 6)

averaged over `subsets` random subsets of m = `subset_size` images from each side (drawn without
replacement, by numpy's RandomState(seed).choice as torch-fidelity does, so that the same seed gives
torch-fidelity's subsets). Reports the mean and standard deviation over the subsets; the paper's figures
are usually x 1000.

Computed in float64 (torch-fidelity: float32). Notation: X (m, D) generated, Y (m, D) reference features.
"""
import numpy as np
import torch


def polynomial_kernel(X, Y, degree=3, gamma=None, coef0=1.0):
    """k(x, y) = (gamma x . y + coef0)^degree for all pairs: (m, D), (n, D) -> (m, n); gamma = 1 / D by default."""
    gamma = 1.0 / X.shape[1] if gamma is None else gamma
    return (X @ Y.T * gamma + coef0) ** degree


def mmd2_unbiased(K_XX, K_XY, K_YY):
    """Gretton Lemma 6 from the three kernel matrices (m, m): the diagonals k(x_i, x_i) are left out of the
    within-set sums, every pair counts in the cross term."""
    m = K_XX.shape[0]
    assert K_XX.shape == K_XY.shape == K_YY.shape == (m, m), "subsets of equal size m"
    within = (K_XX.sum() - K_XX.diagonal().sum() + K_YY.sum() - K_YY.diagonal().sum()) / (m * (m - 1))
    return within - 2 * K_XY.sum() / (m * m)


def kernel_inception_distance(features_x, features_y, subsets=100, subset_size=1000, seed=2020,
                              degree=3, gamma=None, coef0=1.0):
    """Mean and std of MMD^2_u over random subsets. features (N_x, D) and (N_y, D), tensors or arrays."""
    X_all = torch.as_tensor(features_x).to(torch.float64)
    Y_all = torch.as_tensor(features_y).to(torch.float64)
    (N_x, D), (N_y, D_y) = X_all.shape, Y_all.shape
    if D != D_y:
        raise ValueError(f"KID between features of dimension {D} and {D_y}")
    if subset_size < 2 or subset_size > min(N_x, N_y):
        raise ValueError(f"KID subset size {subset_size} must be between 2 and the smaller set's size {min(N_x, N_y)}")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for s in range(subsets):
        X = X_all[torch.from_numpy(rng.choice(N_x, subset_size, replace=False))]  # (m, D)
        Y = Y_all[torch.from_numpy(rng.choice(N_y, subset_size, replace=False))]  # (m, D)
        kernel = lambda a, b: polynomial_kernel(a, b, degree, gamma, coef0)
        mmds[s] = mmd2_unbiased(kernel(X, X), kernel(X, Y), kernel(Y, Y)).item()
    return float(mmds.mean()), float(mmds.std())
