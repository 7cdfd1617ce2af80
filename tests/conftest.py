"""Shared test set-up, run once in every pytest process before any test module is imported:

- make torchvision importable next to our CPU-only torch (tests/reference_imports.py says why), so that the reference
  packages that import it (diffusers, open_clip, pytorch-fid, torch-fidelity, torchmetrics) import whatever the order
  in which pytest-xdist hands tests to a worker;
- under pytest-xdist (`make test` runs two workers), one intra-op thread per worker, and for the processes a test
  starts: two workers of two threads each on two cores spin-wait for each other, and the tiny models of the tests
  (thousands of small ops) then run 10-30 times slower than on one thread.
"""
import os

import torch

from tests.reference_imports import make_torchvision_importable

make_torchvision_importable()
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
