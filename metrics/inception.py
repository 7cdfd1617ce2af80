"""Inception v3, FID variant: the network whose pool3 features define FID, KID and precision/recall, and whose
logits define the Inception Score.

Szegedy et al. 2015, "Rethinking the Inception Architecture for Computer Vision", arXiv 1512.00567 (Fig. 5-7
and Table 1: the A, C and E modules and the grid reductions B and D). The weights that make FID comparable
across papers are TensorFlow's graph of 2015-12-05, which Salimans et al. 2016 (Inception Score, arXiv
1606.03498) and Heusel et al. 2017 (FID, arXiv 1706.08500, their TTUR code) used; pytorch-fid ported them as
`pt_inception-2015-12-05-6726825d.pth` (torch-fidelity ships the same tensors under the same names). This file
builds the network by hand with exactly those state_dict names, so the published file loads into it:

    python -m metrics.fid A B --inception-weights /path/to/pt_inception-2015-12-05-6726825d.pth
    FID_INCEPTION_WEIGHTS=/path/to/pt_inception-2015-12-05-6726825d.pth python -m metrics.fid A B

How the TF graph differs from torchvision's Inception3 (pytorch-fid patches the same four places):
    Mixed_5b-5d (A), 6b-6e (C), 7b (E)   the pool branch's 3x3 average pool ignores the zero padding
                                         (count_include_pad=False: TF's "SAME" average pool)
    Mixed_7c (E)                         that pool branch max-pools instead (a quirk of the 2015 graph)
    fc                                   1008 classes (ImageNet's 1000 and 8 unused), no auxiliary classifier

Preprocessing, on uint8 images (B, 3, H, W) of any size (`InceptionConfig.resize`):
    pytorch-fid  x / 255, F.interpolate(bilinear, 299 x 299, align_corners=False, no antialias), 2 x - 1
                 (pytorch-fid's ToTensor and InceptionV3.forward; the default here)
    tf1          x as float, TensorFlow 1's resize_bilinear (align_corners=False: source = dest * in / out,
                 no half-pixel centres), (x - 128) / 128, as the TF graph of TTUR and torch-fidelity do
The two give different features for the same image (TF1's resize samples other points; 2x-1 vs
(x-128)/128), so an FID is comparable only with FIDs of the same mode; every output of metrics/fid.py says
which mode it used.

Outputs: pool3 features (B, 2048), the global average of Mixed_7c; the Inception Score uses the logits
pool3 @ fc.weight^T without fc.bias, as the original IS code (and torch-fidelity's "logits_unbiased") does.

Shapes: B batch, C channels, H x W spatial size (299 -> 149 -> 147 -> 73 -> 71 -> 35 -> 17 -> 8).
"""
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.checkpoint import load_weights

WEIGHTS_ENV = "FID_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
RESIZE_MODES = ("pytorch-fid", "tf1")


@dataclass
class InceptionConfig:
    resize: str = "pytorch-fid"   # pytorch-fid | tf1 (TensorFlow 1 resize and (x-128)/128, as torch-fidelity)
    weights: str = ""             # path of pt_inception-2015-12-05-6726825d.pth; '' = $FID_INCEPTION_WEIGHTS


# ---------------------------------------------------------------- building blocks

