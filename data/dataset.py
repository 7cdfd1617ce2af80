"""One entry point for every image-text dataset: the built-in shapes, a local image folder, a hub dataset.

    dataset=shapes          rendered into memory by data/shapes.py, deterministic from `seed`
    dataset=folder:<path>   Hugging Face `imagefolder` layout: images plus metadata.jsonl or metadata.csv with
                            columns `file_name` (relative to the folder) and `text` (the caption)
    dataset=hub:<name>      a Hugging Face dataset with an image column and either a text column or a label
                            column turned into captions by `caption_template` ("a handwritten digit {label}")

Every dataset ends up in memory as uint8 (N, 3, H, W), square at `resolution`: images are converted to RGB
(transparent pixels composited on white), resized so the shorter side is `resolution`, then centre-cropped.
Models see floats in [-1, 1].

A folder laid out like this

    my_images/
        metadata.jsonl      {"file_name": "cat.png", "text": "a photo of a cat"}  (one line per image)
        cat.png
        ...

loads with `dataset=folder:my_images`; other files are skipped and counted. Without internet, a hub
dataset can be saved once elsewhere as such a folder.
"""
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data import shapes


@dataclass
class DataConfig:
    dataset: str = "shapes"        # shapes | folder:<path> | hub:<name>
    resolution: int = 32           # images are square, resolution x resolution
    num_images: int = 20000        # shapes: how many to render; folder/hub: keep at most this many (0 = all)
    max_objects: int = 1           # shapes: objects per image, 1 to 3 (1 = single-object mode)
    seed: int = 0                  # shapes: rendering seed (item i is a function of (seed, i))
    split: str = "train"           # shapes: train | heldout | all ; hub: split name (e.g. train, test)
    image_column: str = "image"    # hub: column holding the images
    text_column: str = "text"      # hub: caption column; '' = build captions from label_column
    label_column: str = "label"    # hub: class column used when text_column is ''
    caption_template: str = "{label}"  # hub: caption from a label, e.g. "a handwritten digit {label}"


class ImageTextDataset:
    """Images (N, 3, H, W) uint8, their captions, and for shapes their attributes (else None)."""

    def __init__(self, images, captions, attributes=None):
        N, C, H, W = images.shape
        assert images.dtype == torch.uint8 and C == 3, f"expected uint8 (N, 3, H, W), got {images.dtype} {images.shape}"
        assert len(captions) == N, f"{N} images but {len(captions)} captions"
        assert attributes is None or len(attributes) == N
        self.images, self.captions, self.attributes = images, list(captions), attributes

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1, self.captions[i]  # (3, H, W) in [-1, 1]

    def batch(self, indices):
        """(B, 3, H, W) floats in [-1, 1] and the B captions; indices: list, numpy array or tensor."""
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        images = self.images[indices].float() / 127.5 - 1  # (B, 3, H, W)
        return images, [self.captions[i] for i in indices.tolist()]


def load_data(cfg: DataConfig, progress=True) -> ImageTextDataset:
    if not isinstance(cfg.resolution, int) or cfg.resolution < 8:
        raise ValueError(f"data.resolution must be an integer of at least 8, got {cfg.resolution!r}")
    if cfg.dataset == "shapes":
        images, captions, attributes = shapes.render_dataset(cfg.num_images, cfg.resolution, cfg.seed, cfg.split,
                                                             cfg.max_objects, progress=progress)
        images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        return ImageTextDataset(images, captions, attributes)
    if cfg.dataset.startswith("folder:"):
        return _load_folder(Path(cfg.dataset[len("folder:"):]).expanduser(), cfg, progress)
    if cfg.dataset.startswith("hub:"):
        return _load_hub(cfg.dataset[len("hub:"):], cfg, progress)
    raise ValueError(f"unknown data.dataset {cfg.dataset!r}; use shapes, folder:<path> or hub:<name>")


# ---------------------------------------------------------------- images

