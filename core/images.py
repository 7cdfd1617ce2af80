"""Pictures: (B, 3, H, W) float images in [-1, 1] -> uint8 arrays and grids, for files and tensorboard."""
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(images):
    """(B, 3, H, W) floats in [-1, 1] -> (B, H, W, 3) uint8 numpy array."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images, nrow=None, pad=2):
    """(B, 3, H, W) in [-1, 1] -> one PIL image with the batch laid out in rows of `nrow`."""
    arr = to_uint8(images)
    B, H, W, _ = arr.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = math.ceil(B / nrow)
    grid = np.full((ncol * (H + pad) + pad, nrow * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = arr[i]
    return Image.fromarray(grid)