class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 0.001, TF's) -> ReLU. In eval mode the batch norm is folded into the
    convolution, w' = w * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps): one pass over
    the activations instead of three, the same function up to float rounding."""

    def __init__(self, c_in, c_out, **conv_args):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_args)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        if self.training:
            return F.relu(self.bn(self.conv(x)))
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)     # (C_out,)
        weight = self.conv.weight * scale[:, None, None, None]                     # (C_out, C_in, kh, kw)
        bias = self.bn.bias - self.bn.running_mean * scale                         # (C_out,)
        c = self.conv
        return F.relu(F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups))


def pool_ignoring_padding(x):
    """3x3 stride-1 average pool whose border windows average only the real pixels (TF's 'SAME' pool)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Fig. 5: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | pool -> 1x1, concatenated. (B, C, 35, 35) -> (B, 224 + p, 35, 35)"""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)                                                   # (B, 64, H, W)
        b5 = self.branch5x5_2(self.branch5x5_1(x))                               # (B, 64, H, W)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))    # (B, 96, H, W)
        bp = self.branch_pool(pool_ignoring_padding(x))                          # (B, pool_features, H, W)
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Fig. 10): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool 3x3/2. (B, 288, 35, 35) -> (B, 768, 17, 17)"""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)                                                   # (B, 384, 17, 17)
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (B, 96, 17, 17)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)                            # (B, 288, 17, 17)
        return torch.cat([b3, b3dbl, bp], 1)


class InceptionC(nn.Module):
    """Fig. 6 with n = 7, the n x n convolutions factorised into 1 x 7 and 7 x 1. (B, 768, 17, 17) -> same"""

    def __init__(self, c_in, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)                                                   # (B, 192, 17, 17)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))             # (B, 192, 17, 17)
        b7dbl = self.branch7x7dbl_1(x)                                           # (B, c7, 17, 17)
        b7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(b7dbl))
        b7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(b7dbl))                  # (B, 192, 17, 17)
        bp = self.branch_pool(pool_ignoring_padding(x))                          # (B, 192, 17, 17)
        return torch.cat([b1, b7, b7dbl, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool 3x3/2. (B, 768, 17, 17) -> (B, 1280, 8, 8)"""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))                               # (B, 320, 8, 8)
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))                          # (B, 192, 8, 8)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)                            # (B, 768, 8, 8)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """Fig. 7: the 3x3 outputs split into parallel 1x3 and 3x1. (B, C, 8, 8) -> (B, 2048, 8, 8).
    pool: "avg" (padding ignored) in Mixed_7b, "max" in Mixed_7c, as in the 2015 TF graph."""

    def __init__(self, c_in, pool):
        super().__init__()
        assert pool in ("avg", "max")
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)                                                   # (B, 320, 8, 8)
        b3 = self.branch3x3_1(x)                                                 # (B, 384, 8, 8)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)        # (B, 768, 8, 8)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))                      # (B, 384, 8, 8)
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)  # (B, 768, 8, 8)
        if self.pool == "avg":
            pooled = pool_ignoring_padding(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)                                            # (B, 192, 8, 8)
        return torch.cat([b1, b3, b3dbl, bp], 1)


# ---------------------------------------------------------------- preprocessing

def resize_tf1(x, size):
    """TensorFlow 1's tf.image.resize_bilinear(align_corners=False) of float images (B, C, H, W) -> (B, C, size, size).
    Output pixel i samples the source at i * in / out (no half-pixel centre), clamped at the last pixel, and
    lerps there in float32 (the arithmetic of torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x, which
    is bit-exact with TF on the CPU)."""
    B, C, H, W = x.shape

    def taps(n_in):
        src = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.long()                                      # floor: src >= 0
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, src - lo.float()                      # (size,) each

    y_lo, y_hi, dy = taps(H)
    x_lo, x_hi, dx = taps(W)
    top, bottom = x[:, :, y_lo], x[:, :, y_hi]                                   # (B, C, size, W)
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx                # (B, C, size, size)
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx
    return top + (bottom - top) * dy[:, None]


def preprocess(images, resize="pytorch-fid"):
    """uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299) in [-1, 1], as pytorch-fid or as TF1 / torch-fidelity."""
    B, C, H, W = images.shape
    assert images.dtype == torch.uint8 and C == 3, f"expected uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
    if resize == "pytorch-fid":
        x = images.float() / 255                                                 # ToTensor: [0, 1]
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1
    if resize == "tf1":
        x = resize_tf1(images.float(), INPUT_SIZE)                               # [0, 255]
        return (x - 128) / 128
    raise ValueError(f"unknown Inception resize {resize!r}; use one of {', '.join(RESIZE_MODES)}")


# ---------------------------------------------------------------- the network

class InceptionV3(nn.Module):
    """uint8 images (B, 3, H, W) -> pool3 features (B, 2048). logits(pool3) gives the 1008 class logits."""

    def __init__(self, cfg: InceptionConfig = None):
        super().__init__()
        self.cfg = cfg or InceptionConfig()
        if self.cfg.resize not in RESIZE_MODES:
            raise ValueError(f"unknown Inception resize {self.cfg.resize!r}; use one of {', '.join(RESIZE_MODES)}")
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)        # (B, 32, 149, 149)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)                 # (B, 32, 147, 147)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)      # (B, 64, 147, 147)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)                 # after max pool: (B, 80, 73, 73)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)                # (B, 192, 71, 71)
        self.Mixed_5b = InceptionA(192, pool_features=32)                       # after max pool: (B, 256, 35, 35)
        self.Mixed_5c = InceptionA(256, pool_features=64)                       # (B, 288, 35, 35)
        self.Mixed_5d = InceptionA(288, pool_features=64)                       # (B, 288, 35, 35)
        self.Mixed_6a = InceptionB(288)                                         # (B, 768, 17, 17)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)                       # (B, 768, 17, 17)
        self.Mixed_7a = InceptionD(768)                                         # (B, 1280, 8, 8)
        self.Mixed_7b = InceptionE(1280, pool="avg")                            # (B, 2048, 8, 8)
        self.Mixed_7c = InceptionE(2048, pool="max")                            # (B, 2048, 8, 8)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        return self.pool3(preprocess(images, self.cfg.resize))                  # (B, 2048)

    def pool3(self, x):
        """Preprocessed images (B, 3, 299, 299) in [-1, 1] (any size >= 75 works) -> (B, 2048)."""
        # channels-last (B, H, W, C in memory): oneDNN's convolutions run ~1.5x faster on the CPU that way;
        # the values are the same, only their order in memory changes
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))        # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                            # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                           # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                            # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                      # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                                    # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))       # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                      # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                               # pool3: (B, 2048)

    def logits(self, pool3):
        """(B, 2048) -> (B, 1008) class logits without fc.bias, as the original Inception Score code."""
        return pool3 @ self.fc.weight.T


def load_state_dict_file(path):
    """The published file (or any state_dict of this network) -> a state_dict with every key ours has.
    The published file predates BatchNorm's num_batches_tracked counter, which inference never reads."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read Inception weights {path} ({first[:120]}); expected {WEIGHTS_FILE}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state_dict; expected {WEIGHTS_FILE}")
    for key in [k for k in state if k.endswith(".bn.running_var")]:
        state.setdefault(key.replace("running_var", "num_batches_tracked"), torch.tensor(0))
    return state


def load_inception(cfg: InceptionConfig = None, device="cpu"):
    """The FID Inception with the published weights from cfg.weights or $FID_INCEPTION_WEIGHTS, in eval mode."""
    cfg = cfg or InceptionConfig()
    path = cfg.weights or os.environ.get(WEIGHTS_ENV, "")
    if not path:
        raise FileNotFoundError(
            f"no Inception weights: pass --inception-weights PATH or set {WEIGHTS_ENV} to {WEIGHTS_FILE} "
            f"(pytorch-fid's release file, fetched once on a connected machine); offline, use --features "
            f"<classifier checkpoint> instead")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found: {path}; give the path of {WEIGHTS_FILE}")
    model = InceptionV3(cfg)
    load_weights(model, load_state_dict_file(path), f"Inception weights {path}")
    return model.to(device).eval().requires_grad_(False)
