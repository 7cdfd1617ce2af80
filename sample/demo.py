"""The README's main job: train a tiny Stable-Diffusion-shaped text-to-image model on the built-in shapes, sample
from it and judge it. `make demo` runs

    python -m sample.demo [--runs runs] [--fid-images 500]

Stages, each a command of its own that the demo calls in this order (the classifier beside the VAE: see below; a
finished stage is skipped, a stopped one continues from its checkpoint, so running the demo again is cheap):
    classifier  python -m train.classifier --config configs/shapes/classifier.yaml   the judge of prompt accuracy
                                                                                      and the FID features
    VAE         python -m train.vae --config configs/shapes/vae.yaml                  the decoder (and encoder)
    judge CLIP  python -m train.clip --config configs/shapes/clip_demo.yaml           the CLIP of the CLIP score,
                                                                                      trained apart from the generator
    U-Net       python -m train.diffusion --config configs/shapes/diffusion_latent.yaml
                                                                                      latent U-Net + its text encoder
    samples     python -m sample --pipeline ldm --config configs/shapes/pipeline_ldm.yaml
                    --prompts-file configs/shapes/demo_prompts.txt                    -> runs/demo/samples.png
    metrics     prompt accuracy (metrics.prompt_accuracy), CLIP score (metrics.clip_score) and FID on the shapes
                classifier's features (metrics.fid) of images generated for the captions of fresh renders
                against those renders                                                 -> runs/demo/metrics.json

The text encoder is the small transformer trained jointly with the U-Net (as latent diffusion's own
text-to-image model, Rombach et al. 2022 Sec. 4.3.1); `text_encoder=clip:<ckpt>` in diffusion_latent.yaml
swaps in a frozen CLIP as in Stable Diffusion. `--smoke` shrinks every stage to a few steps: a check that the
whole chain runs (tests/test_demo.py), not a result.

On a machine with two or more cores the classifier trains in a child process on one thread (its output in
runs/demo/logs/classifier.log) while the VAE trains here on the other threads: both use a second thread poorly
(the VAE, batch 8, trains in 168 s on one thread and 142 s on two; the classifier in 134-200 s and 91 s) and take
about as long, so this saves 1.5 to 2 minutes. The judge CLIP (batch 128: 121-129 s on one thread, 71 s on two)
and the U-Net then train here on every thread. `--sequential` runs every stage here, in turn.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from core.checkpoint import load_checkpoint
from core.config import config_to_dict, load_config, stored_config_changes
from core.runtime import run_cli

CONFIGS = Path("configs/shapes")
SMOKE = {  # a few steps and small data per stage: the chain runs end to end in about a minute
    "classifier": ["train.steps=3", "data.num_images=64", "train.eval_images=32", "train.batch_size=16"],
    "clip": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.eval_images=32"],
    "vae": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.eval_images=32",
            "train.scale_images=64"],
    "diffusion": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.sample_every=0"],
}


def build_parser():
    p = argparse.ArgumentParser(description="Train the tiny latent-diffusion pipeline on shapes, sample and judge it.")
    p.add_argument("--runs", default="runs", help="folder of every stage's output (runs/<stage>, runs/demo)")
    p.add_argument("--fid-images", type=int, default=500, help="generated and real images for FID and CLIP score")
    p.add_argument("--n", type=int, default=8, help="images per prompt in the samples grid")
    p.add_argument("--accuracy-n", type=int, default=4, help="images per prompt for prompt accuracy")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps for every sample the demo draws")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--sequential", action="store_true",
                   help="train the classifier here, before the VAE, instead of beside it")
    p.add_argument("--smoke", action="store_true", help="a few steps per stage: checks the chain, gives no result")
    return p


def stage_done(ckpt_path, kind, config_cls, argv, filled_in=()):
    """A training stage is done when its checkpoint was made with the config the demo asks for (`argv`: --config FILE
    and overrides; `filled_in`: keys the script sets itself) and reached its last step; a VAE also needs its scale factor, measured after the last step. A
    checkpoint of another config (an older preset, say) is an error: the demo neither uses it nor trains over it."""
    if not Path(ckpt_path).exists():
        return False
    ckpt = load_checkpoint(ckpt_path, kind)
    wanted = config_to_dict(load_config(config_cls, argv[1], argv[2:]))
    changes = stored_config_changes(config_cls, ckpt["config"], wanted, filled_in=filled_in)
    if changes:
        raise ValueError(f"{ckpt_path} was trained with another config than the demo's {argv[1]} ({changes}); move "
                         f"its folder away or pass --runs <another folder>")
    return ckpt.get("step") == wanted["train"]["steps"] and (kind != "vae" or ckpt["scale_factor"] is not None)


class Timer:
    """Wall time of each stage, printed as it ends and kept for metrics.json."""

    def __init__(self):
        self.seconds = {}
        self.beside = set()  # stages that ran beside another one: not part of the sum

    def skipped(self, name):
        print(f"\n==== {name}: done before, skipped", flush=True)
        self.seconds[name] = 0.0

    def run(self, name, fn, skip=False):
        if skip:
            return self.skipped(name)
        print(f"\n==== {name}", flush=True)
        t0 = time.time()
        out = fn()
        self.seconds[name] = round(time.time() - t0, 1)
        print(f"==== {name}: {self.seconds[name]:.0f} s", flush=True)
        return out


class Background:
    """One stage, `python -m <module> <args>`, in a child process on one thread while the demo goes on; its output
    goes to <log_dir>/<name>.log. `wait()` returns when it is done, or raises a ValueError (one line, as for bad
    input: a child fails on bad input) with its last line and its log; `stop()` ends it (the demo calls it when its
    own stage fails or is interrupted, so the child does not train on by itself)."""

    def __init__(self, name, module, argv, log_dir, timer):
        self.name, self.timer, self.log = name, timer, Path(log_dir) / (name.replace(" ", "_") + ".log")
        self.command = [sys.executable, "-m", module, *argv]
        self.process = None

    def start(self):
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.timer.seconds[self.name] = None  # keeps the report's stage order
        self.timer.beside.add(self.name)
        print(f"\n==== {self.name}: training beside the next stage, one thread, log {self.log}", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.t0 = time.time()
        with open(self.log, "w") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait()

    def wait(self):
        code = self.process.wait()
        self.timer.seconds[self.name] = round(time.time() - self.t0, 1)
        if code != 0:
            last = (self.log.read_text().strip().splitlines() or [""])[-1]
            raise ValueError(f"the {self.name} stage failed (exit code {code}): {last} (its whole output is in "
                             f"{self.log})")
        print(f"==== {self.name} (beside): {self.timer.seconds[self.name]:.0f} s", flush=True)


@torch.no_grad()
def reconstruction_accuracy(vae_path, classifier_path, num_images=1000, seed=5, batch_size=250):
    """The classifier's per-attribute accuracy on VAE reconstructions of fresh renders: what the decoder keeps of
    what a prompt asks for, so a ceiling for the latent model's prompt accuracy."""
    from models.classifier import load_classifier, predict_attributes
    from models.vae import load_vae
    from train.classifier import render_tensors, score

    classifier, clf_cfg = load_classifier(classifier_path)
    vae, _, _ = load_vae(vae_path)
    images, attributes = render_tensors(num_images, clf_cfg, seed, progress=False)
    x = images.float() / 127.5 - 1  # (N, 3, R, R) in [-1, 1]
    rec = torch.cat([vae.decode(vae.encode(x[i: i + batch_size]).mode()).clamp(-1, 1)
                     for i in range(0, len(x), batch_size)])
    return score(predict_attributes(classifier, rec), attributes)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.fid_images < 2 or args.n < 1 or args.accuracy_n < 1:
        raise ValueError("--fid-images must be at least 2, --n and --accuracy-n at least 1")
    import data.shapes
    import metrics.clip_score
    import metrics.fid
    import metrics.prompt_accuracy
    import sample.__main__ as sample_cli
    import train.classifier
    import train.clip
    import train.diffusion
    import train.vae

    runs = Path(args.runs)
    demo = runs / "demo"
    smoke = lambda stage: SMOKE[stage] if args.smoke else []
    paths = {"classifier": runs / "shapes_classifier" / "ckpt.pt", "clip": runs / "clip_demo" / "ckpt.pt",
             "vae": runs / "vae" / "ckpt.pt", "diffusion": runs / "diffusion_latent" / "ckpt.pt"}
    timer = Timer()
    t_start = time.time()

    # ---- the four trained parts: the classifier (beside the VAE, or in turn), the VAE, the judge CLIP, the U-Net
    def stage(config, path, *extra):  # every script: --config FILE, then train.out_dir, train.resume, overrides
        return ["--config", str(CONFIGS / config), f"train.out_dir={path.parent}", "train.resume=auto", *extra]

    argv = {"classifier": stage("classifier.yaml", paths["classifier"], *smoke("classifier")),
            "judge CLIP": stage("clip_demo.yaml", paths["clip"], *smoke("clip")),
            "VAE": stage("vae.yaml", paths["vae"], *smoke("vae")),
            "latent U-Net": stage("diffusion_latent.yaml", paths["diffusion"], f"vae={paths['vae']}",
                                  *smoke("diffusion"))}
    done = {"classifier": stage_done(paths["classifier"], "shapes_classifier", train.classifier.ClassifierTrainConfig,
                                     argv["classifier"]),
            "judge CLIP": stage_done(paths["clip"], "clip", train.clip.ClipTrainConfig, argv["judge CLIP"],
                                     train.clip.FILLED_IN),
            "VAE": stage_done(paths["vae"], "vae", train.vae.VAETrainConfig, argv["VAE"]),
            "latent U-Net": stage_done(paths["diffusion"], "diffusion", train.diffusion.DiffusionConfig,
                                       argv["latent U-Net"])}
    beside = None
    if done["classifier"]:
        timer.skipped("classifier")
    elif not done["VAE"] and not args.sequential and (os.cpu_count() or 1) >= 2:
        beside = Background("classifier", "train.classifier", argv["classifier"], demo / "logs", timer)
        beside.start()
    else:
        timer.run("classifier", lambda: train.classifier.main(argv["classifier"]))
    threads = torch.get_num_threads()
    if beside:
        torch.set_num_threads(max(1, threads - 1))
        try:
            timer.run("VAE", lambda: train.vae.main(argv["VAE"]))
        except BaseException:  # an error or Ctrl-C here: the classifier stops too
            beside.stop()
            raise
        torch.set_num_threads(threads)
        beside.wait()
    else:
        timer.run("VAE", lambda: train.vae.main(argv["VAE"]), skip=done["VAE"])
    timer.run("judge CLIP", lambda: train.clip.main(argv["judge CLIP"]), skip=done["judge CLIP"])
    timer.run("latent U-Net", lambda: train.diffusion.main(argv["latent U-Net"]), skip=done["latent U-Net"])

    # ---- samples for people to look at
    pipeline = ["--pipeline", "ldm", "--config", str(CONFIGS / "pipeline_ldm.yaml"), "--ckpt", str(paths["diffusion"]),
                "--vae", str(paths["vae"]), "--steps", str(args.steps), "--guidance", str(args.guidance),
                "--sampler", "ddim", "--seed", "0", "--overwrite"]
    timer.run("samples", lambda: sample_cli.main(
        pipeline + ["--prompts-file", str(CONFIGS / "demo_prompts.txt"), "--n", str(args.n),
                    "--out", str(demo / "samples.png")]))

    # ---- metrics
    report = {}
    timer.run("prompt accuracy", lambda: metrics.prompt_accuracy.main(
        ["--ckpt", str(paths["diffusion"]), "--vae", str(paths["vae"]), "--classifier", str(paths["classifier"]),
         "--n", str(args.accuracy_n), "--steps", str(args.steps), "--guidance", str(args.guidance),
         "--out", str(demo / "prompt_accuracy.json")]))
    report["prompt_accuracy"] = json.loads((demo / "prompt_accuracy.json").read_text())

    real, generated = demo / "real", demo / "generated"

    def generate_for_captions():
        if real.exists():  # the renders are a function of (seed, count): made again rather than trusted
            import shutil
            shutil.rmtree(real)
        data.shapes.main(["--export", str(real), "--num-images", str(args.fid_images), "--seed", "7"])
        captions = [json.loads(line)["text"] for line in (real / "metadata.jsonl").read_text().splitlines()]
        (demo / "real_captions.txt").write_text("\n".join(captions) + "\n")
        sample_cli.main(pipeline + ["--prompts-file", str(demo / "real_captions.txt"), "--n", "1",
                                    "--batch-size", "250", "--out", str(demo / "generated.png")])

    timer.run("images for FID and CLIP score", generate_for_captions)

    def judge():
        fid = metrics.fid.main([str(generated), str(real), "--features", str(paths["classifier"]), "--kid",
                                "--kid-subset-size", str(min(1000, args.fid_images // 2))])
        scores = {}
        for name, folder in (("generated", generated), ("real", real)):
            out = demo / f"clip_score_{name}.json"
            out.unlink(missing_ok=True)
            metrics.clip_score.main(["--clip", str(paths["clip"]), "--images", str(folder), "--out", str(out)])
            scores[name] = json.loads(out.read_text())
        return fid, scores

    fid, scores = timer.run("FID, KID and CLIP score", judge)
    report["fid"] = fid
    report["clip_score"] = scores
    vae_ckpt = load_checkpoint(paths["vae"], "vae")
    report["vae"] = {"psnr_db": vae_ckpt.get("psnr"), "scale_factor": vae_ckpt["scale_factor"],
                     "attribute_accuracy_of_reconstructions": reconstruction_accuracy(
                         paths["vae"], paths["classifier"], num_images=min(1000, args.fid_images))}
    report["stage_seconds"] = timer.seconds
    report["stages_beside_the_vae"] = sorted(timer.beside)
    report["total_seconds"] = round(time.time() - t_start, 1)
    report["smoke"] = args.smoke
    (demo / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")

    # ---- the summary
    print("\n==== demo summary" + ("  (--smoke: a few steps per stage; the figures mean nothing)" if args.smoke else ""))
    for name, seconds in timer.seconds.items():
        print(f"  {name:32s} {seconds:6.0f} s" + ("  (beside the VAE, one thread)" if name in timer.beside else ""))
    print(f"  {'total':32s} {report['total_seconds']:6.0f} s")
    for split in ("heldin", "heldout"):
        acc = report["prompt_accuracy"][split]
        print(f"  prompt accuracy {split:8s} colour {acc['colour']:.3f} | shape {acc['shape']:.3f}")
    print(f"  CLIP score (torchmetrics, CLIP-S)  generated {scores['generated']['torchmetrics_clip_score']:.2f}, "
          f"{scores['generated']['clip_s']:.4f} | real renders {scores['real']['torchmetrics_clip_score']:.2f}, "
          f"{scores['real']['clip_s']:.4f}")
    print(f"  FID {fid['fid']:.3f}, KID {fid['kid'][0]:.4f} (shapes-classifier features; not comparable with "
          f"published FIDs)")
    psnr = report["vae"]["psnr_db"]
    rec = report["vae"]["attribute_accuracy_of_reconstructions"]
    print(f"  VAE PSNR {psnr:.2f} dB; the classifier on its reconstructions: colour {rec['colour']:.3f} | "
          f"shape {rec['shape']:.3f} (the ceiling of prompt accuracy in latent space)")
    print(f"  pictures: {demo / 'samples.png'} (one row per prompt), "
          f"{demo / 'prompt_accuracy_heldin.png'}, {demo / 'prompt_accuracy_heldout.png'}, {generated}/")
    print(f"  figures:  {demo / 'metrics.json'}")


if __name__ == "__main__":
    run_cli(main)
