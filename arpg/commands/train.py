"""`arpg train --model NAME`: train one study model, a decoder of arpg/decoders.py (or import its
released weights, `train.<name>_pretrained`).

Everything else comes from the `train:` section of the params file. With
`train.nproc > 1` the command re-launches itself under torchrun (DDP; gloo on CPU,
nccl on CUDA); launched by torchrun directly, it joins the existing group.
"""

from __future__ import annotations

import os
import subprocess
import sys

from arpg.decoders import DECODERS


def configure(parser) -> None:
    parser.add_argument("--model", required=True, choices=tuple(DECODERS),
                        help="which study model: " + ", ".join(f"{d.name} ({d.label})" for d in DECODERS.values()))
    parser.epilog = ("Model size, optimiser, budgets and checkpointing come from the `train:` section of the "
                     "params file. A killed run resumes from its last checkpoint when started again.")


def run(args, params) -> int:
    nproc = params["train"]["nproc"]
    if nproc > 1 and "WORLD_SIZE" not in os.environ and not params["train"][DECODERS[args.model].pretrained_key]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "arpg", "train", "--params", str(params.path), "--model", args.model]
        print(f"launching {nproc} processes: {' '.join(cmd[1:])}", flush=True)
        return subprocess.run(cmd, check=False).returncode

    from arpg.engine.train_stage import run_train

    run_train(params, args.model)
    return 0

