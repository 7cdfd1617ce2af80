"""Shared test set-up, run once in every pytest process before any test module is imported: make torchvision
importable next to our CPU-only torch (tests/reference_imports.py says why), so that the reference packages that
import it (diffusers, open_clip, pytorch-fid, torch-fidelity, torchmetrics) import whatever the order in which
pytest-xdist hands tests to a worker."""
from tests.reference_imports import make_torchvision_importable

make_torchvision_importable()
