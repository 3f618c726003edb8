"""Render the study report (markdown, CSV tables, PNG plots, copied grids and galleries).

Every number comes from a stage output listed by `arpg.pipeline.report_inputs`;
a missing output is an error naming the file and the stage that writes it. The
report says which feature extractor each metric used and on what hardware the
timings were taken. Quality figures carry the bootstrap intervals `arpg evaluate`
stored beside them, and "Which differences exceed the noise" tests the sweeps'
differences against them.

`sections.build` writes it, one function per section (prose and tables), into a `document.Report`
(the folder, the study's jobs planned once, every file written); the sweep points are read in
`points`, the noise test is `noise`, the speed tables `speed`, the zero-shot section `zero_shot`, the
stage-time table `stage_times`, DVC's plot series `plots`, the markdown helpers `text`, the figures
`arpg.figures`.
"""

from arpg.engine.report.points import Point, extractor_of, numeric_leaves, point_of, read_points
from arpg.report_catalog import METRICS_JSON, PARETO_CSV
from arpg.engine.report.plots import plot_specs
from arpg.engine.report.sections import EXTRACTOR_TEXT, build
from arpg.engine.report.speed import pareto_front, pareto_pairs

__all__ = ["EXTRACTOR_TEXT", "METRICS_JSON", "PARETO_CSV", "Point", "build", "extractor_of", "numeric_leaves",
           "pareto_front", "pareto_pairs",
           "plot_specs", "point_of", "read_points"]
