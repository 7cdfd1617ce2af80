"""Tests for train/dalle.py, models/dalle_pipeline.py and `python -m sample --pipeline dalle`: a smoke run of the
dVAE, the transformer and a re-ranking CLIP at 16 px, the sampling CLI's outputs and seeds, re-ranking that keeps
the CLIP's best, and the bad-input contract (one line, exit code 2, nothing overwritten)."""
import dataclasses
import json

import pytest
import torch

import sample.__main__ as sample_cli
from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import config_from_dict
from data.dataset import DataConfig, load_data
from models.dalle import sample_image_tokens
from models.dalle_pipeline import clip_scores, load_dalle_pipeline, rerank
from models.dvae import load_dvae, token_fingerprint
from tests.test_clip import CLIP_TINY
from tests.test_dvae import TINY as DVAE_TINY
from tests.test_train_diffusion import cli_error
from train import clip as train_clip
from train import dalle as train_dalle
from train import dvae as train_dvae
from train.dvae import TOKENS_FILE, load_train_tokens

DALLE_TINY = ["model.image_size=8", "model.image_vocab=32", "model.width=32", "model.layers=2", "model.heads=2",
              "model.attention=[row,column]", "data.resolution=16", "data.num_images=64", "tokenizer.vocab_size=300",
              "train.batch_size=8", "train.log_every=1", "train.sample_every=0", "train.device=cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dalle_runs")
    train_dvae.main(["--config", "configs/shapes/dvae.yaml", f"train.out_dir={out / 'dvae'}", "train.steps=3",
                     *DVAE_TINY])
    train_clip.main(["--config", "configs/shapes/clip.yaml", *CLIP_TINY, f"train.out_dir={out / 'clip'}"])
    train_dalle.main(["--config", "configs/shapes/dalle.yaml", f"dvae={out / 'dvae' / 'ckpt.pt'}",
                      f"train.out_dir={out / 'dalle'}", "train.steps=3", *DALLE_TINY])
    return out


def pipeline_flags(runs):
    return ["--pipeline", "dalle", "--config", "configs/shapes/pipeline_dalle.yaml", "--ckpt",
            str(runs / "dalle" / "ckpt.pt"), "--vae", str(runs / "dvae" / "ckpt.pt"), "--rerank-clip",
            str(runs / "clip" / "ckpt.pt"), "--device", "cpu"]


def test_training_writes_a_dalle_checkpoint(runs):
    ckpt = load_checkpoint(runs / "dalle" / "ckpt.pt", "dalle")
    assert ckpt["step"] == 3 and ckpt["config"]["model"]["text_vocab"] == len(ckpt["tokenizer"]["vocab"])
    assert set(ckpt) >= {"model", "optimizer", "tokenizer", "dvae", "rng", "config"}
    assert (runs / "dalle" / "samples" / "step_0000003.png").is_file()


def test_sample_cli_writes_grid_folder_and_metadata(runs, tmp_path):
    out = tmp_path / "grid.png"
    argv = pipeline_flags(runs) + ["--prompt", "a red circle", "--prompt", "a blue square", "--n", "2", "--seed", "3",
                                   "--out", str(out)]
    sample_cli.main(argv)
    rows = [json.loads(line) for line in (tmp_path / "grid" / "metadata.jsonl").read_text().splitlines()]
    assert out.is_file() and len(rows) == 4 and rows[2]["text"] == "a blue square"
    first = (tmp_path / "grid" / "0000.png").read_bytes()
    sample_cli.main(argv + ["--overwrite"])
    assert (tmp_path / "grid" / "0000.png").read_bytes() == first  # the same seed gives the same pixels
    sample_cli.main(argv + ["--overwrite", "--candidates", "3", "--top-k", "5", "--top-p", "0.9",
                            "--temperature", "0.8", "--guidance", "2"])
    assert len((tmp_path / "grid" / "metadata.jsonl").read_text().splitlines()) == 4


def test_reranking_keeps_the_clips_best(runs):
    pipe = load_dalle_pipeline(runs / "dalle" / "ckpt.pt", clip=runs / "clip" / "ckpt.pt")
    settings = pipe.settings_with(candidates=4, guidance=1.0)
    prompts = ["a red circle", "a green star"]
    kept = pipe(prompts, settings, generator=torch.Generator().manual_seed(0))
    # by hand: the same draws, decoded, scored by the CLIP, the argmax of each prompt's four kept
    ids, mask = pipe.tokenizer(prompts, max_length=pipe.model.cfg.text_length)
    text = pipe.model.text_ids(ids, mask).repeat_interleave(4, 0)
    images = pipe.dvae.decode(sample_image_tokens(pipe.model, text, generator=torch.Generator().manual_seed(0)))
    scores = clip_scores(pipe.clip, pipe.clip_tokenizer, images, [p for p in prompts for _ in range(4)]).view(2, 4)
    torch.testing.assert_close(kept, torch.stack([images[4 * b + scores[b].argmax()] for b in range(2)]))
    # the intermediate product: the kept candidates' token grids, which the dVAE decodes into the pictures
    assert pipe.intermediate.shape == (2, pipe.model.cfg.image_size, pipe.model.cfg.image_size)
    torch.testing.assert_close(pipe.dvae.decode(pipe.intermediate), kept)
    assert rerank(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2).tolist() == [1, 3]
    with pytest.raises(ValueError, match=r"cannot keep the best 5 of 4 candidates.*N >= k"):
        rerank(torch.zeros(4), 5)


