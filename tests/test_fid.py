"""Tests for metrics/fid.py, metrics/fid_infinity.py and metrics/features.py: streaming statistics equal
numpy.cov; the Frechet distance equals the closed form between Gaussians, is 0 for a set with itself, and
equals pytorch-fid's scipy.linalg.sqrtm route (also for N < D); statistics files go both ways between
pytorch-fid and us; the command line end to end (Inception with random weights against pytorch-fid's own
pipeline, the classifier features offline) and its one-line errors; FID-infinity's subsets and fit; KID and
the Inception Score against torch-fidelity and their identities; precision/recall against the paper's
definition evaluated literally and by hand."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.checkpoint import save_checkpoint
from core.config import config_to_dict
from data.shapes import render_dataset
from metrics import fid as fid_cli
from metrics import fid_infinity as fid_infinity_cli
from metrics import precision_recall as prc
from metrics.fid_infinity import fid_infinity, plot_fid_against_n, subset_fid
from metrics.frechet import (RunningStats, frechet_distance, load_stats, psd_eigenvalues, root_factor, save_stats,
                             sqrt_factor, stats_of, trace_sqrt_product)
from metrics.inception_score import inception_score
from metrics.kid import kernel_inception_distance, polynomial_kernel
from models.classifier import ClassifierConfig, ShapesClassifier
from tests.test_inception import import_references, pytorch_fid_twin, random_inception
from tests.test_train_diffusion import cli_error

ROOT = Path(__file__).resolve().parents[1]


def mixing(d):
    """The (d, d) matrix W of gaussian_features: x = z W + shift + 1, z ~ N(0, I), so x ~ N(shift + 1, W^T W)."""
    return torch.randn(d, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) / d ** 0.5


def gaussian_features(n, d, seed, shift=0.0):
    """n samples (float64) of one correlated, non-centred Gaussian per d (the mixing matrix depends on d only)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing(d) + shift + 1


def gaussian_population(d, shift=0.0):
    """The exact mean (d,) and covariance (d, d) that gaussian_features samples from."""
    W = mixing(d)
    return np.full(d, shift + 1.0), (W.T @ W).numpy()


def scipy_route(mu1, s1, mu2, s2):
    import_references()
    from pytorch_fid.fid_score import calculate_frechet_distance

    return calculate_frechet_distance(mu1, s1, mu2, s2)


# ---------------------------------------------------------------- statistics and the distance

def test_streaming_statistics_equal_numpy_cov():
    x = gaussian_features(203, 24, seed=0)
    stats = RunningStats(24)
    for batch in (x[:1], x[1:50], x[50:51], x[51:]):  # uneven batches, two of a single vector
        stats.update(batch)
    mu, sigma = stats.mu_sigma()
    np.testing.assert_allclose(mu, x.numpy().mean(0), rtol=0, atol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False), rtol=0, atol=1e-13)
    assert stats.n == 203 and sigma.dtype == np.float64
    with pytest.raises(ValueError, match="at least 2"):
        RunningStats(3).update(torch.zeros(1, 3)).mu_sigma()


def test_closed_form_between_gaussians():
    """Isotropic: FID = ||mu1 - mu2||^2 + D (a - b)^2 for a^2 I and b^2 I. Commuting (same eigenvectors Q):
    FID = ||mu1 - mu2||^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2."""
    D = 50
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(D, generator=g).double().numpy(), torch.randn(D, generator=g).double().numpy()
    a, b = 1.5, 0.7
    expected = ((mu1 - mu2) ** 2).sum() + D * (a - b) ** 2
    assert frechet_distance(mu1, a * a * np.eye(D), mu2, b * b * np.eye(D)) == pytest.approx(expected, rel=1e-12)
    Q, _ = np.linalg.qr(torch.randn(D, D, generator=g).double().numpy())
    s1, s2 = np.linspace(0.1, 4, D), np.linspace(3, 0.01, D)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    got = frechet_distance(mu1, Q @ np.diag(s1) @ Q.T, mu2, Q @ np.diag(s2) @ Q.T)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n", [500, 40])  # N > D and N < D (singular covariances)
