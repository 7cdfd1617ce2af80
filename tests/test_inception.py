"""Tests for metrics/inception.py: the hand-written FID Inception gives the same pool3 features (and IS logits)
as pytorch-fid's InceptionV3 and torch-fidelity's FeatureExtractorInceptionV3 carrying the same weights, in the
matching preprocessing mode; our TF1 resize is torch-fidelity's to the bit; the published file's names load.

No download: the reference networks are built from their own classes and given our random weights. Default
random initialisation makes Inception's features almost the same for every image, and then equal outputs
would prove little, so the weights are Kaiming-initialised and the batch-norm statistics are calibrated on
random batches (`random_inception`); `test_random_weights_separate_images` checks that this worked.
"""
import importlib.util
import math

import pytest
import torch
import torch.nn as nn

from data.shapes import render_dataset
from metrics.inception import InceptionConfig, InceptionV3, load_inception, load_state_dict_file, preprocess, resize_tf1
from tests.reference_imports import make_torchvision_importable


def import_references():
    """Import pytorch-fid's and torch-fidelity's modules (both import torchvision: tests/reference_imports.py)."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision (a test-only dependency of pytorch-fid) is not installed")
    make_torchvision_importable()
    import pytorch_fid.fid_score
    import pytorch_fid.inception
    import torch_fidelity.feature_extractor_inceptionv3
    import torch_fidelity.interpolate_compat_tensorflow
    import torch_fidelity.utils
    return pytorch_fid.inception, torch_fidelity


def random_inception(cfg=None, seed=0, calibration_batches=3):
    """Our network with weights under which features differ between images: Kaiming-normal convolutions,
    batch-norm affine parameters near (1, 0), and running statistics measured on random inputs (train-mode
    passes with momentum=None, i.e. a plain average), so every layer sees roughly standardised inputs."""
    torch.manual_seed(seed)
    model = InceptionV3(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0.0, 0.1)
                m.momentum = None
        model.fc.weight.normal_(0.0, 1 / math.sqrt(2048))
        model.fc.bias.normal_(0.0, 1.0)
        model.train()
        g = torch.Generator().manual_seed(seed)
        for _ in range(calibration_batches):  # smaller than 299 to save time; only the statistics' scale matters
            model.pool3(torch.rand(4, 3, 120, 120, generator=g) * 2 - 1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    return model.eval()


def sample_images(n=3, size=48):
    """Shapes renders (structure) and one noise image (texture) as uint8 (n, 3, size, size)."""
    images = torch.from_numpy(render_dataset(n - 1, size, seed=5, progress=False)[0]).permute(0, 3, 1, 2)
    noise = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.cat([images, noise]).contiguous()


@pytest.fixture(scope="module")
def ours():
    return random_inception()


@pytest.fixture(scope="module")
def images():
    return sample_images()


@pytest.fixture(scope="module")
def our_features(ours, images):
    with torch.no_grad():
        return ours(images)                                                       # (3, 2048)


def pytorch_fid_twin(model):
    """pytorch-fid's InceptionV3 (the wrapper with its resize and 2x-1) around its own FID-patched torchvision
    Inception3, carrying `model`'s weights. fid_inception_v3() would download the published file; we build
    the same network from pytorch-fid's classes the way it does and load our state_dict (strictly)."""
    pfi, _ = import_references()
    inception = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inception.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inception.Mixed_7c = pfi.FIDInceptionE_2(2048)
    inception.load_state_dict(model.state_dict())
    download = pfi.fid_inception_v3
    pfi.fid_inception_v3 = lambda: inception  # what InceptionV3.__init__ calls for its network
    try:
        return pfi.InceptionV3([3]).eval()
    finally:
        pfi.fid_inception_v3 = download


def torch_fidelity_twin(model, tmp_path):
    """torch-fidelity's extractor reading `model`'s weights from a file, as it reads the published one, made
    the way its metrics make it: utils.create_feature_extractor, which also puts it in eval mode (in 0.3.0 the
    FeatureExtractorInceptionV3 constructor does not, and in train mode its batch norms would normalise with
    the statistics of the batch)."""
    _, tf = import_references()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    twin = tf.utils.create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                             cuda=False, verbose=False,
                                             feature_extractor_weights_path=str(path))
    assert not twin.training
    return twin


def assert_features_close(a, b, tol=1e-5):
    """Equal to `tol` relative to the largest feature (float32 through ~100 layers)."""
    scale = b.abs().max()
    err = (a - b).abs().max() / scale
    assert err < tol, f"largest difference {err:.2e} of the largest feature"


