"""Speed of the two costly parts of FID, ours against pytorch-fid's, measured in one process.

    .venv/bin/python -m tests.bench_fid                    # both parts
    .venv/bin/python -m tests.bench_fid --part frechet --repeats 5
    .venv/bin/python -m tests.bench_fid --part inception --images 64 --batch 32

1. The Frechet distance at D = 2048 from two (mu, sigma): ours (metrics/frechet.py: a factor F F^T = S_1, then the
   eigenvalues of F^T S_2 F; torch float64) against pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm
   of S_1 S_2, a Schur decomposition). The covariances come from --n synthetic feature vectors per side,
   relu(Z W) with a random W, which gives a decaying spectrum and a non-zero mean like Inception's pool3;
   --n 4096 (> D) takes our Cholesky factor, --n 1000 (< D, singular covariances) our eigen factor. Prints
   both times (best of --repeats, alternating) and the relative difference of the two distances.
2. Inception feature extraction: ours (metrics/inception.py) against pytorch-fid's InceptionV3 with the same
   random weights (tests/test_inception.py proves them equal), on the same uint8 images, alternating batch by
   batch; images/s median and best, and the ratio ours/theirs (> 1: ours is faster). Both include the resize to
   299; pytorch-fid's ToTensor division by 255 is done outside its timed call, as its DataLoader does it.

Measured with OMP_NUM_THREADS=1 on a shared 2-core machine (load average 3-4.5; torch 2.13 CPU with MKL,
scipy 1.17, pytorch-fid 0.3.0), three runs of the default command:
    Frechet distance, D = 2048, N = 4096 (Cholesky): ours 2.61 / 2.36 / 2.39 s, scipy 18.8 / 20.2 / 18.7 s,
        7.2x / 8.6x / 7.8x faster; relative difference 1.35e-14
    --n 1000 (singular, eigen factor): ours 3.68 s, scipy 22.9 s, 6.2x; relative difference 5.3e-8 (sqrtm's
        error on singular matrices: tests/test_fid.py's N x N route agrees with ours to 1e-12)
    Inception, 64 images 64x64 -> 299, batch 32: ours 3.87 / 4.68 / 4.22 images/s, pytorch-fid 2.39 / 3.05 /
        2.83 images/s (medians), ratio 1.62 / 1.54 / 1.49; features equal to 1.0e-6 of the largest
"""
import argparse
import os
import statistics
import time

import torch

from tests.reference_imports import make_torchvision_importable

make_torchvision_importable()  # before anything imports pytorch-fid (and with it torchvision): see that file
from tests.test_inception import import_references  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--part", choices=["frechet", "inception", "both"], default="both")
parser.add_argument("--repeats", type=int, default=3, help="timed runs of each Frechet distance")
parser.add_argument("--dim", type=int, default=2048)
parser.add_argument("--n", type=int, default=4096, help="feature vectors behind each covariance")
parser.add_argument("--images", type=int, default=64, help="images for the Inception timing")
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--size", type=int, default=64, help="side of the test images (resized to 299 by both)")
args = parser.parse_args()
print(f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}")


def alternate(fn_ours, fn_theirs, repeats):
    """Run the two alternately `repeats` times each; lists of wall times."""
    times = ([], [])
    for _ in range(repeats):
        for fn, out in ((fn_ours, times[0]), (fn_theirs, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


import_references()  # pytorch-fid, with torchvision importable next to a CPU-only torch

if args.part in ("frechet", "both"):
    from pytorch_fid.fid_score import calculate_frechet_distance

    from metrics.frechet import frechet_distance, stats_of

    D, N = args.dim, args.n
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5
    features = [torch.relu(torch.randn(N, D, generator=g, dtype=torch.float64) @ W + shift) for shift in (0.0, 0.1)]
    (mu1, s1), (mu2, s2) = (stats_of(f) for f in features)
    results = {}
    times = alternate(lambda: results.__setitem__("ours", frechet_distance(mu1, s1, mu2, s2)),
                      lambda: results.__setitem__("scipy", calculate_frechet_distance(mu1, s1, mu2, s2)),
                      args.repeats)
    best = [min(t) for t in times]
    rel = abs(results["ours"] - results["scipy"]) / abs(results["scipy"])
    print(f"\nFrechet distance, D = {D}, covariances of {N} vectors each, best of {args.repeats}:")
    route = "Cholesky" if N > D else "eigen factor"
    print(f"  {f'ours ({route} + eigvalsh, torch float64)':46s} {best[0]:7.3f} s   FID {results['ours']:.10f}")
    print(f"  {'pytorch-fid (scipy.linalg.sqrtm)':46s} {best[1]:7.3f} s   FID {results['scipy']:.10f}")
    print(f"  ours is {best[1] / best[0]:.1f}x faster; relative difference {rel:.2e}")

if args.part in ("inception", "both"):
    from data.shapes import render_dataset
    from tests.test_inception import pytorch_fid_twin, random_inception

    ours = random_inception()
    theirs = pytorch_fid_twin(ours)
    images = torch.from_numpy(render_dataset(args.images, args.size, seed=0, progress=False)[0])
    images = images.permute(0, 3, 1, 2).contiguous()                            # (N, 3, S, S) uint8
    batches = list(images.split(args.batch))
    with torch.no_grad():
        a, b = ours(batches[0]), theirs(batches[0].float() / 255)[0][:, :, 0, 0]
        err = ((a - b).abs().max() / b.abs().max()).item()
        print(f"\nInception pool3: the same features (largest difference {err:.1e} of the largest feature)")
        floats = [x.float() / 255 for x in batches]  # pytorch-fid's DataLoader hands floats in [0, 1]
        ours(batches[0]), theirs(floats[0])           # warm-up
        t_ours, t_theirs = [], []
        for x, xf in zip(batches, floats):
            t = alternate(lambda: ours(x), lambda: theirs(xf), 1)
            t_ours.append(t[0][0] / len(x))
            t_theirs.append(t[1][0] / len(x))
    rate = {name: (1 / statistics.median(ts), 1 / min(ts)) for name, ts in (("ours", t_ours), ("pytorch-fid", t_theirs))}
    print(f"Inception feature extraction, {args.images} images of {args.size}x{args.size}, batch {args.batch}:")
    for name, (median, best) in rate.items():
        print(f"  {name:12s} median {median:6.2f} images/s   best {best:6.2f} images/s")
    print(f"  ratio ours/pytorch-fid: median {rate['ours'][0] / rate['pytorch-fid'][0]:.3f}   "
          f"best {rate['ours'][1] / rate['pytorch-fid'][1]:.3f}")