def test_fid_of_a_set_with_itself_is_zero(n):
    mu, sigma = stats_of(gaussian_features(n, 64, seed=1))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)


@pytest.mark.parametrize("n,d", [(600, 128), (60, 128), (300, 300)])
def test_equals_pytorch_fid_sqrtm_route(n, d):
    """pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm of S_1 S_2) to 1e-6 relative, also
    when N < D, where both covariances are singular."""
    (mu1, s1), (mu2, s2) = stats_of(gaussian_features(n, d, seed=2)), stats_of(gaussian_features(n + 3, d, 3, 0.2))
    ours, theirs = frechet_distance(mu1, s1, mu2, s2), scipy_route(mu1, s1, mu2, s2)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert ours > 1  # not a trivially small number


def test_singular_case_equals_the_gram_route():
    """N < D: the non-zero eigenvalues of S_2^(1/2) S_1 S_2^(1/2) also come from the N x N matrix Z S_2 Z^T
    (fid_infinity.subset_fid), which never sees the D - N zero eigenvalues; the eigen route drops them
    as rounding noise and agrees to 1e-12, while sqrtm is off by ~1e-8."""
    a, b = gaussian_features(40, 200, seed=4), gaussian_features(300, 200, seed=5, shift=0.1)
    (mu1, s1), (mu2, s2) = stats_of(a), stats_of(b)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(subset_fid(a, mu2, s2), rel=1e-12)
    # and the symmetric route is symmetric in its arguments although it takes the root of only one
    assert trace_sqrt_product(s1, s2) == pytest.approx(trace_sqrt_product(s2, s1), rel=1e-12)


def test_cholesky_and_eigen_factors_give_the_same_trace():
    """trace_sqrt_product takes Cholesky's factor of a positive definite S_1 and the eigen factor of a singular
    one; any F with F F^T = S_1 must give the same Tr (S_1 S_2)^(1/2), so the two routes agree on one pair."""
    (_, s1), (_, s2) = stats_of(gaussian_features(400, 96, seed=11)), stats_of(gaussian_features(300, 96, 12, 0.3))
    L, P = sqrt_factor(s1), root_factor(s1)
    assert torch.equal(L, L.tril()) and P.shape == (96, 96)                      # positive definite: Cholesky
    for F in (L, P):
        assert torch.allclose(F @ F.T, torch.from_numpy(s1), rtol=0, atol=1e-12 * np.abs(s1).max())
    M = P.T @ torch.from_numpy(s2) @ P
    by_eigen = psd_eigenvalues(torch.linalg.eigvalsh((M + M.T) / 2)).sqrt().sum().item()
    assert trace_sqrt_product(s1, s2) == pytest.approx(by_eigen, rel=1e-12)
    _, singular = stats_of(gaussian_features(30, 96, seed=13))                   # rank 29
    F = sqrt_factor(singular)
    assert F.shape == (96, 29) and torch.allclose(F @ F.T, torch.from_numpy(singular), rtol=0,
                                                  atol=1e-12 * np.abs(singular).max())
    assert trace_sqrt_product(np.zeros((4, 4)), np.eye(4)) == 0.0               # identical images: S_1 = 0


def test_dimension_mismatch_is_an_error():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- statistics files

def test_statistics_files_go_both_ways_with_pytorch_fid(tmp_path):
    import_references()
    from pytorch_fid.fid_score import compute_statistics_of_path

    mu, sigma = stats_of(gaussian_features(100, 16, seed=6))
    ours = tmp_path / "ours.npz"
    save_stats(ours, mu, sigma, 100, "test features")
    m, s = compute_statistics_of_path(str(ours), None, 1, 16, "cpu")              # pytorch-fid reads ours
    assert np.array_equal(m, mu) and np.array_equal(s, sigma)
    theirs = tmp_path / "theirs.npz"
    np.savez_compressed(theirs, mu=mu, sigma=sigma)                               # pytorch-fid's save_fid_stats
    m, s, n, described = load_stats(theirs)                                       # we read theirs
    assert np.array_equal(m, mu) and np.array_equal(s, sigma) and n is None and described is None
    assert load_stats(ours)[2:] == (100, "test features")
    with pytest.raises(ValueError, match="never overwritten"):
        save_stats(ours, mu, sigma, 100, "test features")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="no 'mu' and 'sigma'"):
        load_stats(tmp_path / "other.npz")


