"""The DALL-E family in the demo: a discrete VAE, then a transformer over [text tokens; image tokens], sampled with
classifier-free guidance on the logits and re-ranked by a CLIP that is not the judge.

    python -m sample.demo --family dalle [--runs runs]

Paper: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", arXiv 2102.12092.
Stages (each a training script of its own, in this order; sample/demo.py runs them, the judges and the metrics):
    re-ranking CLIP   python -m train.clip --config configs/shapes/clip.yaml        runs/clip (not the judge)
    dVAE              python -m train.dvae --config configs/shapes/dvae.yaml        32 px -> 8x8 tokens of K 512
    transformer       python -m train.dalle --config configs/shapes/dalle.yaml      16 text + 64 image tokens
The re-ranking CLIP comes first, short, so that it is the stage the judges train beside (one thread each): the dVAE
and the transformer then train on every thread from their first step (each 1.6-1.75x faster on two threads than on
one here; as two processes, no faster than on two threads: docs/results.md).
Sampling: the pipeline config's preset (fast: guidance 3 on the logits, no filter, one candidate); --guidance
overrides the guidance. report() adds the dVAE's figures and the re-ranking curve (prompt accuracy and the judge's
CLIP score against the number of candidates N, the paper's Fig. 9 in miniature) to metrics.json.
"""
import json

import torch

import train.clip
import train.dalle
import train.dvae
from models.dvae import load_dvae
from sample.judging import reconstruction_accuracy
from sample.stages import CONFIGS, Stage

SMOKE = {
    "dVAE": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.eval_images=32"],
    "re-ranking CLIP": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.eval_images=32"],
    "transformer": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.sample_every=0"],
}
CANDIDATES = (1, 4, 16, 64)  # the re-ranking curve's N


def stages(runs, smoke):
    dvae = runs / "dvae" / "ckpt.pt"
    return [
        Stage("re-ranking CLIP", train.clip, CONFIGS / "clip.yaml", runs / "clip" / "ckpt.pt", "clip",
              train.clip.ClipTrainConfig, SMOKE["re-ranking CLIP"] if smoke else [], train.clip.FILLED_IN),
        Stage("dVAE", train.dvae, CONFIGS / "dvae.yaml", dvae, "dvae", train.dvae.DVAETrainConfig,
              SMOKE["dVAE"] if smoke else []),
        Stage("transformer", train.dalle, CONFIGS / "dalle.yaml", runs / "dalle" / "ckpt.pt", "dalle",
              train.dalle.DalleTrainConfig, [f"dvae={dvae}", *(SMOKE["transformer"] if smoke else [])],
              train.dalle.FILLED_IN),
    ]


def pipeline(runs):
    return ["--pipeline", "dalle", "--config", str(CONFIGS / "pipeline_dalle.yaml"),
            "--ckpt", str(runs / "dalle" / "ckpt.pt"), "--vae", str(runs / "dvae" / "ckpt.pt"),
            "--rerank-clip", str(runs / "clip" / "ckpt.pt")]


def sampling(args):
    return ["--guidance", str(args.guidance)]


