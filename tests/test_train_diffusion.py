"""Smoke runs of the diffusion training script and the sampling script on tiny data, exact resumption,
two-process DDP on gloo, and the bad-input contract (one line, exit code 2, nothing overwritten)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample.__main__ as sample_cli
from core.checkpoint import load_checkpoint
import core.runtime as runtime
from core.runtime import run_cli
from models.pipeline import load_pipeline
from train import diffusion

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.num_images=48", "data.resolution=16", "unet.image_size=16", "unet.channels=16",
        "unet.channel_mult=[1, 2]", "unet.num_res_blocks=1", "unet.attention_resolutions=[8]",
        "unet.norm_groups=8", "unet.context_dim=32", "text.width=32", "text.layers=1", "text.max_length=16",
        "tokenizer.vocab_size=300", "train.batch_size=8", "train.log_every=1", "train.sample_every=0",
        "train.sample_steps=2", "train.device=cpu", "train.sample_prompts=[a red circle, a blue square]"]


def train(tmp_path, *extra, name="run"):
    out = tmp_path / name
    diffusion.main(TINY + [f"train.out_dir={out}", *extra])
    return out


def losses(text):
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+) \| loss ([0-9.]+)", text)}


def cli_error(main, argv, capsys):
    """Run a command line the way `python -m` does; return its one-line error."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the sampling tests."""
    return train(tmp_path_factory.mktemp("trained"), "train.steps=3")


def test_training_writes_everything(trained):
    ckpt = load_checkpoint(trained / "ckpt.pt", "diffusion")
    assert ckpt["step"] == 3 and ckpt["config"]["unet"]["channels"] == 16
    assert set(ckpt) >= {"model", "ema", "optimizer", "tokenizer", "rng", "config"}
    assert (trained / "config.yaml").read_text().startswith("data:")
    assert list((trained / "tensorboard").iterdir())
    assert (trained / "samples" / "step_0000003.png").is_file()


def test_resume_continues_exactly(tmp_path, capsys):
    whole = train(tmp_path, "train.steps=6", name="whole")
    whole_log = losses(capsys.readouterr().out)
    part = train(tmp_path, "train.steps=6", "train.stop_after=3", name="part")
    first_log = losses(capsys.readouterr().out)
    assert load_checkpoint(part / "ckpt.pt", "diffusion")["step"] == 3
    train(tmp_path, "train.steps=6", "train.resume=always", name="part")
    resumed_log = losses(capsys.readouterr().out)
    assert sorted(first_log) == [1, 2, 3] and sorted(resumed_log) == [4, 5, 6]
    assert {**first_log, **resumed_log} == whole_log
    a, b = (load_checkpoint(d / "ckpt.pt", "diffusion") for d in (whole, part))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["weights"]:
        assert torch.equal(a["ema"]["weights"][key], b["ema"]["weights"][key]), key


def test_without_ema_the_checkpoint_serves_the_trained_weights(tmp_path, capsys):
    """train.ema_decay=0: no EMA is kept or stored, sampling loads the trained weights, and a resumed run still
    continues exactly; an EMA cannot be switched on over such a checkpoint."""
    whole = train(tmp_path, "train.steps=4", "train.ema_decay=0", name="whole")
    part = train(tmp_path, "train.steps=4", "train.ema_decay=0", "train.stop_after=2", name="part")
    train(tmp_path, "train.steps=4", "train.ema_decay=0", "train.resume=always", name="part")
    a, b = (load_checkpoint(d / "ckpt.pt", "diffusion") for d in (whole, part))
    assert a["ema"] is None and b["ema"] is None and b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    pipe = load_pipeline(whole / "ckpt.pt")
    served = pipe.model.state_dict()
    assert set(served) == set(a["model"]) and all(torch.equal(served[k], a["model"][k]) for k in served)
    capsys.readouterr()
    err = cli_error(diffusion.main, TINY + [f"train.out_dir={whole}", "train.resume=always", "train.steps=5",
                                            "train.ema_decay=0.99"], capsys)
    assert "cannot resume with train.ema_decay > 0 from a checkpoint that has no EMA weights" in err
    for bad in ("1", "-0.1"):
        err = cli_error(diffusion.main, TINY + [f"train.ema_decay={bad}"], capsys)
        assert f"train.ema_decay must be in [0, 1) (0 = no EMA: sampling uses the trained weights), got {float(bad)}" in err