# ---------------------------------------------------------------- the command line

def write_images(folder, n, size=32, seed=0, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    images = render_dataset(n, size, seed=seed, progress=False)[0]
    for i, image in enumerate(images):
        Image.fromarray(image).convert(mode).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    """A shapes classifier checkpoint with random weights: features differ between images, nothing trains."""
    torch.manual_seed(0)
    cfg = ClassifierConfig()
    path = tmp_path_factory.mktemp("classifier") / "ckpt.pt"
    save_checkpoint(path, {"kind": "shapes_classifier", "config": {"model": config_to_dict(cfg)},
                           "model": ShapesClassifier(cfg).state_dict()})
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return write_images(root / "a", 12, seed=1), write_images(root / "b", 10, seed=2)


def test_cli_inception_statistics_equal_pytorch_fid(tmp_path, monkeypatch, capsys):
    """End to end on a folder: our --save-stats with the Inception (random weights, given through
    FID_INCEPTION_WEIGHTS) against pytorch-fid's compute_statistics_of_path with its own InceptionV3 holding the
    same weights; then FID, KID, IS and precision/recall of the folders through the command line."""
    model = random_inception()
    weights = tmp_path / "inception.pth"
    torch.save(model.state_dict(), weights)
    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(weights))
    a, b = write_images(tmp_path / "a", 10, seed=1), write_images(tmp_path / "b", 4, seed=2)
    fid_cli.main(["--save-stats", str(a), str(tmp_path / "a.npz"), "--batch-size", "4", "--no-progress"])
    mu, sigma, n, described = load_stats(tmp_path / "a.npz")
    assert n == 10 and described == "Inception pool3 (2048-d, pytorch-fid preprocessing)"

    import_references()
    from pytorch_fid.fid_score import compute_statistics_of_path

    m, s = compute_statistics_of_path(str(a), pytorch_fid_twin(model), 4, 2048, "cpu", num_workers=0)
    scale = np.abs(s).max()
    assert np.abs(mu - m).max() < 1e-5 * np.abs(m).max() and np.abs(sigma - s).max() < 1e-5 * scale

    capsys.readouterr()
    fid_cli.main([str(a), str(b), "--kid", "--kid-subset-size", "4", "--kid-subsets", "3", "--isc", "--prc",
                  "--batch-size", "8", "--no-progress"])
    out = capsys.readouterr().out
    for line in ("FID: ", "KID: ", "IS: ", "precision: "):
        assert line in out and "Inception pool3 (2048-d, pytorch-fid preprocessing)" in out
    assert "NOT comparable" not in out
    capsys.readouterr()
    fid_cli.main([str(tmp_path / "a.npz"), str(b), "--batch-size", "8", "--no-progress"])  # a file and a folder
    via_file = float(capsys.readouterr().out.split()[1])
    assert via_file == pytest.approx(float(out.split()[1]), rel=1e-9)


def test_cli_classifier_features_offline(folders, classifier_ckpt, tmp_path, capsys):
    """--features <checkpoint>: FID of a folder with itself is 0; statistics files work the same way; every
    figure says it is not comparable with published FIDs."""
    a, b = folders
    fid_cli.main([str(a), str(a), "--features", classifier_ckpt, "--no-progress"])
    out = capsys.readouterr().out
    assert abs(float(out.split()[1])) < 1e-8 and "NOT comparable with published FIDs" in out
    fid_cli.main(["--save-stats", str(b), str(tmp_path / "b.npz"), "--features", classifier_ckpt, "--no-progress"])
    assert "NOT comparable" in capsys.readouterr().out
    fid_cli.main([str(a), str(b), "--features", classifier_ckpt, "--kid", "--kid-subset-size", "5", "--prc",
                  "--fid-infinity", "--fid-infinity-points", "3", "--plot", str(tmp_path / "fid_n.png"),
                  "--no-progress"])
    out = capsys.readouterr().out
    figures = [line for line in out.splitlines() if line.split(":")[0] in ("FID", "KID", "FID-infinity", "precision")]
    assert len(figures) == 4 and all("NOT comparable with published FIDs" in line for line in figures)
    assert (tmp_path / "fid_n.png").stat().st_size > 1000
    fid_cli.main([str(a), str(tmp_path / "b.npz"), "--features", classifier_ckpt, "--no-progress"])
    assert capsys.readouterr().out.split()[1] == out.split()[1]  # the file gives B's exact statistics


