"""`arpg report`: render report.dir (markdown, CSV, PNG, grids, galleries) from the stage outputs."""

from __future__ import annotations


def configure(parser) -> None:
    parser.epilog = ("Reads the outputs of every other stage (a missing one is an error naming it) and "
                     "writes into `report.dir` of the params file.")


def run(args, params) -> None:
    from arpg.engine.report import build
    from arpg.tracking import stage_run

    with stage_run(params, "report", run_params={"report.dir": params["report"]["dir"],
                                                 "seed": params["seed"]}) as run:
        result = build(params)
        run.log_metrics(result["metrics"])
        run.log_artifact(result["dir"], "report")
        print(f"wrote {len(result['paths'])} files in {result['dir']} (open {result['dir']}/README.md)")
