"""Make torchvision / torch-fidelity importable next to a CPU-only torch.

PyPI's torchvision wheels are built for CUDA; beside the local CPU build of
torch their C extension fails to load and `import torchvision` raises
"operator torchvision::nms does not exist" while registering fake kernels.
Defining the schemas of the two ops it registers that way lets the import
succeed. The guard acts only when the extension really cannot be loaded; we
never call torchvision's C ops.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SHIM = None
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _extension_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision: nothing to fix
    for lib in Path(spec.origin).parent.glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def ensure_torchvision_importable() -> None:
    """Call before importing torchvision or torch_fidelity."""
    global _SHIM
    if _SHIM is not None:
        return
    import torch

    if _extension_loads():
        _SHIM = False
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            lib.define(schema)
    _SHIM = lib  # keep the Library alive: dropping it unregisters the schemas
