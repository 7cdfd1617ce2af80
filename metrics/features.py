"""Images in, feature vectors out: the part that FID, KID, the Inception Score and precision/recall share.

Reading an image folder, as pytorch-fid does (the same extensions, PIL decoding, no resizing here; the
feature network resizes; one difference: subfolders are read too, as torch-fidelity does, where pytorch-fid
reads only the top level, so keep a set flat to get the same statistics from both), but refusing what would
give a silently wrong number:
    fewer than 2 images              a covariance needs two
    files that are not images        named; metadata.jsonl / metadata.csv (an imagefolder's captions) and
                                     hidden files are skipped
    mixed sizes                      a set of images is one size (the file and both sizes are named)
    grey images                      FID networks read RGB; replicating one channel three times is a choice
                                     to make on purpose (convert the files first), not by accident
Every error is one line (a ValueError / FileNotFoundError that core.runtime.run_cli prints, exit code 2).

Feature networks (`--features`):
    inception          the FID Inception (metrics/inception.py), pool3 (2048-d); with the published weights
                       the figures are comparable with papers that use the same preprocessing mode
    <checkpoint>       a shapes attribute classifier (models/classifier.py, `python -m train.classifier`):
                       the global average of its last feature map (c-d, the input of its last linear
                       layer, as pool3 is for Inception). Works offline, but the figures are NOT comparable
                       with published FIDs, and every output says so.
Images travel as uint8 (B, 3, H, W); generated images in [-1, 1] become uint8 first (core.images.to_uint8),
exactly what saving them as PNG would give.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from metrics.inception import InceptionConfig, load_inception

IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # pytorch-fid's
SKIPPED_FILES = {"metadata.jsonl", "metadata.csv"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
NOT_COMPARABLE = "NOT comparable with published FIDs (not the Inception network)"


# ---------------------------------------------------------------- image folders

def list_images(folder):
    """The image files of `folder` and its subfolders, sorted; a one-line error for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is neither an image folder nor a statistics file (.npz)")
    files, others = [], []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name in SKIPPED_FILES or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        (files if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    if others:
        raise ValueError(f"{folder} holds {len(others)} file(s) that are not images (e.g. {others[0].name}); "
                         f"images are {' '.join(sorted(IMAGE_EXTENSIONS))}; move the others out")
    if len(files) < 2:
        raise ValueError(f"{folder} holds {len(files)} image(s); the statistics need at least 2 (and FID is "
                         f"only meaningful with thousands)")
    return files


def check_images(files):
    """Open every header (cheap: no pixel is decoded) before the long pass: one size, colour, readable.
    Returns (H, W)."""
    size = None
    for path in files:
        try:
            with Image.open(path) as image:
                mode, this = image.mode, image.size
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"cannot read image {path}: {type(e).__name__}; it is corrupt or not an image, "
                             f"replace or remove it") from None
        if mode in GREY_MODES:
            raise ValueError(f"{path} is a greyscale image (mode {mode}); the feature networks read RGB: convert "
                             f"the set on purpose first (e.g. PIL's image.convert('RGB'))")
        if size is None:
            size, first = this, path
        elif this != size:
            raise ValueError(f"images of mixed sizes: {first.name} is {size[0]}x{size[1]} but {path.name} is "
                             f"{this[0]}x{this[1]}; resize the set to one size first")
    return size[1], size[0]


def read_batches(files, batch_size):
    """uint8 (B, 3, H, W) batches of the files, in order (RGB as pytorch-fid: image.convert('RGB'))."""
    for i in range(0, len(files), batch_size):
        arrays = []
        for path in files[i: i + batch_size]:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


# ---------------------------------------------------------------- feature networks

@dataclass
class FeatureNet:
    """A feature network and what its figures can be compared with."""
    name: str                 # "inception" or the checkpoint path
    description: str          # stored in statistics files, printed with every figure
    dim: int                  # feature dimension D
    comparable: bool          # True only for the FID Inception (with the published weights)
    model: torch.nn.Module
    device: torch.device

    @torch.no_grad()
    def __call__(self, images):
        """uint8 (B, 3, H, W) -> float32 (B, D) on the CPU."""
        assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3, \
            f"expected uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        images = images.to(self.device)
        if self.name == "inception":
            return self.model(images).float().cpu()                               # (B, 2048)
        R = self.model.cfg.resolution
        x = images.float() / 127.5 - 1                                            # (B, 3, H, W) in [-1, 1]
        if x.shape[-2:] != (R, R):  # as models.classifier.predict_attributes does
            x = F.interpolate(x, size=(R, R), mode="bilinear", antialias=True, align_corners=False)
        return self.model.features(x).mean(dim=(2, 3)).float().cpu()              # (B, c)

    @torch.no_grad()
    def logits(self, features):
        """Class logits for the Inception Score: (B, 2048) -> (B, 1008), without the bias."""
        if self.name != "inception":
            raise ValueError("the Inception Score needs --features inception (a class distribution over "
                             "ImageNet); the shapes classifier has no single class output")
        return self.model.logits(features.to(self.device)).float().cpu()


def load_feature_net(features="inception", inception_weights="", resize="pytorch-fid", device="cpu"):
    """'inception' -> the FID Inception (weights from the flag or $FID_INCEPTION_WEIGHTS); a path -> a shapes
    classifier checkpoint's pooled features."""
    device = torch.device(device)
    if features == "inception":
        model = load_inception(InceptionConfig(resize=resize, weights=inception_weights), device)
        return FeatureNet("inception", f"Inception pool3 (2048-d, {resize} preprocessing)", 2048, True, model, device)
    from models.classifier import load_classifier

    if not Path(features).is_file():
        raise FileNotFoundError(f"--features {features}: neither 'inception' nor an existing checkpoint; train the "
                                f"shapes classifier with python -m train.classifier --config "
                                f"configs/shapes/classifier.yaml, or pass --features inception")
    model, cfg = load_classifier(features, device)
    description = (f"shapes classifier {features} (pooled last feature map, {cfg.channels}-d), "
                   f"{NOT_COMPARABLE}")
    return FeatureNet(str(features), description, cfg.channels, False, model, device)


def extract(feature_net, batches, total=None, desc="features", progress=True):
    """Iterate over (B, D) feature batches of uint8 image batches, with a progress bar counting images."""
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for images in batches:
            yield feature_net(images)
            bar.update(len(images))


def image_batches(images, batch_size):
    """uint8 (N, 3, H, W) in memory -> batches, for images that never touched the disk."""
    for i in range(0, len(images), batch_size):
        yield images[i: i + batch_size]
