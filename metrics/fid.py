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

The statistics and the distance are computed in metrics/frechet.py (how, and how they compare with pytorch-fid's).
"""
import argparse
from pathlib import Path

import torch

from core.runtime import get_device, run_cli
from metrics.frechet import RunningStats, frechet_distance, load_stats, save_stats

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