def to_square_rgb(image: Image.Image, resolution: int) -> np.ndarray:
    """Any PIL image -> (resolution, resolution, 3) uint8: RGB, shorter side resized, centre-cropped."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)  # transparent -> white, not the undefined colour under alpha = 0
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image)


def _stack(arrays, captions):
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return ImageTextDataset(images, captions)


# ---------------------------------------------------------------- folder:<path>

def _read_metadata(folder):
    """{file_name: text} from metadata.jsonl or metadata.csv at the top of the folder."""
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file() and csv_path.is_file():
        raise ValueError(f"{folder} has both metadata.jsonl and metadata.csv; keep one")
    rows = []
    if jsonl.is_file():
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{jsonl} line {n} is not valid JSON") from None
        meta_path = jsonl
    elif csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        meta_path = csv_path
    else:
        raise FileNotFoundError(f"{folder} has no metadata.jsonl or metadata.csv; add one with a line per image "
                                f'like {{"file_name": "img.png", "text": "a caption"}}')
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise ValueError(f"{meta_path} row {n} lacks 'file_name' or 'text'; every row needs both")
    return {str(row["file_name"]): str(row["text"]) for row in rows}


def _load_folder(folder, cfg, progress):
    import datasets
    from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist; check the path in data.dataset=folder:<path>")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    image_files = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not image_files:
        raise ValueError(f"image folder {folder} holds no images (.png, .jpg, ...); put images and a "
                         f"metadata.jsonl there")
    captions_by_name = _read_metadata(folder)
    relative = {p.relative_to(folder).as_posix() for p in image_files}
    unlisted = sorted(relative - set(captions_by_name))
    if unlisted:
        raise ValueError(f"{len(unlisted)} image(s) in {folder} have no caption in its metadata (e.g. "
                         f"{unlisted[0]}); add a row for each or move them out")
    absent = sorted(set(captions_by_name) - relative)
    if absent:
        raise FileNotFoundError(f"metadata of {folder} lists {len(absent)} file(s) that are not images there "
                                f"(e.g. {absent[0]}); fix the file_name or add the image")
    skipped = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS
               and p.name not in ("metadata.jsonl", "metadata.csv")]
    if skipped:
        print(f"{folder}: skipped {len(skipped)} non-image file(s), e.g. {skipped[0].name}", flush=True)

    # The `imagefolder` builder pairs images with metadata rows (offline, it reads local files only); we
    # decode the images ourselves so that an unreadable one is named.
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    if cfg.num_images and len(ds) > cfg.num_images:
        print(f"{folder}: using the first {cfg.num_images} of {len(ds)} images (data.num_images)", flush=True)
        ds = ds.select(range(cfg.num_images))
    arrays, captions = [], []
    for row in tqdm(ds, desc=f"loading {folder.name}", disable=not progress, dynamic_ncols=True):
        path = row["image"]["path"]
        try:
            with Image.open(path) as image:
                arrays.append(to_square_rgb(image, cfg.resolution))
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"cannot read image {path}: {type(e).__name__}; it is corrupt or not an image, "
                             f"replace or remove it") from None
        captions.append(str(row["text"]))
    return _stack(arrays, captions)


# ---------------------------------------------------------------- hub:<name>

def _load_hub(name, cfg, progress):
    import datasets

    try:
        ds = datasets.load_dataset(name, split=cfg.split)
    except (ConnectionError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"could not load hub dataset {name!r} split {cfg.split!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:100] if str(e) else ''}); without internet, save it as an image folder "
            f"(images + metadata.jsonl) on a connected machine and use data.dataset=folder:<path>") from None
    columns = ds.column_names
    if cfg.image_column not in columns:
        raise ValueError(f"hub dataset {name!r} has no image column {cfg.image_column!r}; columns are {columns}; "
                         f"set data.image_column")
    if cfg.text_column:
        if cfg.text_column not in columns:
            raise ValueError(f"hub dataset {name!r} has no text column {cfg.text_column!r}; columns are {columns}; "
                             f"set data.text_column, or data.text_column='' with data.label_column")
        captions = [str(t) for t in ds[cfg.text_column]]
    else:
        if cfg.label_column not in columns:
            raise ValueError(f"hub dataset {name!r} has no label column {cfg.label_column!r}; columns are "
                             f"{columns}; set data.label_column")
        feature = ds.features[cfg.label_column]
        labels = ds[cfg.label_column]
        if isinstance(feature, datasets.ClassLabel):  # ids -> class names
            labels = [feature.int2str(int(label)) for label in labels]
        captions = [cfg.caption_template.format(label=label) for label in labels]
    n = min(len(ds), cfg.num_images) if cfg.num_images else len(ds)
    if n < len(ds):
        print(f"hub:{name}: using the first {n} of {len(ds)} images (data.num_images)", flush=True)
    arrays = []
    for i in tqdm(range(n), desc=f"loading {name}", disable=not progress, dynamic_ncols=True):
        arrays.append(to_square_rgb(ds[i][cfg.image_column], cfg.resolution))
    return _stack(arrays, captions[:n])
