"""The figures every family's demo and every sweep point report, from one function: `judge`.

    prompt accuracy   metrics.prompt_accuracy: the shapes classifier checks each claim of held-in and held-out
                      prompts (GenEval's idea)                                     -> prompt_accuracy.json
    images            `python -m sample` for the captions of fresh renders (seed 7)  -> generated/, real/
    FID, KID          metrics.fid on the classifier's features, generated against real (NOT comparable with
                      published FIDs: not the Inception network)
    CLIP score        metrics.clip_score with the judge CLIP, of the generated images and of the renders (the
                      ceiling), in both conventions (torchmetrics, CLIP-S)
    R-precision       metrics.r_precision with the same judge CLIP: each image's caption ranked among 99 mismatched
                      ones (fewer when the set is too small to have 99, as in --smoke), top-1 rate; and the renders'

Every step is the command a person would run (each module's main with its flags), so a figure here is the figure
that command prints. `model` is the flag list that names the pipeline and its sampling settings, as
`python -m sample` and metrics.prompt_accuracy read it (sample/demo.py: family.pipeline(runs) + family.sampling).
"""
import json
import shutil
import time

import torch

import data.shapes
import metrics.clip_score
import metrics.fid
import metrics.prompt_accuracy
import metrics.r_precision
import sample.__main__ as sample_cli

REAL_SEED = 7  # the renders every generated set is compared with


def judge(model, out_dir, classifier, judge_clip, fid_images, accuracy_n, timer, seed=0):
    """Run the judging steps above for the pipeline `model` names, writing into out_dir; each step is timed by
    `timer` (sample/stages.py's Timer). Returns {prompt_accuracy, fid, clip_score, r_precision, r_precision_real,
    seconds_per_image}."""
    report = {}
    timer.run("prompt accuracy", lambda: metrics.prompt_accuracy.main(
        model + ["--classifier", str(classifier), "--n", str(accuracy_n), "--seed", str(seed),
                 "--out", str(out_dir / "prompt_accuracy.json")]))
    report["prompt_accuracy"] = json.loads((out_dir / "prompt_accuracy.json").read_text())

    real, generated = out_dir / "real", out_dir / "generated"

    def generate_for_captions():
        if real.exists():  # the renders are a function of (seed, count): made again rather than trusted
            shutil.rmtree(real)
        data.shapes.main(["--export", str(real), "--num-images", str(fid_images), "--seed", str(REAL_SEED)])
        captions = [json.loads(line)["text"] for line in (real / "metadata.jsonl").read_text().splitlines()]
        (out_dir / "real_captions.txt").write_text("\n".join(captions) + "\n")
        t0 = time.time()
        sample_cli.main(model + ["--seed", str(seed), "--overwrite", "--prompts-file", str(out_dir / "real_captions.txt"),
                                 "--n", "1", "--batch-size", "250", "--out", str(out_dir / "generated.png")])
        return (time.time() - t0) / len(captions), captions

    seconds_per_image, captions = timer.run("images for FID and CLIP score", generate_for_captions)

    def distances_and_clip():
        fid = metrics.fid.main([str(generated), str(real), "--features", str(classifier), "--kid",
                                "--kid-subset-size", str(min(1000, fid_images // 2)), "--no-progress"])
        scores, retrieval = {}, {}
        candidates = min(100, metrics.r_precision.most_candidates(captions))
        for name, folder in (("generated", generated), ("real", real)):
            out = out_dir / f"clip_score_{name}.json"
            out.unlink(missing_ok=True)
            metrics.clip_score.main(["--clip", str(judge_clip), "--images", str(folder), "--out", str(out)])
            scores[name] = json.loads(out.read_text())
            retrieval[name] = metrics.r_precision.main(["--clip", str(judge_clip), "--images", str(folder),
                                                        "--candidates", str(candidates)])
        return fid, scores, retrieval

    fid, scores, retrieval = timer.run("FID, KID and CLIP score", distances_and_clip)
    report.update(fid=fid, clip_score=scores, r_precision=retrieval["generated"]["r_precision"],
                  r_precision_real=retrieval["real"]["r_precision"],
                  r_precision_candidates=retrieval["generated"]["candidates"],
                  seconds_per_image=round(seconds_per_image, 4))
    return report


def summary_lines(report):
    """The demo's and the sweep's printed summary of a judge() report."""
    lines = []
    for split in ("heldin", "heldout"):
        acc = report["prompt_accuracy"][split]
        lines.append(f"prompt accuracy {split:8s} colour {acc['colour']:.3f} | shape {acc['shape']:.3f}")
    gen, real = report["clip_score"]["generated"], report["clip_score"]["real"]
    lines.append(f"CLIP score (torchmetrics, CLIP-S)  generated {gen['torchmetrics_clip_score']:.2f}, "
                 f"{gen['clip_s']:.4f} | real renders {real['torchmetrics_clip_score']:.2f}, {real['clip_s']:.4f}")
    lines.append(f"R-precision (judge CLIP, top-1 of {report['r_precision_candidates']})  generated "
                 f"{report['r_precision']:.3f} | real renders {report['r_precision_real']:.3f}")
    lines.append(f"FID {report['fid']['fid']:.3f}, KID {report['fid']['kid'][0]:.4f} (shapes-classifier features; "
                 f"not comparable with published FIDs)")
    return lines


@torch.no_grad()
def reconstruction_accuracy(reconstruct, classifier_path, num_images=1000, seed=5, batch_size=250):
    """The classifier's per-attribute accuracy on reconstructions of fresh renders at its resolution (`reconstruct`:
    (B, 3, R, R) images in [-1, 1] -> the same, through a family's encoder and decoder): what the decoder keeps of
    what a prompt asks for, so a ceiling for the prompt accuracy of a model that generates in that code space."""
    from models.classifier import load_classifier
    from train.classifier import evaluate

    classifier, clf_cfg = load_classifier(classifier_path)
    return evaluate(classifier, clf_cfg, num_images, seed, batch_size, progress=False, transform=reconstruct)
