"""data/dataset.py: shapes in memory, local image folders (imagefolder layout), hub datasets (offline error, a
local parquet dataset standing in for the hub), image preprocessing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import DataConfig, ImageTextDataset, load_data, to_square_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Keep the Arrow files that `datasets` writes out of the user's cache."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_shapes_in_memory_deterministic_and_in_range():
    cfg = DataConfig(num_images=40, resolution=24, max_objects=2, seed=5)
    data = load_data(cfg, progress=False)
    assert data.images.shape == (40, 3, 24, 24) and data.images.dtype == torch.uint8 and len(data) == 40
    assert len(data.attributes) == 40 and data.attributes[0]["count"] in (1, 2)
    again = load_data(cfg, progress=False)
    assert torch.equal(data.images, again.images) and data.captions == again.captions
    other = load_data(DataConfig(num_images=40, resolution=24, max_objects=2, seed=6), progress=False)
    assert not torch.equal(data.images, other.images)
    image, caption = data[3]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and caption == data.captions[3]
    assert -1 <= image.min() and image.max() <= 1
    assert torch.equal(image, data.images[3].float() / 127.5 - 1)
    for indices in ([3, 0, 3], np.array([3, 0, 3]), torch.tensor([3, 0, 3])):
        images, captions = data.batch(indices)
        assert images.shape == (3, 3, 24, 24) and torch.equal(images[0], image) and torch.equal(images[2], image)
        assert captions == [data.captions[3], data.captions[0], data.captions[3]]


def test_shapes_heldout_split_and_bad_config():
    from data.shapes import HELDOUT_PAIRS
    data = load_data(DataConfig(num_images=30, split="heldout", max_objects=3), progress=False)
    assert all((o["colour"], o["shape"]) in HELDOUT_PAIRS for a in data.attributes for o in a["objects"])
    for bad, match in ((DataConfig(dataset="imagenet"), "unknown data.dataset"),
                       (DataConfig(split="val"), "split"),
                       (DataConfig(max_objects=4), "max_objects"),
                       (DataConfig(resolution=2000), "resolution")):
        with pytest.raises(ValueError, match=match):
            load_data(bad, progress=False)


def test_to_square_rgb_resizes_the_shorter_side_and_centre_crops():
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :15] = (255, 0, 0)
    wide[:, 15:45] = (0, 255, 0)
    wide[:, 45:] = (0, 0, 255)
    out = to_square_rgb(Image.fromarray(wide), 16)  # 20x60 -> 16x48 -> middle 16 columns: inside the green band
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (0, 255, 0)).max() <= 2
    grey = to_square_rgb(Image.new("L", (30, 30), 77), 16)
    assert grey.shape == (16, 16, 3) and (grey == 77).all()
    clear = to_square_rgb(Image.new("RGBA", (30, 30), (0, 0, 0, 0)), 16)  # transparent -> white, not black
    assert (clear == 255).all()
    half = to_square_rgb(Image.new("RGBA", (30, 30), (0, 0, 0, 128)), 16)
    assert np.abs(half.astype(int) - 127).max() <= 1


def make_folder(root, metadata="jsonl", extra=True):
    root.mkdir()
    colours = {"red.png": (255, 0, 0), "sub/blue.png": (0, 0, 255), "grey.jpg": None, "clear.png": "rgba"}
    captions = {"red.png": "a red square", "sub/blue.png": "a blue square", "grey.jpg": "a grey square",
                "clear.png": "nothing"}
    (root / "sub").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "red.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(root / "sub" / "blue.png")
    Image.new("L", (25, 25), 128).save(root / "grey.jpg")
    Image.new("RGBA", (20, 20), (10, 200, 10, 0)).save(root / "clear.png")
    if extra:
        (root / "notes.txt").write_text("not an image")
    if metadata == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": k, "text": v}) + "\n"
                                                      for k, v in captions.items()))
    elif metadata == "csv":
        (root / "metadata.csv").write_text("file_name,text\n" + "".join(f"{k},{v}\n" for k, v in captions.items()))
    return colours, captions


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_folder_dataset(tmp_path, capsys, metadata):
    make_folder(tmp_path / "imgs", metadata)
    data = load_data(DataConfig(dataset=f"folder:{tmp_path / 'imgs'}", resolution=16), progress=False)
    assert isinstance(data, ImageTextDataset) and data.attributes is None
    assert data.images.shape == (4, 3, 16, 16) and data.images.dtype == torch.uint8
    assert "skipped 1 non-image file(s)" in capsys.readouterr().out
    expect = {"a red square": (255, 0, 0), "a blue square": (0, 0, 255), "a grey square": (128, 128, 128),
              "nothing": (255, 255, 255)}
    assert sorted(data.captions) == sorted(expect)
    for image, caption in zip(data.images, data.captions):  # each image kept its own caption
        mean = image.float().mean(dim=(1, 2))
        assert (mean - torch.tensor(expect[caption], dtype=torch.float)).abs().max() < 3, caption
    few = load_data(DataConfig(dataset=f"folder:{tmp_path / 'imgs'}", resolution=16, num_images=2), progress=False)
    assert len(few) == 2


def test_folder_errors(tmp_path):
    def load(path):
        return load_data(DataConfig(dataset=f"folder:{path}", resolution=16), progress=False)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load(tmp_path / "empty")
    make_folder(tmp_path / "nometa", metadata=None)
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl or metadata.csv"):
        load(tmp_path / "nometa")

    make_folder(tmp_path / "unlisted")
    Image.new("RGB", (8, 8)).save(tmp_path / "unlisted" / "stray.png")
    with pytest.raises(ValueError, match="no caption in its metadata.*stray.png"):
        load(tmp_path / "unlisted")

    make_folder(tmp_path / "absent")
    os.remove(tmp_path / "absent" / "red.png")
    with pytest.raises(FileNotFoundError, match="red.png"):
        load(tmp_path / "absent")

    make_folder(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "sub" / "blue.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    with pytest.raises(ValueError, match=r"cannot read image .*sub/blue.png"):
        load(tmp_path / "corrupt")

    make_folder(tmp_path / "badrow")
    with open(tmp_path / "badrow" / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "red.png"}) + "\n")
    with pytest.raises(ValueError, match="lacks 'file_name' or 'text'"):
        load(tmp_path / "badrow")


def test_hub_without_internet_points_to_folder(tmp_path):
    """Offline (as in CI), loading a hub dataset fails fast with a message that names the way out."""
    code = ("from data.dataset import DataConfig, load_data\n"
            "load_data(DataConfig(dataset='hub:someone/some-captioned-images'))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError") and "someone/some-captioned-images" in last, last
    assert "data.dataset=folder:<path>" in last


def test_hub_label_column_becomes_captions(tmp_path):
    """A local parquet dataset stands in for the hub (load_dataset reads both the same way): class ids are
    turned into class names through the ClassLabel feature, then into captions by the template."""
    import datasets
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["zero", "one"])})
    images = [Image.new("L", (28, 28), v) for v in (0, 255, 0)]
    ds = datasets.Dataset.from_dict({"img": images, "label": [0, 1, 0]}, features=features)
    (tmp_path / "digits" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "digits" / "data" / "train-00000-of-00001.parquet"))
    cfg = DataConfig(dataset=f"hub:{tmp_path / 'digits'}", resolution=16, image_column="img", text_column="",
                     caption_template="a handwritten digit {label}")
    data = load_data(cfg, progress=False)
    assert data.captions == ["a handwritten digit zero", "a handwritten digit one", "a handwritten digit zero"]
    assert data.images.shape == (3, 3, 16, 16) and (data.images[1] == 255).all() and (data.images[0] == 0).all()
    with pytest.raises(ValueError, match="no text column 'text'"):
        load_data(DataConfig(dataset=cfg.dataset, image_column="img"), progress=False)
    with pytest.raises(ValueError, match="no image column 'image'"):
        load_data(DataConfig(dataset=cfg.dataset), progress=False)