@torch.no_grad()
def reranking_curve(runs, classifier, judge_clip, candidates=CANDIDATES, n=2, seed=0, out=None):
    """Prompt accuracy (held-in and held-out prompts, `n` pictures each) and the judge CLIP's score of the kept
    pictures (judge_clip: its checkpoint), for each number of candidates N (the best of N by the re-ranking CLIP
    kept). Returns
    {N: {heldin: {colour, shape}, heldout: {...}, clip_score}}; with `out`, a plot of the curve there."""
    from data.claims import eval_prompts, judge
    from metrics.prompt_accuracy import summarise
    from models.classifier import load_classifier, predict_attributes
    from models.clip import load_clip
    from models.dalle_pipeline import clip_scores, load_dalle_pipeline

    pipe = load_dalle_pipeline(runs / "dalle" / "ckpt.pt", dvae=runs / "dvae" / "ckpt.pt",
                               clip=runs / "clip" / "ckpt.pt")
    clf, _ = load_classifier(classifier)
    judge_clip, judge_tok, _ = load_clip(judge_clip)
    curve = {}
    for N in candidates:
        settings = pipe.settings_with(candidates=N)
        row, scores = {}, []
        for split, name in (("train", "heldin"), ("heldout", "heldout")):
            prompts = eval_prompts(split, pipe.data["max_objects"])
            captions = [c for c, _ in prompts for _ in range(n)]
            expected = [a for _, a in prompts for _ in range(n)]
            g = torch.Generator().manual_seed(seed)
            judgements = []
            chunk = max(1, 512 // N)  # captions per call: at most 512 sequences in the KV cache at once
            for i in range(0, len(captions), chunk):
                images = pipe(captions[i: i + chunk], settings, generator=g, progress=False)
                judgements += [judge(e, d) for e, d in zip(expected[i: i + chunk], predict_attributes(clf, images))]
                scores.append(clip_scores(judge_clip, judge_tok, images, captions[i: i + chunk]))
            summary = summarise(judgements)
            row[name] = {k: summary[k] for k in ("colour", "shape") if k in summary}
        row["clip_score"] = 100 * torch.cat(scores).mean().item()  # torchmetrics' convention, the judge CLIP
        curve[N] = row
        print(f"  re-ranking, best of N = {N:3d}: held-in colour {row['heldin']['colour']:.3f} | shape "
              f"{row['heldin']['shape']:.3f}; held-out colour {row['heldout']['colour']:.3f} | shape "
              f"{row['heldout']['shape']:.3f}; judge CLIP score {row['clip_score']:.2f}", flush=True)
    if out is not None:
        plot_curve(curve, out)
    return curve


def plot_curve(curve, path):
    from matplotlib.figure import Figure  # not pyplot: a notebook that calls this keeps its backend

    Ns = sorted(curve)
    fig = Figure(figsize=(9, 3.5))
    a, b = fig.subplots(1, 2)
    for split, style in (("heldin", "-"), ("heldout", "--")):
        for attr, colour in (("colour", "tab:red"), ("shape", "tab:blue")):
            a.plot(Ns, [curve[N][split][attr] for N in Ns], style, color=colour, marker="o", label=f"{split} {attr}")
    b.plot(Ns, [curve[N]["clip_score"] for N in Ns], marker="o", color="black")
    for ax, title in ((a, "prompt accuracy"), (b, "CLIP score (judge CLIP)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ns, [str(N) for N in Ns])
        ax.set_xlabel("candidates N (best by the re-ranking CLIP)")
        ax.set_title(title)
    a.legend(fontsize=7)
    fig.suptitle("DALL-E re-ranking (Ramesh et al. 2021, Fig. 9 in miniature)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(runs, classifier, num_images, model=None, demo=None, accuracy_n=4, judge_clip=None):
    """The dVAE's held-out PSNR and codebook usage, and the re-ranking curve (N = 1 and 4 only, one picture per
    prompt, when num_images < 100: the demo's --smoke). (model, accuracy_n: the contract's other arguments, unused
    here: the curve samples with its own candidates.)"""
    dvae_model, dvae = load_dvae(runs / "dvae" / "ckpt.pt")
    print(f"  dVAE PSNR {dvae.get('psnr'):.2f} dB; codebook perplexity {dvae.get('perplexity'):.1f}, "
          f"{dvae.get('codes_used')} of {dvae['config']['dvae']['vocab_size']} codes used (held-out)")
    rec = reconstruction_accuracy(lambda x: dvae_model.decode(dvae_model.encode(x)), classifier,
                                  num_images=num_images)
    print(f"  the classifier on the dVAE's reconstructions (from argmax tokens): colour {rec['colour']:.3f} | "
          f"shape {rec['shape']:.3f} (the ceiling of prompt accuracy in token space)")
    demo = demo or runs / "demo" / "dalle"
    small = num_images < 100
    curve = reranking_curve(runs, classifier, judge_clip or runs / "clip_demo" / "ckpt.pt",
                            candidates=CANDIDATES[:2] if small else CANDIDATES, n=1 if small else 2,
                            out=demo / "reranking.png")
    (demo / "reranking.json").write_text(json.dumps(curve, indent=2) + "\n")
    print(f"  re-ranking curve: {demo / 'reranking.png'}")
    return {"dvae": {"psnr_db": dvae.get("psnr"), "perplexity": dvae.get("perplexity"),
                     "codes_used": dvae.get("codes_used"), "attribute_accuracy_of_reconstructions": rec},
            "reranking": curve}
