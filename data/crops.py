"""Training images for the super-resolution stages of a cascade, rendered or read on the fly and cropped at random.

Saharia et al. 2022, "Imagen", arXiv 2205.11487, Sec. 2.5 and App. F.2: the 256 -> 1024 model is trained on
64 -> 256 crops of the 1024 px images, and then runs fully convolutionally on the whole image. Ho et al. 2021,
"Cascaded Diffusion Models", arXiv 2106.15282, Sec. 4 do the same for their 64 -> 256 stage. A batch of high
resolution images does not fit in memory the way the 32 px shapes do (20,000 x 1024^2 x 3 bytes = 63 GB), so a
CropSource holds only the recipes of its images and makes each batch when asked:

    dataset=shapes          the scene of item i (data/shapes.py, a function of (seed, i)) drawn once; the image is
                            rendered at data.resolution when item i is in a batch
    dataset=folder:<path>   the file names and captions; item i is read, resized so that its shorter side is
                            data.resolution and centre-cropped (data/dataset.py to_square_rgb) when in a batch.
                            Every image must be at least data.resolution on its shorter side: upsampling a small
                            image would teach the super-resolution model to invent the blur of the resize.

batch(indices, generator) then cuts one random crop x crop window out of each image (crop = 0: the whole image).
"""
from pathlib import Path

import torch
from PIL import Image

from data import shapes
from data.dataset import DataConfig, _read_metadata, to_square_rgb


class CropSource:
    """Images made per batch: len(), captions (N,), batch(indices, generator) -> ((B, 3, c, c) in [-1, 1], captions)."""

    def __init__(self, cfg: DataConfig, crop: int = 0, progress=False):
        R = cfg.resolution
        if crop < 0 or crop > R:
            raise ValueError(f"train.crop={crop} is larger than the images (data.resolution={R}); set train.crop to at "
                             f"most {R} (0 = whole images)")
        self.cfg, self.crop = cfg, crop or R
        if cfg.dataset == "shapes":
            shapes.check_resolution(R)
            scenes = [shapes.sample_scene(cfg.seed, i, cfg.split, cfg.max_objects) for i in range(cfg.num_images)]
            self.captions = [caption for caption, _ in scenes]
            self.attributes = [attributes for _, attributes in scenes]
            self.paths = None
        elif cfg.dataset.startswith("folder:"):
            folder = Path(cfg.dataset.partition(":")[2])
            if not folder.is_dir():
                raise FileNotFoundError(f"image folder {folder} does not exist; check data.dataset=folder:<path>")
            captions = _read_metadata(folder)  # {file_name: text}
            names = sorted(captions)[: cfg.num_images or None]
            self.paths = [folder / name for name in names]
            for path in self.paths:  # PIL reads the header only: sizes without decoding
                if not path.is_file():
                    raise FileNotFoundError(f"metadata of {folder} lists {path.name}, which is not there; fix it")
                with Image.open(path) as image:
                    if min(image.size) < R:
                        raise ValueError(f"{path} is {image.size[0]}x{image.size[1]}, smaller than this stage's "
                                         f"resolution {R}; remove such images or lower data.resolution")
            self.captions = [captions[name] for name in names]
            self.attributes = None
        else:
            raise ValueError(f"a super-resolution stage reads data.dataset=shapes or folder:<path> on the fly, not "
                             f"{cfg.dataset!r}; save a hub dataset as an image folder first")
        if not self.captions:
            raise ValueError("the dataset is empty; set data.num_images > 0")

    def __len__(self):
        return len(self.captions)

    def image(self, i):
        """Item i at data.resolution: (3, R, R) uint8."""
        if self.paths is None:
            array = shapes.render(self.attributes[i], self.cfg.resolution)
        else:
            with Image.open(self.paths[i]) as image:
                array = to_square_rgb(image, self.cfg.resolution)
        return torch.tensor(array).permute(2, 0, 1)  # (3, R, R); a copy: an image file gives a read-only array

    def whole(self, indices):
        """(B, 3, R, R) floats in [-1, 1], the whole images."""
        return torch.stack([self.image(int(i)) for i in indices]).float() / 127.5 - 1

    def batch(self, indices, generator=None):
        """Random crops (B, 3, crop, crop) in [-1, 1] (offsets from `generator`, a CPU generator) and the captions."""
        R, c = self.cfg.resolution, self.crop
        indices = [int(i) for i in indices]
        offsets = torch.randint(0, R - c + 1, (len(indices), 2), generator=generator)  # (B, 2): top, left
        crops = [self.image(i)[:, top: top + c, left: left + c] for i, (top, left) in zip(indices, offsets.tolist())]
        return torch.stack(crops).float() / 127.5 - 1, [self.captions[i] for i in indices]  # (B, 3, c, c)