def test_sampling_is_reproducible_and_writes_an_imagefolder(trained, tmp_path):
    common = ["--ckpt", str(trained / "ckpt.pt"), "--prompt", "a red circle", "--prompt", "a blue square",
              "--n", "2", "--steps", "3", "--guidance", "2", "--device", "cpu"]
    sample_cli.main(common + ["--seed", "1", "--out", str(tmp_path / "a.png")])
    sample_cli.main(common + ["--seed", "1", "--out", str(tmp_path / "b.png")])
    sample_cli.main(common + ["--seed", "2", "--out", str(tmp_path / "c.png")])
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    singles = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert singles == ["0000.png", "0001.png", "0002.png", "0003.png", "metadata.jsonl"]
    lines = (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()
    assert '"text": "a blue square"' in lines[2]
    assert np.asarray(Image.open(tmp_path / "a" / "0000.png")).shape == (16, 16, 3)


def test_ddpm_and_ddim_both_run(trained, tmp_path):
    for sampler in ("ddpm", "ddim"):
        sample_cli.main(["--ckpt", str(trained / "ckpt.pt"), "--prompt", "a red circle", "--n", "1",
                         "--sampler", sampler, "--steps", "2", "--device", "cpu",
                         "--out", str(tmp_path / f"{sampler}.png")])
        assert (tmp_path / f"{sampler}.png").is_file()


@pytest.mark.parametrize("kind, m, s, p", [("logit_normal", 0.0, 1.0, 0), ("logit_normal", 0.5, 1.0, 0),
                                            ("logit_normal", -1.0, 0.6, 0), ("uniform", None, None, 0),
                                            ("logit_normal", -0.5, 1.0, 0.1), ("logit_normal", 2.0, 0.5, 0.3)])
def test_training_timesteps_follow_their_distribution(kind, m, s, p):
    """DDPM Algorithm 1: t ~ U{0..T-1}, so P(t < k) = k / T. SD3 Sec. 3.1: t / T = sigmoid(u), u ~ N(m, s^2), so
    P(t < k) = Phi((logit(k / T) - m) / s); with uniform_mix p the mixture (1 - p) Phi(...) + p k / T. All drawn
    from the step's generator alone."""
    T, n = 1000, 200_000
    tc = diffusion.DiffusionTrain(timesteps=kind, **({} if m is None else dict(logit_mean=m, logit_std=s,
                                                                                uniform_mix=p)))
    t = diffusion.sample_timesteps(tc, T, n, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.long and 0 <= t.min() and t.max() <= T - 1
    k = torch.arange(1, T, dtype=torch.float64)
    if kind == "uniform":
        expected = k / T
    else:
        expected = torch.distributions.Normal(0.0, 1.0).cdf((torch.logit(k / T) - m) / s)  # P(t < k)
        expected = (1 - p) * expected + p * k / T
    empirical = torch.bincount(t, minlength=T).cumsum(0)[:-1].double() / n  # P(t <= k - 1)
    assert (empirical - expected).abs().max() < 0.005  # Kolmogorov-Smirnov distance; 1.36 / sqrt(n) = 0.003
    state = torch.get_rng_state()
    again = diffusion.sample_timesteps(tc, T, n, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(t, again) and torch.equal(torch.get_rng_state(), state)  # the generator's draws only


def test_bad_training_input(tmp_path, capsys, trained):
    err = cli_error(diffusion.main, TINY + ["unet.chanels=8"], capsys)
    assert "unknown config key 'unet.chanels'; did you mean 'unet.channels'?" in err
    err = cli_error(diffusion.main, TINY + ["unet.image_size=32"], capsys)
    assert "unet.image_size (32) must equal data.resolution (16)" in err
    before = (trained / "ckpt.pt").read_bytes()
    err = cli_error(diffusion.main, TINY + [f"train.out_dir={trained}", "train.steps=3"], capsys)
    assert "exists; pass train.resume=auto" in err
    assert (trained / "ckpt.pt").read_bytes() == before
    err = cli_error(diffusion.main, TINY + [f"train.out_dir={trained}", "train.resume=always", "unet.channels=24",
                                            "unet.norm_groups=8"], capsys)
    assert "was made with another config (unet.channels: 16 -> 24)" in err
    # a checkpoint made before a config key existed (unet.patch_size) resumes: the key takes its default
    old = torch.load(trained / "ckpt.pt", weights_only=True)
    del old["config"]["unet"]["patch_size"]
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "ckpt.pt")
    diffusion.main(TINY + [f"train.out_dir={tmp_path / 'old'}", "train.resume=always", "train.steps=4"])
    assert torch.load(tmp_path / "old" / "ckpt.pt", weights_only=True)["step"] == 4
    capsys.readouterr()
    before = (trained / "ckpt.pt").read_bytes()
    err = cli_error(diffusion.main, TINY + [f"train.out_dir={trained}", "train.resume=always", "train.steps=4",
                                            "train.ema_decay=0.99"], capsys)
    assert "EMA decay is 0.999 but this run asks for 0.99; resume with train.ema_decay=0.999" in err
    assert (trained / "ckpt.pt").read_bytes() == before
    err = cli_error(diffusion.main, TINY + [f"train.out_dir={tmp_path / 'none'}", "train.resume=always"], capsys)
    assert "checkpoint not found" in err
    err = cli_error(diffusion.main, TINY + ["train.timesteps=lognormal"], capsys)
    assert "train.timesteps must be uniform or logit_normal" in err
    err = cli_error(diffusion.main, TINY + ["train.timesteps=logit_normal", "train.uniform_mix=1.5"], capsys)
    assert "train.uniform_mix is the fraction of uniform timesteps, in [0, 1]; got 1.5" in err


def test_bad_sampling_input(tmp_path, capsys, trained):
    ckpt = str(trained / "ckpt.pt")
    base = ["--ckpt", ckpt, "--n", "1", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "x.png")]
    assert "empty prompt" in cli_error(sample_cli.main, base + ["--prompt", "  "], capsys)
    long_prompt = " ".join(["a red circle"] * 20)
    err = cli_error(sample_cli.main, base + ["--prompt", long_prompt], capsys)
    assert "limit" in err and "truncate" in err
    err = cli_error(sample_cli.main, ["--ckpt", str(tmp_path / "missing.pt"), "--prompt", "a red circle"], capsys)
    assert "checkpoint not found" in err
    torch.save({"kind": "shapes_classifier"}, tmp_path / "clf.pt")
    err = cli_error(sample_cli.main, ["--ckpt", str(tmp_path / "clf.pt"), "--prompt", "a red circle"], capsys)
    assert "'shapes_classifier' checkpoint but a 'diffusion'" in err
    (tmp_path / "x.png").write_bytes(b"keep me")
    err = cli_error(sample_cli.main, base + ["--prompt", "a red circle"], capsys)
    assert "already exists" in err and (tmp_path / "x.png").read_bytes() == b"keep me"
    sample_cli.main(base + ["--prompt", long_prompt, "--truncate", "--overwrite"])  # explicit truncation works
    assert (tmp_path / "x.png").read_bytes() != b"keep me"


def test_training_says_how_many_captions_it_cut(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    captions = ["a red circle", "a blue square " + "and a green star " * 6, "a star"]
    with open(folder / "metadata.jsonl", "w") as meta:
        for i, caption in enumerate(captions):
            Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
            meta.write(f'{{"file_name": "{i}.png", "text": "{caption}"}}\n')
    train(tmp_path, f"data.dataset=folder:{folder}", "data.num_images=0", "train.batch_size=3", "train.steps=1",
          "tokenizer.vocab_size=260")
    out = capsys.readouterr().out
    n, longest = re.search(r"(\d+) of 3 caption\(s\) are longer than max_length=16 tokens \(the longest (\d+)",
                           out).groups()
    assert n == "1" and int(longest) > 16


def test_ddp_two_processes_on_gloo(tmp_path):
    """torchrun with 2 CPU processes: training runs and the replicas end with identical weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train.diffusion", *TINY, "train.steps=3", f"train.out_dir={tmp_path / 'ddp'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "DDP: the 2 replicas hold identical weights" in result.stdout
    assert load_checkpoint(tmp_path / "ddp" / "ckpt.pt", "diffusion")["step"] == 3


def test_a_rank_leaves_with_os_exit_and_its_exit_code(monkeypatch, capsys):
    """A process that joined torchrun's group ends through os._exit, past the interpreter's teardown (where gloo's
    worker threads, still freeing the last collectives, abort it): with the code the command earned (0, or 2 for bad
    input) and its output flushed first."""
    codes = []
    monkeypatch.setattr(runtime, "_joined_group", True)
    monkeypatch.setattr(runtime.os, "_exit", codes.append)  # records instead of ending pytest
    runtime.run_cli(lambda: print("trained"))

    def bad_input():
        raise ValueError("unknown config key 'train.stpes'")
    with pytest.raises(SystemExit):
        runtime.run_cli(bad_input)
    assert codes == [0, 2]
    out, err = capsys.readouterr()
    assert out == "trained\n" and err == "error: unknown config key 'train.stpes'\n"
    monkeypatch.setattr(runtime, "_joined_group", False)  # a process outside any group exits as Python does
    runtime.run_cli(lambda: None)
    assert codes == [0, 2]
