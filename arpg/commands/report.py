"""`arpg report`: render report.dir (markdown, CSV, PNG, grids, galleries) from the stage outputs."""

from __future__ import annotations

from arpg.stages import Ctx, Job, Rule, key_list, log_path
from arpg.sweeps import sweep_keys


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    from arpg.pipeline import report_inputs

    inputs = report_inputs(ctx.params, ctx.layout, ctx.log_dir)
    # what the text and tables show besides the stage outputs: titles, sweep defaults, the grid
    keys = key_list("threads", "report", "name", "data.source", "data.num_classes", "data.resolution",
                    "tokenizer.channel_mult", "evaluate.extractors", "gallery.tasks", "zeroshot.tasks", sweep_keys(),
                    "train.seeds",  # which points are combined over seeds, and the seeds named in the text
                    "sample.precision")  # sample.precision: the profile rows the quality-vs-speed pairs use
    return Job("report", {}, ("report",), tuple(inputs), (str(ctx.layout.report_index),), keys,
               output_dir=str(ctx.params["report"]["dir"]), local=True, log=log_path(ctx, "report", w, ()))


RULE = Rule("report", (), _job, lambda p: [{}],
            desc="Write the study report (markdown, CSV tables, figures, plot series) from every stage output.")


def configure(parser) -> None:
    parser.epilog = ("Reads the outputs of every other stage (a missing one is an error naming it) and "
                     "writes into `report.dir` of the params file.")


def run(args, params) -> None:
    from arpg.config import unrecorded
    from arpg.engine.report import build
    from arpg.tracking import stage_run
    from arpg.utils import write_json

    with stage_run(params, "report", run_params={"report.dir": params["report"]["dir"],
                                                 "seed": unrecorded(params)["seed"]},
                   closes_study=True) as run:  # the last job: the study's outcome is known when it ends
        result = build(params)
        run.log_metrics(result["metrics"])
        run.log_artifact(result["dir"], "report")  # pareto.csv: quality against speed, joined from the files
        write_json(params.layout.report_index, {"dir": str(result["dir"]),
                                                "files": sorted(str(p) for p in result["paths"])})
        print(f"wrote {len(result['paths'])} files in {result['dir']} (open {result['dir']}/README.md)")