def test_the_transformer_takes_the_codes_the_dvae_kept_of_the_same_images(runs, tmp_path, capsys):
    dvae, _ = load_dvae(runs / "dvae" / "ckpt.pt")
    kept = load_checkpoint(runs / "dvae" / TOKENS_FILE, "dvae_tokens")
    data_cfg = config_from_dict(DataConfig, kept["data"])
    images = load_data(data_cfg, progress=False).images
    # the decoder phase's codes (channels_last encoder) are the loaded encoder's argmax tokens of the training images
    assert torch.equal(kept["tokens"].long(), dvae.encode(images.float() / 127.5 - 1))
    fingerprint = token_fingerprint(dvae)
    assert torch.equal(load_train_tokens(runs / "dvae" / "ckpt.pt", fingerprint, data_cfg, len(images)),
                       kept["tokens"].long())
    # other images, another number of them, another encoder: not taken
    assert load_train_tokens(runs / "dvae" / "ckpt.pt", fingerprint, data_cfg, len(images) - 1) is None
    assert load_train_tokens(runs / "dvae" / "ckpt.pt", fingerprint,
                             dataclasses.replace(data_cfg, seed=data_cfg.seed + 1), len(images)) is None
    other = {**fingerprint, "encoder_sha256": "0" * 64}
    assert load_train_tokens(runs / "dvae" / "ckpt.pt", other, data_cfg, len(images)) is None
    # train.dalle says which it did
    argv = ["--config", "configs/shapes/dalle.yaml", f"dvae={runs / 'dvae' / 'ckpt.pt'}", "train.steps=1",
            *DALLE_TINY]
    train_dalle.main(argv + [f"train.out_dir={tmp_path / 'a'}"])
    assert f"took the dVAE's codes of the {len(images)} images" in capsys.readouterr().out
    train_dalle.main(argv + [f"train.out_dir={tmp_path / 'b'}", "data.num_images=48"])
    assert "encoded 48 images" in capsys.readouterr().out


def test_the_transformer_keeps_a_dvae_whose_decoder_changed_and_refuses_one_whose_encoder_did(runs, tmp_path):
    ckpt = load_checkpoint(runs / "dvae" / "ckpt.pt", "dvae")
    for part, accepted in (("decoder.", True), ("encoder.", False)):
        changed = {**ckpt, "model": {k: v + 0.01 if k.startswith(part) else v for k, v in ckpt["model"].items()}}
        path = tmp_path / f"{part}pt"
        save_checkpoint(path, changed)
        if accepted:
            pipe = load_dalle_pipeline(runs / "dalle" / "ckpt.pt", dvae=path)
            assert torch.equal(pipe.dvae.decoder.blocks.input.w, changed["model"]["decoder.blocks.input.w"])
        else:
            with pytest.raises(ValueError, match="not the dVAE whose tokens this transformer was trained on"):
                load_dalle_pipeline(runs / "dalle" / "ckpt.pt", dvae=path)


def test_bad_input(runs, tmp_path, capsys):
    flags = pipeline_flags(runs)
    out = ["--out", str(tmp_path / "g.png")]
    err = cli_error(sample_cli.main, flags + ["--prompt", "a red circle " * 20] + out, capsys)
    assert "over the limit max_length=16" in err and "truncate" in err
    for bad, message in ((["--top-k", "0"], "--top-k must be at least 1"),
                         (["--top-p", "1.5"], r"top_p must be in (0, 1]"),
                         (["--temperature", "0"], "temperature must be > 0"),
                         (["--candidates", "0"], "candidates must be at least 1"),
                         (["--steps", "10"], "--steps belong to the diffusion samplers")):
        assert message in cli_error(sample_cli.main, flags + ["--prompt", "a red circle"] + bad + out, capsys)
    assert not (tmp_path / "g.png").exists()
    # a dVAE of another K than the transformer's is refused, for training and for sampling
    err = cli_error(train_dalle.main, ["--config", "configs/shapes/dalle.yaml", f"dvae={runs / 'dvae' / 'ckpt.pt'}",
                                       f"train.out_dir={tmp_path / 'x'}", *DALLE_TINY, "model.image_vocab=64"], capsys)
    assert "does not fit the transformer" in err and "model.image_vocab=32" in err
    err = cli_error(train_dalle.main, ["--config", "configs/shapes/dalle.yaml", f"dvae={runs / 'dvae' / 'ckpt.pt'}",
                                       f"train.out_dir={tmp_path / 'x'}", *DALLE_TINY, "data.resolution=32"], capsys)
    assert "model.image_size=16" in err
    assert not (tmp_path / "x").exists()
