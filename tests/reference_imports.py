"""Make torchvision importable next to our CPU-only torch (tests/conftest.py calls this once per process;
tests/bench_*.py scripts call it themselves).

The test-only reference packages (diffusers, open_clip, pytorch-fid, torch-fidelity, torchmetrics) import
torchvision when it is installed. PyPI's only torchvision for torch 2.13.0 is 0.28.0, whose compiled ops
(`_C.so`) need the CUDA libtorch, which the CPU build lacks. torchvision then skips its ops, except that
`import torchvision` still registers fake kernels for `torchvision::nms` and `qnms` and fails with "operator
torchvision::nms does not exist" -- and so does every package importing it, diffusers included. Declaring the two
operator schemas (no kernels) first lets the pure-Python parts import; no test calls a torchvision op. Where the
ops load (a CUDA torch, or a matching CPU torchvision) nothing is declared.
"""
import importlib.util

import torch

_declared = []  # keeps the torch.library.Library alive: dropping it would remove the schemas


def make_torchvision_importable():
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _declared or hasattr(torch.ops.torchvision, "nms"):
        return
    try:
        torch.ops.load_library(f"{spec.submodule_search_locations[0]}/_C.so")
    except (OSError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _declared.append(lib)


def import_open_clip():
    make_torchvision_importable()
    import open_clip
    return open_clip
