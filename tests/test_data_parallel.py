"""Data parallelism in the training scripts that average gradients themselves (train/common.Ranks): the dVAE and the
DALL-E transformer under torchrun. Two ranks, each on half of the batch, must train the weights one process trains on
the whole batch, to float rounding, wherever the step draws nothing at random per rank; and the ranks must end with
identical replicas. The ranks here are two spawned processes on gloo, set up as torchrun sets them (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from core.checkpoint import load_checkpoint
from core.runtime import run_cli
from tests.test_dalle_pipeline import DALLE_TINY
from tests.test_dvae import TINY as DVAE_TINY
from train import dalle as train_dalle
from train import dvae as train_dvae
from train.common import Ranks

SCRIPTS = {"dvae": train_dvae, "dalle": train_dalle}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_on_rank(rank, script, argv, port):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    run_cli(lambda: SCRIPTS[script].main(argv))  # ends the process as torchrun's ranks end (os._exit)


def torchrun(script, argv):
    mp.spawn(_train_on_rank, args=(script, argv, free_port()), nprocs=2)


def assert_same_weights(a, b, atol):
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def dvae_ckpt(tmp_path_factory):
    """A tiny dVAE stopped at the end of its joint phase (step 2 of 4, decoder_share 0.5)."""
    out = tmp_path_factory.mktemp("dp_dvae") / "joint"
    train_dvae.main(["--config", "configs/shapes/dvae.yaml", *DVAE_TINY, f"train.out_dir={out}", "train.steps=4",
                     "train.decoder_share=0.5", "train.stop_after=2", "train.channels_last=false"])
    return out / "ckpt.pt"


def test_two_ranks_train_the_dvae_decoder_as_one_process_does(dvae_ckpt, tmp_path):
    """The decoder phase draws nothing at random: two ranks resumed from the same checkpoint equal one process."""
    argv = ["--config", "configs/shapes/dvae.yaml", *DVAE_TINY, "train.steps=4", "train.decoder_share=0.5",
            f"train.resume={dvae_ckpt}", "train.channels_last=false", "train.eval_images=8"]
    train_dvae.main([*argv, f"train.out_dir={tmp_path / 'one'}"])
    torchrun("dvae", [*argv, f"train.out_dir={tmp_path / 'two'}"])
    one = load_checkpoint(tmp_path / "one" / "ckpt.pt", "dvae")
    two = load_checkpoint(tmp_path / "two" / "ckpt.pt", "dvae")
    assert one["step"] == two["step"] == 4
    assert_same_weights(one["model"], two["model"], atol=1e-5)
    moved = load_checkpoint(dvae_ckpt, "dvae")["model"]
    assert any(not torch.equal(moved[k], two["model"][k]) for k in moved if k.startswith("decoder."))
    assert two["psnr"] == pytest.approx(one["psnr"], abs=1e-3)  # rank 0 evaluates once, the same held-out images


def test_two_ranks_train_the_transformer_as_one_process_does(dvae_ckpt, tmp_path, capfd):
    """With the caption dropout off, a step of two ranks on half the batch each is the whole batch's step; the
    tokens are encoded half by each rank and shared."""
    argv = ["--config", "configs/shapes/dalle.yaml", f"dvae={dvae_ckpt}", *DALLE_TINY, "model.image_vocab=32",
            "train.steps=3", "train.cond_drop_prob=0"]
    train_dalle.main([*argv, f"train.out_dir={tmp_path / 'one'}"])
    capfd.readouterr()
    torchrun("dalle", [*argv, f"train.out_dir={tmp_path / 'two'}"])
    out = capfd.readouterr().out
    assert "2 process(es)" in out and "DDP: the 2 replicas hold identical weights" in out
    one = load_checkpoint(tmp_path / "one" / "ckpt.pt", "dalle")
    two = load_checkpoint(tmp_path / "two" / "ckpt.pt", "dalle")
    assert_same_weights(one["model"], two["model"], atol=1e-5)


def test_a_batch_the_ranks_cannot_split_is_refused_before_joining(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"train.batch_size \(8\) must be divisible by the 3 DDP ranks"):
        Ranks(8)
