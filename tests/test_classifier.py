"""Shapes attribute classifier: the CenterNet targets and decoding are exact (an oracle network is read back to
the true attributes and scores zero loss), the scoring, and a smoke run of the training script."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.checkpoint import save_checkpoint
from data.shapes import make_item, sample_scene
from models.classifier import (BACKGROUND_NAMES, COLOUR_NAMES, HEAT_SIGMA, SHAPE_NAMES, SIZE_NAMES, ClassifierConfig,
                               ShapesClassifier, attributes_to_targets, cell_targets, detection_loss, load_classifier,
                               predict_attributes)
from train.classifier import main, score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Oracle(nn.Module):
    """Outputs exactly what the targets ask for, whatever the image: the best a trained network can do."""

    def __init__(self, cfg, attributes):
        super().__init__()
        self.cfg = cfg
        self.dummy = nn.Parameter(torch.zeros(()))
        self.targets = attributes_to_targets(attributes)
        self.cells = cell_targets(self.targets, cfg.grid)

    def forward(self, x):
        c = self.cells
        out = {k: 30.0 * F.one_hot(c[k], n).float() for k, n in
               (("colour", len(COLOUR_NAMES)), ("shape", len(SHAPE_NAMES)), ("size", len(SIZE_NAMES)))}
        out["heat"] = torch.logit(c["heat"].clamp(1e-7, 1 - 1e-7))
        out["offset"] = c["offset"]
        out["background"] = 30.0 * F.one_hot(self.targets["background"], len(BACKGROUND_NAMES)).float()
        return out


def test_cell_targets_gaussian_and_offsets():
    G = 8
    attrs = [{"objects": [{"shape": "star", "colour": "red", "size": "small", "x": 5.5 / G, "y": 3.5 / G},
                          {"shape": "heart", "colour": "blue", "size": "large", "x": 1.25 / G, "y": 6.5 / G}],
              "count": 2, "relation": None, "background": "gray"}]
    c = cell_targets(attributes_to_targets(attrs), G)
    assert c["heat"].shape == (1, G, G) and c["offset"].shape == (1, G, G, 2)
    assert c["heat"][0, 3, 5] == 1 and torch.allclose(c["offset"][0, 3, 5], torch.zeros(2))
    assert torch.isclose(c["heat"][0, 3, 6], torch.tensor(1.0).mul(-1 / (2 * HEAT_SIGMA ** 2)).exp())  # 1 cell away
    assert torch.allclose(c["offset"][0, 3, 6], torch.tensor([-1.0, 0.0]))     # centre is one cell to the left
    assert torch.allclose(c["offset"][0, 6, 1], torch.tensor([-0.25, 0.0]))
    assert SHAPE_NAMES[c["shape"][0, 3, 5]] == "star" and SHAPE_NAMES[c["shape"][0, 6, 1]] == "heart"
    assert COLOUR_NAMES[c["colour"][0, 6, 2]] == "blue"                         # nearest object owns the cell


@pytest.mark.parametrize("max_objects", [1, 3])
def test_an_oracle_is_decoded_to_the_true_attributes_with_zero_loss(max_objects):
    """The peak rule (3x3 local maxima of the heat above HEAT_THRESHOLD) recovers every object exactly, for
    every layout the dataset produces, so the classifier's errors are the network's, not the readout's."""
    cfg = ClassifierConfig(resolution=32, max_objects=max_objects)
    attributes = [sample_scene(11, i, "all", max_objects)[1] for i in range(400)]
    oracle = Oracle(cfg, attributes)
    images = torch.zeros(len(attributes), 3, 32, 32)
    predicted = predict_attributes(oracle, images)
    assert score(predicted, attributes) == {k: 1.0 for k in ("count", "background", "colour", "shape", "size",
                                                             "position", "image")}
    for p, a in zip(predicted, attributes):
        truth = sorted(a["objects"], key=lambda o: o["x"])
        assert p["count"] == a["count"] and p["background"] == a["background"]
        for po, to in zip(p["objects"], truth):
            assert (po["colour"], po["shape"], po["size"]) == (to["colour"], to["shape"], to["size"])
            assert abs(po["x"] - to["x"]) < 1e-5 and abs(po["y"] - to["y"]) < 1e-5
    assert detection_loss(oracle(images), oracle.targets).item() < 1e-4


def test_score_counts_misses():
    attributes = [sample_scene(0, i, "all", 3)[1] for i in range(50)]
    assert score(attributes, attributes)["image"] == 1.0
    dropped = [{**a, "objects": a["objects"][1:], "count": a["count"] - 1} for a in attributes]
    s = score(dropped, attributes)
    assert s["count"] == 0 and s["colour"] == s["shape"] == 1 - 50 / sum(a["count"] for a in attributes)
    moved = [{**a, "objects": [{**o, "x": o["x"] + 0.06} for o in a["objects"]]} for a in attributes]
    assert score(moved, attributes)["position"] == 0 and score(moved, attributes)["colour"] == 1


def test_network_shapes_and_bad_config():
    model = ShapesClassifier(ClassifierConfig(resolution=64, channels=16)).eval()
    out = model(torch.zeros(2, 3, 64, 64))
    assert out["heat"].shape == (2, 8, 8) and out["shape"].shape == (2, 8, 8, len(SHAPE_NAMES))
    assert out["offset"].shape == (2, 8, 8, 2) and out["background"].shape == (2, len(BACKGROUND_NAMES))
    with pytest.raises(ValueError, match="multiple of"):
        ShapesClassifier(ClassifierConfig(resolution=40))
    with pytest.raises(ValueError, match="eval_seed"):
        main(["train.eval_seed=0", "data.seed=0"])


def test_training_smoke_run_checkpoint_and_predict(tmp_path):
    out_dir = tmp_path / "clf"
    run = subprocess.run([sys.executable, "-m", "train.classifier", "train.steps=3", "train.batch_size=16",
                          "data.num_images=64", "train.eval_images=16", "train.log_every=1", "train.device=cpu",
                          "model.channels=16", f"train.out_dir={out_dir}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step 3 | loss" in run.stdout and "accuracy on 16 fresh renders" in run.stdout
    last = run.stdout.strip().splitlines()[-1]
    assert all(f"{k} " in last for k in ("count", "background", "colour", "shape", "size", "position")), last
    assert (out_dir / "config.yaml").is_file()

    model, cfg = load_classifier(out_dir / "ckpt.pt", "cpu")
    assert cfg == ClassifierConfig(channels=16) and not model.training
    image = torch.from_numpy(make_item(0, 0, 64)[0]).permute(2, 0, 1).float() / 127.5 - 1  # (3, 64, 64)
    predicted = predict_attributes(model, image[None].repeat(2, 1, 1, 1))  # resized to 32 px inside
    assert len(predicted) == 2 and predicted[0] == predicted[1]
    assert set(predicted[0]) == {"objects", "count", "background"} and predicted[0]["count"] == len(predicted[0]["objects"])
    assert predicted[0]["background"] in BACKGROUND_NAMES
    for o in predicted[0]["objects"]:
        assert set(o) == {"shape", "colour", "size", "x", "y"} and o["shape"] in SHAPE_NAMES
    with pytest.raises(ValueError, match="square RGB"):
        predict_attributes(model, torch.zeros(1, 3, 32, 48))

    save_checkpoint(tmp_path / "other.pt", {"kind": "diffusion", "config": {}})
    with pytest.raises(ValueError, match="shapes_classifier"):
        load_classifier(tmp_path / "other.pt")
