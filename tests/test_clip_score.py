"""CLIP score: our torchmetrics-convention figure equals torchmetrics' own computation (its update function fed
with our CLIP through its model/processor interface), CLIP-S is Hessel et al.'s per-sample clamp, and the command
line reads a `python -m sample` folder (or one `python -m data.shapes --export` writes), tells true from shuffled
pairs, and rejects bad input (missing folder, no metadata, empty caption, wrong checkpoint kind) in one line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.checkpoint import save_checkpoint
from core.config import config_to_dict
from data import shapes
from data.shapes import render_dataset
from metrics import clip_score
from models.clip import CLIP, CLIPConfig, VisionConfig, embed_images, embed_texts
from models.text_encoder import TextEncoderConfig
from models.tokenizer import BPETokenizer
from tests.reference_imports import import_open_clip
from tests.test_train_diffusion import cli_error

CAPTIONS = ["a red circle", "a blue square", "a photo of a small green triangle", "two yellow stars"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    tokenizer = BPETokenizer.train(CAPTIONS * 3, vocab_size=300, progress=False)
    cfg = CLIPConfig(embed_dim=16, text=TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_length=8, width=32,
                                                           layers=1, heads=4, causal=True),
                     vision=VisionConfig(kind="conv", image_size=16, width=8, layers=2))
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    path = tmp_path_factory.mktemp("clip") / "ckpt.pt"
    save_checkpoint(path, {"kind": "clip", "config": {"model": config_to_dict(cfg)}, "model": model.state_dict(),
                           "tokenizer": tokenizer.state_dict()})
    return model, tokenizer, path


class TorchmetricsModel:
    """Our CLIP behind the two methods of transformers' CLIPModel that torchmetrics calls."""

    def __init__(self, model):
        self.model, self.config = model, object()

    def to(self, device):
        return self

    def get_image_features(self, pixel_values):
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask):
        return self.model.encode_text(input_ids, attention_mask.bool())