def test_python_m_metrics_fid_runs(folders, classifier_ckpt):
    a, b = folders
    run = subprocess.run([sys.executable, "-m", "metrics.fid", str(a), str(b), "--features", classifier_ckpt],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("FID: ") and "img" in run.stderr  # the figure, and a progress bar
    bad = subprocess.run([sys.executable, "-m", "metrics.fid", str(a), str(a / "000.png")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")


def test_cli_errors_are_one_line(folders, classifier_ckpt, tmp_path, capsys, monkeypatch):
    a, b = folders
    feats = ["--features", classifier_ckpt, "--no-progress"]
    one = write_images(tmp_path / "one", 1)
    assert "at least 2" in cli_error(fid_cli.main, [str(one), str(b), *feats], capsys)
    junk = write_images(tmp_path / "junk", 3)
    (junk / "notes.txt").write_text("hello")
    (junk / "metadata.jsonl").write_text("{}\n")  # an imagefolder's captions are skipped, not an error
    assert "not images (e.g. notes.txt)" in cli_error(fid_cli.main, [str(junk), str(b), *feats], capsys)
    mixed = write_images(tmp_path / "mixed", 3)
    write_images(tmp_path / "mixed_big", 1, size=48)
    (tmp_path / "mixed_big" / "000.png").rename(mixed / "big.png")
    assert "mixed sizes" in cli_error(fid_cli.main, [str(mixed), str(b), *feats], capsys)
    grey = write_images(tmp_path / "grey", 3, mode="L")
    assert "greyscale" in cli_error(fid_cli.main, [str(grey), str(b), *feats], capsys)
    broken = write_images(tmp_path / "broken", 3)
    (broken / "001.png").write_bytes(b"not a png")
    assert "cannot read image" in cli_error(fid_cli.main, [str(broken), str(b), *feats], capsys)
    assert "neither an image folder" in cli_error(fid_cli.main, [str(tmp_path / "nope"), str(b), *feats], capsys)
    fid_cli.main(["--save-stats", str(a), str(tmp_path / "a.npz"), *feats])
    assert "exists" in cli_error(fid_cli.main, ["--save-stats", str(a), str(tmp_path / "a.npz"), *feats], capsys)
    assert "need the images" in cli_error(fid_cli.main, [str(tmp_path / "a.npz"), str(b), "--kid", *feats], capsys)
    assert "Inception Score needs" in cli_error(fid_cli.main, [str(a), str(b), "--isc", *feats], capsys)
    assert "not found" in cli_error(fid_cli.main, [str(a), str(tmp_path / "missing.npz"), *feats], capsys)
    np.savez(tmp_path / "pfid.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # pytorch-fid's: Inception assumed
    assert "different feature networks" in cli_error(fid_cli.main, [str(a), str(tmp_path / "pfid.npz"), *feats],
                                                     capsys)
    assert "nor an existing checkpoint" in cli_error(fid_cli.main, [str(a), str(b), "--features", "x.pt"], capsys)
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    assert "FID_INCEPTION_WEIGHTS" in cli_error(fid_cli.main, [str(a), str(b)], capsys)
    assert "--plot draws" in cli_error(fid_cli.main, [str(a), str(b), "--plot", "x.png", *feats], capsys)


# ---------------------------------------------------------------- FID at N -> infinity

@pytest.mark.parametrize("n", [30, 80])  # the N x N route (N < D) and the D x D route
def test_subset_fid_equals_frechet_distance(n):
    a, b = gaussian_features(n, 48, seed=7), gaussian_features(200, 48, seed=8, shift=0.3)
    mu_b, s_b = stats_of(b)
    expected = frechet_distance(*stats_of(a), mu_b, s_b)
    assert subset_fid(a, mu_b, s_b) == pytest.approx(expected, rel=1e-10)
    assert subset_fid(a, mu_b, s_b, root_factor(s_b)) == pytest.approx(expected, rel=1e-10)


def expected_bias_slope(sigma):
    """k in E[FID_N] = FID_inf + k / N + O(1 / N^2) for N samples of N(mu, S) against the exact (mu, S), the
    eigenvalues of S being l_i. The mean's error adds E||mu_N - mu||^2 = Tr S / N. The covariance's error
    E = S_N - S (Wishart: E[E_ij^2] = (l_i l_j + [i = j] l_i^2) / N in S's eigenbasis) adds the Bures distance
    Tr S_N + Tr S - 2 Tr (S^1/2 S_N S^1/2)^1/2, which to second order is the Bures metric
    1/2 sum_ij E_ij^2 / (l_i + l_j), in expectation (1/2N) (sum_ij l_i l_j / (l_i + l_j) + Tr S / 2). For
    S = I: k = D (D + 5) / 4."""
    lam = np.linalg.eigvalsh(sigma)
    return 1.25 * lam.sum() + 0.5 * (np.outer(lam, lam) / (lam[:, None] + lam[None, :])).sum()


def test_fid_infinity_removes_the_bias_of_small_n(tmp_path):
    """A: 8000 samples of a Gaussian in D = 64; B: that Gaussian's exact mu and S, so the FID between the
    distributions is 0 and every FID_N > 0 is bias, about k / N (expected_bias_slope: k = 684 here, FID_8000
    ~ 0.086). Chong & Forsyth's fit must remove it: FID_inf ~ 0 and slope ~ k.

    Why these sizes: the fit extrapolates noisy points, and the noise must be small next to the bias it
    removes. Over 100 pools A (seeds 10000-10099), FID_inf had mean -0.00004 and std 0.0098 and the slope mean
    686 and std 39; so the bounds below (FID_inf within 0.5 k / N = 0.043, slope within 25% of k) sit 4.4
    standard deviations from the expectation of correct code, and as far from the ~k / N = 0.086 that code
    without the extrapolation, or with subsets drawn with replacement (0.085 +- 0.010), would report. (At
    D = 16 and N = 4000 the std of FID_inf, 0.008 to 0.0095, is half the bias 0.017 itself: no bound there
    separates right from wrong.)"""
    D, N, shift = 64, 8000, 0.5
    mu, sigma = gaussian_population(D)
    k = expected_bias_slope(sigma)
    a = gaussian_features(N, D, seed=9)
    fit = fid_infinity(a, mu, sigma, points=8, seed=0, min_n=N // 10)
    assert fit["n"] == sorted(fit["n"]) and fit["n"][0] == N // 10 and fit["n"][-1] == N and len(fit["n"]) == 8
    assert min(fit["fid"]) > 0.8 * k / N                                          # the bias is there
    assert abs(fit["fid_infinity"]) < 0.5 * k / N, (fit["fid_infinity"], k / N)  # and the fit removes it
    assert fit["slope"] == pytest.approx(k, rel=0.25)
    # a mean shift: FID_inf recovers the true FID D shift^2 = 16 (over 40 pools: 16.04 +- 0.11)
    shifted = fid_infinity(a + shift, mu, sigma, points=8, seed=0, min_n=N // 10)
    assert shifted["fid_infinity"] == pytest.approx(D * shift ** 2, rel=0.03)
    plot_fid_against_n({"same": fit, "shifted": shifted}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_docs_figure_command_runs(classifier_ckpt, tmp_path, capsys):
    fid_infinity_cli.main(["--features", classifier_ckpt, "--n", "120", "--n-ref", "200", "--points", "4",
                           "--out", str(tmp_path / "fig.png")])
    out = capsys.readouterr().out
    assert out.count("FID-infinity") == 2 and "NOT comparable" in out and (tmp_path / "fig.png").is_file()


# ---------------------------------------------------------------- KID

def kid_features(seed):
    """Two sets of pool3-like features: non-negative, D = 32, B shifted so that KID is clearly > 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(70, 32, generator=g, dtype=torch.float64) + 0.5)
    y = torch.relu(torch.randn(60, 32, generator=g, dtype=torch.float64) + 0.8)
    return x, y


def test_kid_equals_torch_fidelity():
    """torch-fidelity's kid_features_to_metric (Binkowski et al.'s mmd2 code) on the same float64 features,
    the same seed and so the same subsets: mean and std equal to 1e-12."""
    _, tf = import_references()
    from torch_fidelity.metric_kid import kid_features_to_metric

    x, y = kid_features(0)
    mean, std = kernel_inception_distance(x, y, subsets=7, subset_size=25, seed=2020)
    theirs = kid_features_to_metric(x, y, kid_subsets=7, kid_subset_size=25, rng_seed=2020, verbose=False)
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-12)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-12)
    assert mean > 10 * std / 7 ** 0.5 and std > 0  # a clearly non-zero figure from subsets that differ


def cubic_feature_map(x, gamma):
    """phi(x) with phi(x) . phi(y) = (gamma x . y + 1)^3 = sum_j C(3, j) gamma^j (x . y)^j and
    (x . y)^j = <x^(tensor j), y^(tensor j)>: the tensor powers of x, scaled, side by side. (m, D) -> (m, ...)"""
    m = x.shape[0]
    x2 = torch.einsum("ma,mb->mab", x, x).reshape(m, -1)                          # (m, D^2)
    x3 = torch.einsum("ma,mb,mc->mabc", x, x, x).reshape(m, -1)                   # (m, D^3)
    ones = torch.ones(m, 1, dtype=x.dtype)
    return torch.cat([ones, (3 * gamma) ** 0.5 * x, (3 * gamma ** 2) ** 0.5 * x2, gamma ** 1.5 * x3], 1)


def test_kid_is_the_unbiased_mmd_of_mean_embeddings():
    """Gretton et al. 2012 Lemma 6 written with the explicit feature map of the cubic kernel: with
    s_X = sum_i phi(x_i), MMD^2_u = (|s_X|^2 - sum_i |phi(x_i)|^2) / (m (m - 1)) + (same for Y)
    - 2 s_X . s_Y / m^2. One subset holding every image (m = N): no sampling left."""
    x, y = kid_features(1)
    x, y = x[:20, :6], y[:20, :6]                                                 # D = 6: phi has 259 entries
    gamma = 1 / 6
    assert torch.allclose(cubic_feature_map(x, gamma) @ cubic_feature_map(y, gamma).T, polynomial_kernel(x, y),
                          rtol=1e-12, atol=0)
    fx, fy = cubic_feature_map(x, gamma), cubic_feature_map(y, gamma)
    m = 20
    within = lambda f: (f.sum(0) @ f.sum(0) - (f * f).sum()) / (m * (m - 1))
    expected = (within(fx) + within(fy) - 2 * fx.sum(0) @ fy.sum(0) / m ** 2).item()
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=m)
    assert mean == pytest.approx(expected, rel=1e-10) and std == 0


def test_kid_is_unbiased_for_one_distribution():
    """Two samples of one distribution: the expectation of MMD^2_u is 0 at any subset size (the point of
    KID, Binkowski Sec. 3), so over 400 subsets of m = 20 the mean is within 5 standard errors of 0 (over 60
    seeds: 0.004 +- 0.028, the standard error 0.027). The biased estimator (the diagonals kept) is ~2.4 here,
    80 standard errors away."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 16, generator=g, dtype=torch.float64) + 1
    y = torch.randn(5000, 16, generator=g, dtype=torch.float64) + 1
    subsets, m = 400, 20
    mean, std = kernel_inception_distance(x, y, subsets, m, seed=0)
    standard_error = std / subsets ** 0.5
    assert abs(mean) < 5 * standard_error
    xs, ys = x[:m], y[:m]
    biased = polynomial_kernel(xs, xs).mean() + polynomial_kernel(ys, ys).mean() - 2 * polynomial_kernel(xs, ys).mean()
    assert biased > 40 * standard_error


def test_kid_errors():
    x, y = kid_features(2)
    with pytest.raises(ValueError, match="subset size"):
        kernel_inception_distance(x, y, subsets=2, subset_size=61)
    with pytest.raises(ValueError, match="dimension"):
        kernel_inception_distance(x, y[:, :5], subsets=2, subset_size=10)


# ---------------------------------------------------------------- Inception Score

def test_inception_score_equals_torch_fidelity():
    """torch-fidelity's isc_features_to_metric (10 splits, its RandomState(2020) shuffle) on the same logits."""
    _, tf = import_references()
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(205, 1008, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    theirs = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    mean, std = inception_score(logits, splits=10, shuffle_seed=2020)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-12)
    unshuffled = isc_features_to_metric(logits, splits=10, shuffle=False)
    assert inception_score(logits, splits=10)[0] == pytest.approx(unshuffled["inception_score_mean"], rel=1e-12)
    assert mean > 1.5 and std > 0


def test_inception_score_bounds():
    """Salimans Sec. 4 at its two ends: every image with the same class distribution gives exp(KL = 0) = 1;
    every image certain of its class, the K classes equally often in each split, gives exp(log K) = K."""
    K = 7
    same = torch.randn(1, K, dtype=torch.float64).repeat(70, 1)
    assert inception_score(same, splits=10) == (pytest.approx(1.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))
    certain = 100.0 * torch.eye(K, dtype=torch.float64).repeat(10, 1)           # (70, K): split i holds all K
    mean, std = inception_score(certain, splits=10)
    assert mean == pytest.approx(K, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 10"):
        inception_score(certain[:9], splits=10)


# ---------------------------------------------------------------- precision and recall

def literal_precision_recall(generated, real, k=3):
    """Kynkaanniemi Eq. 1-2 word for word, in Python floats: the radius of phi' is its distance to the k-th
    nearest *other* vector of its set; phi is inside if within (<=) the radius of at least one phi'."""
    def radii(points):
        out = []
        for i, p in enumerate(points):
            others = sorted(float(torch.dist(p, q)) for j, q in enumerate(points) if j != i)
            out.append(others[k - 1])
        return out

    def fraction_inside(queries, support):
        r = radii(support)
        inside = [any(float(torch.dist(q, s)) <= r_s for s, r_s in zip(support, r)) for q in queries]
        return sum(inside) / len(inside)

    return fraction_inside(generated, real), fraction_inside(real, generated)


def test_precision_recall_equals_the_definition(monkeypatch):
    """Two partly overlapping clouds of different spread, rows split into blocks of 7 (the blocked code path)."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 5, generator=g, dtype=torch.float64)
    generated = 0.5 * torch.randn(30, 5, generator=g, dtype=torch.float64) + 0.8
    expected = literal_precision_recall(generated, real)
    monkeypatch.setattr(prc, "BLOCK", 7)
    assert prc.precision_recall(generated, real, k=3) == pytest.approx(expected, abs=1e-12)
    assert 0.1 < expected[0] < 0.95 and 0.1 < expected[1] < 0.95                  # neither 0 nor 1: informative


def test_precision_recall_by_hand():
    """1-D, k = 3. Real 0, 1, 2, 3, 4: radii (4th smallest distance, the first being 0 to itself) 3, 2, 2, 2,
    3, so the real manifold is [-3, 7]; generated -3 (on the boundary: counts), 6.9, 7.5, 10, -3.5 gives
    precision 2/5. Generated radii: -3.5 -> 11, -3 -> 10.5, 6.9 -> 10.4, 7.5 -> 11, 10 -> 13.5: every real
    point is covered, recall 1. A set with itself: 1 and 1."""
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    generated = torch.tensor([[-3.0], [6.9], [7.5], [10.0], [-3.5]], dtype=torch.float64)
    assert torch.equal(prc.knn_radii(real, 3), torch.tensor([3.0, 2, 2, 2, 3], dtype=torch.float64))
    assert prc.precision_recall(generated, real, k=3) == (pytest.approx(0.4), 1.0)
    assert prc.precision_recall(real, real, k=3) == (1.0, 1.0)
    far = real + 100
    assert prc.precision_recall(far, real, k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3"):
        prc.precision_recall(real[:3], real, k=3)
