"""`arpg train --model arpg|raster`: train one study model (or import released weights).

Everything else comes from the `train:` section of the params file. With
`train.nproc > 1` the command re-launches itself under torchrun (DDP; gloo on CPU,
nccl on CUDA); launched by torchrun directly, it joins the existing group.
"""

from __future__ import annotations

import os
import subprocess
import sys


def configure(parser) -> None:
    parser.add_argument("--model", required=True, choices=("arpg", "raster"),
                        help="which study model: the ARPG model or the raster-order baseline")
    parser.epilog = ("Model size, optimiser, budgets and checkpointing come from the `train:` section of the "
                     "params file. A killed run resumes from its last checkpoint when started again.")


def run(args, params) -> int:
    nproc = params["train"]["nproc"]
    if nproc > 1 and "WORLD_SIZE" not in os.environ and not params["train"][f"{args.model}_pretrained"]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "arpg", "train", "--params", str(params.path), "--model", args.model]
        print(f"launching {nproc} processes: {' '.join(cmd[1:])}", flush=True)
        return subprocess.run(cmd, check=False).returncode

    from arpg.engine.train_stage import run_train

    run_train(params, args.model)
    return 0

