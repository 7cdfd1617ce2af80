"""Shapes attribute classifier: reads an image of data/shapes.py (rendered or generated) and says what is in it,
so a text-to-image model can be scored on whether its images show what the prompt asked for. This is the
GenEval idea (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment", arXiv 2310.11513), with a tiny detector in place of their Mask2Former.

The detector is a small CenterNet (Zhou, Wang & Krahenbuhl 2019, "Objects as Points", arXiv 1904.07850):
a fully convolutional network maps the image to a G x G grid of cells, and every cell predicts
    heat        is an object centre here?        (1 logit; target a Gaussian bump around each centre)
    colour, shape, size                          (logits, trained on the cells near each centre)
    offset      object centre - cell centre      (2 numbers, in cells)
and the image as a whole predicts its background. Objects are read off as the local maxima of the heat map
above HEAT_THRESHOLD, so the count is the number of peaks, there is no upper limit on it, and the network
never has to order objects. Being convolutional, it learns a shape once for every position.

Why the peaks are exact (G = 8): the target heat of a cell whose centre is d cells from an object centre is
exp(-d^2 / (2 sigma^2)) with sigma = 0.5, so the cell holding the centre has the largest heat, >= exp(-1) = 0.37
(d <= 0.71), and every cell outside the 3 x 3 block around it gets <= exp(-2) = 0.14 (d >= 1); a threshold
between the two and a 3 x 3 max-pool keep exactly one peak per object. Two objects of data/shapes.py are at least 0.3 image widths
(2.4 cells) apart, so their centre cells are >= 2 cells apart and a 3 x 3 max-pool never merges them.

Notation (paper -> code):
    Y_hat (heat map, after sigmoid)  heat        Y (Gaussian target)  target["heat"]
    O_hat (local offset)             offset      R (output stride)    resolution / G
Shapes: B batch, G grid side (cells), O objects per image (padded), K classes of one attribute.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from core.checkpoint import load_checkpoint, load_weights
from core.config import config_from_dict
from data.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES

COLOUR_NAMES, SHAPE_NAMES, SIZE_NAMES = list(COLOURS), list(SHAPES), list(SIZES)
BACKGROUND_NAMES = list(BACKGROUNDS)
HEAT_SIGMA = 0.5          # width of the target bump, in cells
HEAT_THRESHOLD = 0.25     # a local maximum above this is an object (between exp(-2) and exp(-1), see above)
NEAR_CENTRE = 0.1         # cells whose target heat exceeds this learn the attributes and offset of their object


@dataclass
class ClassifierConfig:
    resolution: int = 32          # input side; predict_attributes resizes other sizes to it
    max_objects: int = 1          # objects per training image, up to (the detector itself has no limit)
    channels: int = 64            # width of the network (half of it in the first, 2G x 2G, layer)
    grid: int = 8                 # G: the heat map is G x G cells; resolution must be a multiple of 2G


def conv_bn_relu(c_in, c_out, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ShapesClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        R, G = cfg.resolution, cfg.grid
        if R % (2 * G):
            raise ValueError(f"classifier resolution ({R}) must be a multiple of 2 * grid ({2 * G})")
        self.cfg = cfg
        c, f = cfg.channels, R // (2 * G)
        layers = [
            # space-to-depth: f x f blocks of pixels become 3 f^2 channels of a 2G x 2G map; no pixel is lost and
            # the cost no longer grows with the resolution
            nn.PixelUnshuffle(f),                                   # (B, 3 f^2, 2G, 2G)
            conv_bn_relu(3 * f * f, c // 2),
            conv_bn_relu(c // 2, c, stride=2),                      # (B, c, G, G)
            conv_bn_relu(c, c),
            # dilated convolutions widen the receptive field, so that a cell sees a whole large shape
            conv_bn_relu(c, c, dilation=2),
            conv_bn_relu(c, c, dilation=2),
        ]
        self.features = nn.Sequential(*layers)
        self.sizes = (1, len(COLOUR_NAMES), len(SHAPE_NAMES), len(SIZE_NAMES), 2)  # heat, colour, shape, size, offset
        self.cell_head = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(inplace=True), nn.Conv2d(c, sum(self.sizes), 1))
        self.background_head = nn.Linear(c, len(BACKGROUND_NAMES))

    def forward(self, x):
        """x (B, 3, R, R) in [-1, 1] -> dict: per-cell "heat" (B, G, G) logits, "colour"/"shape"/"size"
        (B, G, G, K) logits, "offset" (B, G, G, 2) in cells; per-image "background" (B, K) logits."""
        B, C, H, W = x.shape
        R, G = self.cfg.resolution, self.cfg.grid
        assert C == 3 and H == W == R, f"expected (B, 3, {R}, {R}), got {tuple(x.shape)}"
        h = self.features(x)                                                   # (B, c, G, G)
        cells = rearrange(self.cell_head(h), "b k gy gx -> b gy gx k")         # (B, G, G, sum K)
        heat, colour, shape, size, offset = cells.split(self.sizes, dim=-1)
        return {"heat": heat.squeeze(-1), "colour": colour, "shape": shape, "size": size, "offset": offset,
                "background": self.background_head(h.mean(dim=(2, 3)))}       # (B, K)


# ---------------------------------------------------------------- targets and loss

def attributes_to_targets(attributes):
    """Shapes attribute dicts -> padded per-object tensors: labels (B, O), centres "xy" (B, O, 2) in [0, 1],
    "exists" (B, O) and "background" (B,)."""
    B, O = len(attributes), max(1, max(a["count"] for a in attributes))
    t = {"exists": torch.zeros(B, O, dtype=torch.bool), "colour": torch.zeros(B, O, dtype=torch.long),
         "shape": torch.zeros(B, O, dtype=torch.long), "size": torch.zeros(B, O, dtype=torch.long),
         "xy": torch.zeros(B, O, 2), "background": torch.zeros(B, dtype=torch.long)}
    for b, a in enumerate(attributes):
        t["background"][b] = BACKGROUND_NAMES.index(a["background"])
        for j, obj in enumerate(a["objects"]):
            t["exists"][b, j] = True
            t["colour"][b, j] = COLOUR_NAMES.index(obj["colour"])
            t["shape"][b, j] = SHAPE_NAMES.index(obj["shape"])
            t["size"][b, j] = SIZE_NAMES.index(obj["size"])
            t["xy"][b, j] = torch.tensor([obj["x"], obj["y"]])
    return t


def cell_targets(targets, G):
    """Per-object targets -> per-cell ones: Gaussian heat (B, G, G), and for every cell the object it is
    nearest to (its labels (B, G, G) and its centre minus the cell centre, "offset" (B, G, G, 2), in cells)."""
    B, O = targets["exists"].shape
    centres = torch.arange(G, device=targets["xy"].device) + 0.5                # cell centres, in cells
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")                   # (G, G) each
    cell_xy = torch.stack([cx, cy], -1)                                        # (G, G, 2)
    obj_xy = targets["xy"] * G                                                 # (B, O, 2) in cells
    delta = obj_xy[:, :, None, None, :] - cell_xy                              # (B, O, G, G, 2)
    heat = torch.exp(-delta.pow(2).sum(-1) / (2 * HEAT_SIGMA ** 2))            # (B, O, G, G)
    heat = heat * targets["exists"][:, :, None, None]                          # padding objects: no heat
    heat, owner = heat.max(dim=1)                                              # (B, G, G): nearest object
    pick = lambda v: v.gather(1, owner.flatten(1)).view(B, G, G)               # (B, O) -> (B, G, G)
    offset = delta.gather(1, owner[:, None, :, :, None].expand(B, 1, G, G, 2)).squeeze(1)  # (B, G, G, 2)
    return {"heat": heat, "colour": pick(targets["colour"]), "shape": pick(targets["shape"]),
            "size": pick(targets["size"]), "offset": offset}


def detection_loss(out, targets):
    """CenterNet's three terms (heat map, attributes, offset at the cells near each centre) plus the background.
    The heat map uses plain BCE against the Gaussian bumps (the paper's focal variant, Eq. 1, is not needed
    with so few cells)."""
    B, G, _ = out["heat"].shape
    t = cell_targets(targets, G)
    # KL(target || predicted) per cell: BCE minus the target's own entropy, so a perfect heat map scores 0
    target_entropy = F.binary_cross_entropy(t["heat"], t["heat"], reduction="sum")
    heat_loss = (F.binary_cross_entropy_with_logits(out["heat"].float(), t["heat"], reduction="sum")
                 - target_entropy) / B
    near = t["heat"] > NEAR_CENTRE                                             # (B, G, G) cells that learn
    n = near.sum().clamp(min=1)
    attr_loss = sum(F.cross_entropy(out[k].float()[near], t[k][near], reduction="sum")
                    for k in ("colour", "shape", "size")) / n
    offset_loss = (out["offset"].float()[near] - t["offset"][near]).abs().sum() / n
    background_loss = F.cross_entropy(out["background"].float(), targets["background"])
    return heat_loss + attr_loss + offset_loss + background_loss


# ---------------------------------------------------------------- inference

@torch.no_grad()
def predict_attributes(model, images):
    """images (B, 3, H, H) in [-1, 1], any H (resized to the classifier's resolution) -> B dicts
    {"objects": [{"shape", "colour", "size", "x", "y"}, ...] sorted left to right, "count", "background"},
    x and y in [0, 1] (y downwards). Judge a relation between two objects with data.shapes.relation_holds."""
    B, C, H, W = images.shape
    R, G = model.cfg.resolution, model.cfg.grid
    if C != 3 or H != W:
        raise ValueError(f"predict_attributes expects square RGB images (B, 3, H, H), got {tuple(images.shape)}")
    param = next(model.parameters())
    x = images.to(device=param.device, dtype=torch.float32)
    if H != R:  # antialiased resize (a box-like average when shrinking), in float32 on every device
        x = F.interpolate(x, size=(R, R), mode="bilinear", antialias=True, align_corners=False)  # (B, 3, R, R)
    x = x.to(param.dtype)
    was_training = model.training
    model.eval()
    out = model(x)
    model.train(was_training)
    heat = torch.sigmoid(out["heat"].float())                                  # (B, G, G)
    peak = (heat == F.max_pool2d(heat[:, None], 3, 1, 1)[:, 0]) & (heat > HEAT_THRESHOLD)  # (B, G, G)
    labels = {k: out[k].argmax(-1) for k in ("colour", "shape", "size")}       # (B, G, G) each
    centres = torch.arange(G, device=heat.device) + 0.5
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    xy = (torch.stack([cx, cy], -1) + out["offset"].float()) / G               # (B, G, G, 2) in [0, 1]
    background = out["background"].argmax(-1).tolist()
    results = []
    for b in range(B):
        gy, gx = peak[b].nonzero(as_tuple=True)
        objects = [{"shape": SHAPE_NAMES[labels["shape"][b, i, j]], "colour": COLOUR_NAMES[labels["colour"][b, i, j]],
                    "size": SIZE_NAMES[labels["size"][b, i, j]],
                    "x": xy[b, i, j, 0].item(), "y": xy[b, i, j, 1].item()} for i, j in zip(gy.tolist(), gx.tolist())]
        objects.sort(key=lambda o: o["x"])
        results.append({"objects": objects, "count": len(objects), "background": BACKGROUND_NAMES[background[b]]})
    return results


def load_classifier(path, device="cpu"):
    """A checkpoint of train/classifier.py -> (model in eval mode on `device`, its ClassifierConfig)."""

    ckpt = load_checkpoint(path, "shapes_classifier")
    cfg = config_from_dict(ClassifierConfig, ckpt["config"]["model"])
    model = ShapesClassifier(cfg)
    load_weights(model, ckpt["model"], "shapes classifier weights")
    return model.to(device).eval(), cfg