def test_random_weights_separate_images(our_features):
    """The premise of the equality tests: under the test weights, features vary between images about as much
    as they vary between dimensions, so a wrong layer could not hide behind a constant output."""
    f = our_features
    assert f.shape == (3, 2048) and torch.isfinite(f).all()
    between_images = f.std(dim=0).mean() / f.abs().mean()
    assert between_images > 0.2, f"features nearly constant across images ({between_images:.3f})"


def test_state_dict_names_are_pytorch_fid_and_torch_fidelity(ours, tmp_path):
    """Key for key and shape for shape (loads are strict); so the published file fits too."""
    twin = pytorch_fid_twin(ours)
    inception = twin.blocks  # the wrapper keeps the modules of its Inception3 in blocks 0-3
    theirs = {k: v.shape for k, v in torch_fidelity_twin(ours, tmp_path).state_dict().items()}
    assert theirs == {k: v.shape for k, v in ours.state_dict().items()}
    assert len(list(inception.parameters())) == len(list(ours.parameters())) - 2  # all but fc.weight, fc.bias


def test_equals_pytorch_fid_features(ours, images, our_features):
    twin = pytorch_fid_twin(ours)
    assert ours.cfg.resize == "pytorch-fid"
    with torch.no_grad():
        theirs = twin(images.float() / 255)[0][:, :, 0, 0]                        # ToTensor, then the model
    assert_features_close(our_features, theirs)


def test_equals_torch_fidelity_in_tf1_mode(ours, images, our_features, tmp_path):
    twin = torch_fidelity_twin(ours, tmp_path)
    tf1 = InceptionV3(InceptionConfig(resize="tf1"))
    tf1.load_state_dict(ours.state_dict())
    tf1.eval()
    with torch.no_grad():
        pool3, logits_unbiased, logits = twin(images)
        mine = tf1(images)
        assert_features_close(mine, pool3)
        assert_features_close(tf1.logits(mine), logits_unbiased)
        assert_features_close(tf1.logits(mine) + tf1.fc.bias, logits)
        # the mode matters: the same weights with pytorch-fid's preprocessing give other features
        assert (our_features - pool3).abs().max() / pool3.abs().max() > 1e-3


@pytest.mark.parametrize("size", [(32, 32), (48, 80), (299, 299), (512, 400)])
def test_tf1_resize_is_bit_exact_with_torch_fidelity(size):
    _, tf = import_references()
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0)) * 255
    theirs = tf.interpolate_compat_tensorflow.interpolate_bilinear_2d_like_tensorflow1x(
        x, size=(299, 299), align_corners=False)
    assert torch.equal(resize_tf1(x, 299), theirs)


def test_tf1_resize_samples_at_dest_times_scale():
    """TF1's rule by hand: output pixel i reads source i * in / out (no half-pixel shift), lerped, last pixel
    repeated; doubling a ramp 0, 1, 2, 3 gives 0, .5, 1, 1.5, 2, 2.5, 3, 3."""
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = resize_tf1(ramp, 8)
    assert torch.equal(out[0, 0, 0], torch.tensor([0, .5, 1, 1.5, 2, 2.5, 3, 3]))


def test_pytorch_fid_preprocessing_keeps_299_images_and_maps_to_minus_one_one():
    x = torch.tensor([0, 255], dtype=torch.uint8).repeat(1, 3, 299 * 299 // 2 + 1)[:, :, :299 * 299]
    x = x.view(1, 3, 299, 299)
    out = preprocess(x, "pytorch-fid")
    assert torch.equal(out, x.float() / 255 * 2 - 1)  # resizing 299 -> 299 is the identity
    assert out.min() == -1 and out.max() == 1
    assert preprocess(x, "tf1").min() == -1 and preprocess(x, "tf1").max() == 127 / 128


def test_published_file_layout_loads(ours, tmp_path, monkeypatch):
    """The published file has no num_batches_tracked entries; it loads from --inception-weights or from the
    environment variable, and gives the same network."""
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(path))
    loaded = load_inception()
    for k, v in ours.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[k], v), k
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_weight_errors_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="FID_INCEPTION_WEIGHTS"):
        load_inception()
    with pytest.raises(FileNotFoundError, match="not found"):
        load_inception(InceptionConfig(weights=str(tmp_path / "missing.pth")))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not weights")
    with pytest.raises(ValueError, match="cannot read Inception weights"):
        load_state_dict_file(bad)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="do not fit"):
        load_inception(InceptionConfig(weights=str(other)))
    with pytest.raises(ValueError, match="unknown Inception resize"):
        InceptionV3(InceptionConfig(resize="bicubic"))
