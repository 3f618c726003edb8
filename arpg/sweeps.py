"""The study's sweeps, each declared once: the points it adds per decoder, the point each is compared
against, and how the report names and shows it.

The job list (Snakemake), dvc.yaml's `matrix` stages, the report's tables and its noise comparisons
all iterate SWEEPS; a new sweep is one entry (tests/test_sweeps.py registers a toy one).

Imported by Snakemake on every invocation: no torch here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Mapping

from arpg.config import dotted, token_count
from arpg.decoders import DECODERS, Decoder, labels, native_orders, registered_in
from arpg.errors import ArpgError, ConfigError
from arpg.paths import SweepPoint, format_cfg, seed_run

WILDCARDS = ("steps", "cfg", "order")  # a point's fields besides its decoder and run, in SweepPoint's order


@dataclass(frozen=True)
class Param:
    key: str  # dotted params key of one value


@dataclass(frozen=True)
class Swept:
    key: str  # dotted params key of a list: one point per item


@dataclass(frozen=True)
class Derived:
    what: str  # a value of the decoder or the token grid: NATIVE, TOKENS


NATIVE, TOKENS = Derived("the decoder's native order"), Derived("the token count")


@dataclass(frozen=True)
class Sweep:
    """One sweep. `parallel` / `sequential`: the (steps, cfg, order) sources of its points for each
    kind of decoder (None: that kind does not run it); each source is a literal, a `Param`, a `Swept`
    list or a `Derived` value. A point is compared against its `baseline`: the same point with those
    wildcards replaced. The text fields are str.format templates over `names()`."""

    name: str                         # dvc.yaml stage `sample-<decoder>-<name>`, the report's group
    parallel: tuple | None
    sequential: tuple | None
    baseline: Mapping[str, Any] = field(default_factory=dict)
    versus_sequential: bool = False   # each parallel point also against every sequential point of the sweep
    adjacent: bool = False            # each point also against the next one
    sort_by: tuple[str, ...] = ()     # the table's order within a decoder
    over_seeds: bool = False          # its points sampled from the model of every training seed (train.seeds),
                                      # not only the first's: the headline's between-training noise
    selection: bool = False           # its table's points also draw a selection set (another sampling seed), on
                                      # which each decoder's guidance is chosen; the reported figure never sees it
    csv: str = ""                     # the report's table of the sweep
    heading: str = ""                 # its markdown heading
    intro: str = ""                   # the paragraph under the heading ('' for none)
    caption: str = ""                 # the table's caption (Snakemake's report page)
    compared: str = ""                # what is compared, one clause of the noise section
    label: str = ""                   # how a comparison names a point
    label_sequential: str = ""        # the same for a sequential decoder ('' : `label`)

    def __post_init__(self) -> None:
        missing = [k for k in ("csv", "heading", "caption", "compared", "label") if not getattr(self, k)]
        if missing or not self.sort_by:
            raise ArpgError(f"sweep {self.name!r}: give it {', '.join(missing or ['sort_by'])}")

    @property
    def title(self) -> str:
        return self.name.capitalize()

    def sources(self, d: Decoder) -> tuple | None:
        return self.parallel if d.parallel else self.sequential

    def family(self, d: Decoder, values: Mapping, *, baseline: bool = False, run: str = "") -> SweepFamily | None:
        """The sweep's points for decoder `d` from the model of training seed `run` (None: it does not
        run it); with `baseline`, the points they are compared against (which exist even where a swept
        list is empty)."""
        sources = self.sources(d)
        if sources is None:
            return None
        if baseline:
            sources = tuple(self.baseline.get(w, s) for w, s in zip(WILDCARDS, sources))
        fields = (("model", d.name),) + tuple((w, _resolve(s, d, values)) for w, s in zip(WILDCARDS, sources))
        return SweepFamily(self.name + run, fields + (("run", run),))

    def runs(self, values: Mapping) -> list[str]:
        """The training seeds (as paths.seed_run) whose models the sweep samples: the first, or every one."""
        seeds = values["train"]["seeds"]
        return [seed_run(s) for s in (seeds if self.over_seeds else seeds[:1])]

    def baseline_of(self, p: SweepPoint, values: Mapping) -> SweepPoint:
        d = DECODERS[p.model]
        changed = {w: _value(_resolve(s, d, values), values) for w, s in self.baseline.items()}
        return SweepPoint(p.model, **{w: changed.get(w, getattr(p, w)) for w in WILDCARDS}, run=p.run)

    def table(self, values: Mapping, run: str | None = None) -> list[SweepPoint]:
        """The points the report shows for the sweep: its own and their baselines, per decoder, from the
        model of training seed `run` (None: the first of train.seeds)."""
        run = first_run(values) if run is None else run
        rows = []
        for d in DECODERS.values():
            family = self.family(d, values, run=run)
            if family is None:
                continue
            bases = self.family(d, values, baseline=True, run=run).points(values) if self.baseline else []
            rows += sorted({*family.points(values), *bases}, key=lambda p: tuple(getattr(p, w) for w in self.sort_by))
        return rows

    def pairs(self, values: Mapping) -> list[tuple[SweepPoint, SweepPoint]]:
        """(a, b) pairs whose difference b - a the report tests, in the order it lists them."""
        table = self.table(values)
        sequential = [p for p in table if not DECODERS[p.model].parallel]
        out = []
        for d in DECODERS.values():
            rows = [p for p in table if p.model == d.name]
            if self.versus_sequential and d.parallel:
                out += [(base, p) for base in sequential for p in rows]
            if self.adjacent:
                out += list(zip(rows, rows[1:]))
            if self.baseline:
                base_of = {p: self.baseline_of(p, values) for p in rows}
                out += [(base, p) for base in rows if base_of[base] == base for p in rows
                        if p != base and base_of[p] == base]
        return out

    def point_label(self, p: SweepPoint) -> str:
        d = DECODERS[p.model]
        template = self.label if d.parallel or not self.label_sequential else self.label_sequential
        return template.format(decoder=d.short_label, steps=p.steps, cfg=format_cfg(p.cfg), order=p.order)

    def text(self, template: str, values: Mapping) -> str:
        return template.format(**names(values), csv=self.csv)


def names(values: Mapping) -> dict[str, Any]:
    """What the sweeps' text templates may say: the decoders' labels and the sweep defaults."""
    s = values["sample"]
    return {"par": labels(parallel=True), "seq": labels(parallel=False),
            "seq_short": labels(parallel=False, short=True), "native": native_orders(parallel=True),
            "cfg": format_cfg(s["cfg_default"]), "steps": s["steps_default"], "tokens": token_count(values)}


def _resolve(source: Any, d: Decoder, values: Mapping) -> Any:
    if source is NATIVE:
        return d.native_order
    if source is TOKENS:
        return token_count(values)
    return source


def _value(source: Any, values: Mapping) -> Any:
    return dotted(values, source.key) if isinstance(source, Param) else source


@dataclass(frozen=True)
class SweepFamily:
    """One sweep of one decoder: each wildcard of its points is a literal, one params value (`Param`)
    or every item of a params list (`Swept`). The families of a study are disjoint (checked by
    `sweep_points`), so each point belongs to exactly one, and dvc.yaml runs each as one `matrix`
    stage over the very params lists: `dvc exp run -S sample.steps=[...]` then adds exactly the new
    points."""

    name: str
    fields: tuple[tuple[str, Any], ...]  # (wildcard, literal | Param | Swept) in SweepPoint's field order

    def points(self, values: Mapping) -> list[SweepPoint]:
        choices = [list(dotted(values, v.key)) if isinstance(v, Swept) else [_value(v, values)]
                   for _, v in self.fields]
        return [SweepPoint(*combo) for combo in itertools.product(*choices)]

    @property
    def model(self) -> str:
        return dict(self.fields)["model"]

    @property
    def swept(self) -> dict[str, str]:
        """wildcard -> params key of the lists it runs over (DVC's `matrix`)."""
        return {w: v.key for w, v in self.fields if isinstance(v, Swept)}


_STEPS, _CFG = Param("sample.steps_default"), Param("sample.cfg_default")

SWEEPS: dict[str, Sweep] = {s.name: s for s in (
    Sweep("steps", (Swept("sample.steps"), _CFG, NATIVE), (TOKENS, _CFG, NATIVE),
          versus_sequential=True, adjacent=True, over_seeds=True, sort_by=("steps",), csv="fid_vs_steps.csv",
          heading="Quality vs decoding steps: {par} and the {seq}",
          intro="{par} decodes in the given number of steps ({native} order, cfg {cfg}); the {seq} predicts "
                "one token per step ({tokens} steps). Table: `{csv}`; all points: `quality.csv`.",
          caption="The step sweep: quality against decoding steps per model, with intervals.",
          compared="each {par} step count against the {seq} and against the next step count ({native} "
                   "order, cfg {cfg})",
          label="{decoder} {steps} steps", label_sequential="{decoder}"),
    Sweep("guidance", (_STEPS, Swept("sample.cfg"), NATIVE), (TOKENS, Swept("sample.cfg"), NATIVE),
          baseline={"cfg": _CFG}, over_seeds=True, selection=True, sort_by=("cfg",), csv="guidance.csv",
          heading="Guidance scale ({par} at {steps} steps, {seq_short})",
          caption="The guidance sweep at the default step count, with intervals.",
          compared="each guidance value against cfg {cfg} ({par} at {steps} steps, and the {seq})",
          label="{decoder} cfg {cfg}"),
    Sweep("orders", (_STEPS, _CFG, Swept("sample.orders")), None,
          baseline={"order": NATIVE}, sort_by=("order",), csv="orders.csv",
          heading="Generation orders ({par}, {steps} steps, cfg {cfg})",
          caption="The generation-order sweep at the default steps and guidance, with intervals.",
          compared="each order against {native} ({par}, {steps} steps, cfg {cfg})",
          label="{order} order"),
    Sweep("strategies", (Swept("sample.strategy_steps"), _CFG, Swept("sample.strategies")), None,
          baseline={"order": NATIVE}, sort_by=("order", "steps"), csv="strategies.csv",
          heading="Decoding strategies ({par}, cfg {cfg})",
          intro="Which positions each step decodes, at the same step counts: the random order of the step "
                "sweep, locality-aware groups (LPD: far from each other, near the decoded tokens), "
                "confidence-ordered commits (every remaining position queried each step, the most confident "
                "kept; MaskGIT noise) and region-parallel orders (PAR). Table: `{csv}`; which differences "
                "exceed the noise: below.",
          caption="Each decoding strategy at each strategy step count, beside the random order, with intervals.",
          compared="each decoding strategy against {native} at the same step count",
          label="{order} {steps} steps"),
)}


def sweep_keys() -> tuple[str, ...]:
    """The params keys that choose which points exist (not what one point does)."""
    keys: dict[str, None] = {}
    for s in SWEEPS.values():
        for source in (*(s.parallel or ()), *(s.sequential or ()), *s.baseline.values()):
            if isinstance(source, (Param, Swept)):
                keys[source.key] = None
    return tuple(keys)


def first_run(values: Mapping) -> str:
    """The training seed every sweep samples (paths.seed_run of train.seeds[0])."""
    return seed_run(values["train"]["seeds"][0])


def sweep_families(values: Mapping) -> list[SweepFamily]:
    """Each sweep of each registered decoder that runs it, per training seed it samples."""
    return [f for d in DECODERS.values() for s in SWEEPS.values() for run in s.runs(values)
            if (f := s.family(d, values, run=run)) is not None]


def selection_points(values: Mapping) -> set[SweepPoint]:
    """The points that also draw a selection set: every point of a `selection` sweep's table, of every
    training seed that sweep samples."""
    return {p for s in SWEEPS.values() if s.selection for run in s.runs(values) for p in s.table(values, run)}


def sweep_points(values: Mapping) -> list[SweepPoint]:
    """Every (model, steps, cfg, order) the study samples and evaluates: the points of its
    `sweep_families`, each in exactly one family."""
    owner: dict[SweepPoint, str] = {}
    for family in sweep_families(values):
        for p in family.points(values):
            where = f"the {family.model} {family.name} sweep"
            if p in owner:
                raise ConfigError(f"{p.model} {p.tag} is in {owner[p]} and in {where}: two stages may not "
                                  "write one point; change one sweep's params lists")
            owner[p] = where
    return sorted(owner, key=lambda p: (p.model, p.run, p.order, p.steps, p.cfg))


def registered(extra: Sweep):
    """Register the sweep `extra` for the duration of a `with` block (tests)."""
    return registered_in(SWEEPS, extra, "sweep")