class TorchmetricsProcessor:
    """Our preprocessing behind transformers' CLIPProcessor call signature."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            return {"pixel_values": torch.stack(images).float() / 127.5 - 1}
        ids, mask = self.tokenizer(text, max_length=self.max_length, truncate=True)
        return {"input_ids": ids, "attention_mask": mask.long()}


def test_equals_torchmetrics_and_clip_s_is_the_per_sample_clamp(tiny_clip):
    import_open_clip()  # makes torchvision importable on a CPU torch, which torchmetrics imports
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    model, tokenizer, _ = tiny_clip
    images = torch.from_numpy(render_dataset(4, 16, seed=3, progress=False)[0]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        score, n = _clip_score_update(list(images), CAPTIONS, TorchmetricsModel(model),
                                      TorchmetricsProcessor(tokenizer, model.cfg.text.max_length))
        cos = clip_score.cosines(model, tokenizer, images, CAPTIONS)
    torch.testing.assert_close(score, 100 * cos, atol=1e-4, rtol=1e-5)  # per pair, before any clamp
    theirs = torch.max(score.sum(0) / n, torch.zeros_like(score.sum(0))).item()  # CLIPScore.compute
    assert clip_score.torchmetrics_clip_score(cos) == pytest.approx(theirs, abs=1e-4)
    cos = torch.tensor([-0.5, 0.1, 0.3])
    assert clip_score.torchmetrics_clip_score(cos) == 0.0  # mean -0.033 clamped
    assert clip_score.clip_s(cos) == pytest.approx(2.5 * (0 + 0.1 + 0.3) / 3)


def write_folder(path, images, captions):
    path.mkdir()
    with open(path / "metadata.jsonl", "w") as f:
        for i, (image, caption) in enumerate(zip(images, captions)):
            Image.fromarray(image).save(path / f"{i:04d}.png")
            f.write(json.dumps({"file_name": f"{i:04d}.png", "text": caption}) + "\n")


def test_command_line_true_vs_shuffled_and_bad_input(tiny_clip, tmp_path, capsys):
    model, tokenizer, ckpt = tiny_clip
    images, captions, _ = render_dataset(6, 16, seed=4, progress=False)
    captions[0] = " ".join([captions[0]] * 5)  # over the 8-token context: cut, and counted
    write_folder(tmp_path / "imgs", images, captions)
    clip_score.main(["--clip", str(ckpt), "--images", str(tmp_path / "imgs"), "--device", "cpu",
                     "--out", str(tmp_path / "true.json")])
    printed = capsys.readouterr().out
    assert "torchmetrics  100*cos clamped at 0 after the mean" in printed and "CLIP-S" in printed
    figures = json.loads((tmp_path / "true.json").read_text())
    n_cut = sum(len(tokenizer.encode(c)) + 2 > 8 for c in captions)
    assert n_cut >= 1 and figures["truncated_captions"] == n_cut
    assert f"{n_cut} caption(s) over 8 tokens, cut to the first 7 tokens + <end>" in printed
    with torch.no_grad():
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        cos = (embed_images(model, x) * embed_texts(model, tokenizer, captions)).sum(-1)
    assert figures["clip_s"] == pytest.approx(clip_score.clip_s(cos), abs=1e-6)
    clip_score.main(["--clip", str(ckpt), "--images", str(tmp_path / "imgs"), "--device", "cpu", "--shuffle",
                     "--out", str(tmp_path / "shuffled.json")])
    assert json.loads((tmp_path / "shuffled.json").read_text())["mean_cos"] != pytest.approx(figures["mean_cos"])
    capsys.readouterr()
    err = cli_error(clip_score.main, ["--clip", str(tmp_path / "none.pt"), "--images", str(tmp_path / "imgs")], capsys)
    assert "checkpoint not found" in err
    (tmp_path / "empty").mkdir()
    err = cli_error(clip_score.main, ["--clip", str(ckpt), "--images", str(tmp_path / "empty")], capsys)
    assert "holds no images" in err
    before = (tmp_path / "true.json").read_text()
    err = cli_error(clip_score.main, ["--clip", str(ckpt), "--images", str(tmp_path / "imgs"),
                                      "--out", str(tmp_path / "true.json")], capsys)
    assert "exists" in err and (tmp_path / "true.json").read_text() == before


def test_shapes_export_is_a_folder_that_clip_score_reads(tiny_clip, tmp_path, capsys):
    _, _, ckpt = tiny_clip
    folder = tmp_path / "renders"
    shapes.main(["--export", str(folder), "--num-images", "5", "--resolution", "16", "--seed", "4"])
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    images, captions, _ = render_dataset(5, 16, seed=4, progress=False)
    assert [r["text"] for r in rows] == captions
    assert [r["file_name"] for r in rows] == [f"{i:04d}.png" for i in range(5)]
    assert all(np.array_equal(np.array(Image.open(folder / r["file_name"])), images[i]) for i, r in enumerate(rows))
    clip_score.main(["--clip", str(ckpt), "--images", str(folder), "--device", "cpu"])
    assert "CLIP score of 5 images" in capsys.readouterr().out
    err = cli_error(shapes.main, ["--export", str(folder), "--num-images", "2", "--resolution", "16"], capsys)
    assert "exists and is not empty" in err and len(list(folder.iterdir())) == 6  # nothing overwritten


def test_bad_input_is_one_line(tiny_clip, tmp_path, capsys):
    model, tokenizer, ckpt = tiny_clip
    images, captions, _ = render_dataset(3, 16, seed=5, progress=False)
    run = ["--clip", str(ckpt), "--device", "cpu", "--images"]
    err = cli_error(clip_score.main, run + [str(tmp_path / "nowhere")], capsys)
    assert "image folder" in err and "does not exist" in err
    (tmp_path / "bare").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "bare" / "0000.png")
    err = cli_error(clip_score.main, run + [str(tmp_path / "bare")], capsys)
    assert "has no metadata.jsonl or metadata.csv" in err
    write_folder(tmp_path / "blank", images, [captions[0], "  ", captions[2]])
    err = cli_error(clip_score.main, run + [str(tmp_path / "blank")], capsys)
    assert "empty caption for image 1" in err
    write_folder(tmp_path / "ok", images, captions)
    lm = tmp_path / "lm.pt"
    save_checkpoint(lm, {"kind": "text_lm", "config": {}, "model": {}, "tokenizer": tokenizer.state_dict()})
    err = cli_error(clip_score.main, ["--clip", str(lm), "--images", str(tmp_path / "ok")], capsys)
    assert "holds a 'text_lm' checkpoint but a 'clip' checkpoint is needed" in err
