"""Load and validate the study parameters (params.yaml and its siblings in configs/).

A wrong value fails here, before any work starts, with a message that names the
key, the bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from arpg.decoders import DECODERS
from arpg.errors import ConfigError
from arpg.paths import DEFAULT_PARAMS, SCHEMA_PATH, Layout, SweepPoint
from arpg.sizes import sizes_of

PARAMS_ENV = "ARPG_PARAMS"


def unrecorded(params: Mapping) -> Mapping:
    """The plain values behind `params` (for placing and labelling work, not computing it)."""
    return params.values if isinstance(params, Params) else params


def default_params_path() -> Path:
    return Path(os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS)


class ParamsView(Mapping[str, Any]):
    """A read-only section of the params that records the dotted key of every leaf it hands out
    (lists count as leaves): what a command reads is then known, not assumed (tests compare it with
    the keys arpg/pipeline.py declares for the command's job, which feed its fingerprint)."""

    def __init__(self, node: Mapping[str, Any], prefix: str, reads: set[str]):
        self._node, self._prefix, self._reads = node, prefix, reads

    def __getitem__(self, key: str) -> Any:
        value = self._node[key]
        dotted = f"{self._prefix}.{key}" if self._prefix else key
        if isinstance(value, Mapping):
            return ParamsView(value, dotted, self._reads)
        self._reads.add(dotted)
        return value

    def __contains__(self, key: object) -> bool:  # a membership test reads no value
        return key in self._node

    def __iter__(self) -> Iterator[str]:
        return iter(self._node)

    def __len__(self) -> int:
        return len(self._node)


@dataclass(frozen=True)
class Params(ParamsView):
    """Validated parameters: a read-only, read-recording mapping plus where they came from.

    `params["train"]["lr"]` records `train.lr` in `reads`. Code that only places or labels work
    (output paths, MLflow, the job list) reads `values`, the plain dict, and records nothing."""

    path: Path
    values: dict = field(repr=False)
    reads: set = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, value in (("_node", self.values), ("_prefix", ""), ("_reads", self.reads)):
            object.__setattr__(self, name, value)  # the view's state on a frozen dataclass

    @property
    def digest(self) -> str:
        """Short hash of the resolved values (tags MLflow runs)."""
        blob = json.dumps(self.values, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def layout(self) -> Layout:
        return Layout.from_params(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {'sample.steps': [2, 4, 8]} (for MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(f"{prefix}.{key}" if prefix else key, value)
            else:
                out[prefix] = node

        walk("", self.values)
        return out


def schema() -> dict:
    """The params schema with every registered decoder's keys spelled out. The file gives their
    types as patterns (`<name>_model`, `<name>_pretrained` under `train`) so it holds no decoder
    name; here each pattern becomes the keys of the decoders in arpg/decoders.py, all required, so
    a key of no registered decoder (a typo) is refused like any unknown key."""
    try:
        doc = json.loads(SCHEMA_PATH.read_text())
    except FileNotFoundError as exc:  # pragma: no cover - broken checkout
        raise ConfigError(f"schema {SCHEMA_PATH} is missing; restore it from git") from exc
    train = doc["properties"]["train"]
    patterns = train.pop("patternProperties")
    for d in DECODERS.values():
        for key in (d.model_key, d.pretrained_key):
            train["properties"][key] = dict(next(node for pattern, node in patterns.items() if re.search(pattern, key)))
            train["required"].append(key)
        train["properties"][d.model_key]["enum"] = sizes_of(d.size_kind)  # the sizes that build its network
    return doc


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _allowed(error) -> str:
    schema = error.schema
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if error.validator == "additionalProperties":
        return "only the keys " + ", ".join(sorted(schema.get("properties", {})))
    if error.validator == "required":
        return "the key to be present"
    parts = []
    if "type" in schema:
        kind = schema["type"]
        parts.append(kind if isinstance(kind, str) else " or ".join(kind))
    for bound, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                        ("exclusiveMaximum", "<"), ("minItems", "at least N items:"),
                        ("minLength", "at least N characters:")):
        if bound in schema:
            parts.append(f"{word} {schema[bound]}".replace("N items: ", "").replace("N characters: ", ""))
    if "items" in schema and isinstance(schema["items"], dict) and error.validator in ("type", "minItems"):
        parts.append("items: " + _allowed_items(schema["items"]))
    return " ".join(parts) or json.dumps(schema, sort_keys=True)


def _allowed_items(items: dict) -> str:
    if "enum" in items:
        return "one of " + ", ".join(json.dumps(v) for v in items["enum"])
    kind = items.get("type", "any")
    return kind if isinstance(kind, str) else " or ".join(kind)


def validate(values: Any, source: str) -> None:
    """Raise ConfigError listing every schema violation of `values`."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(values), key=lambda e: list(map(str, e.absolute_path)))
    if not errors:
        return
    lines = []
    for error in errors:
        key = _key_path(error.absolute_path)
        if error.validator == "additionalProperties":
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            lines.append(f"  {key}: unknown key(s) {', '.join(extra)}; allowed: {_allowed(error)}")
        elif error.validator == "required":
            lines.append(f"  {key}: {error.message}")
        else:
            lines.append(f"  {key}: got {json.dumps(error.instance, default=str)}, expected {_allowed(error)}")
    raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines)
                      + f"\n(schema: {SCHEMA_PATH.relative_to(SCHEMA_PATH.parents[2])})")


def load_params(path: str | os.PathLike | None = None) -> Params:
    """Read, validate and return the params file (default: $ARPG_PARAMS or ./params.yaml)."""
    path = Path(path) if path is not None else default_params_path()
    if not path.is_file():
        raise ConfigError(
            f"params file {path} not found; run from the repository root or pass "
            f"--params PATH (or set {PARAMS_ENV})")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    validate(values, str(path))
    _check_consistency(values, str(path))
    return Params(path=path.resolve(), values=values)


def _check_consistency(values: dict, source: str) -> None:
    """Cross-key rules a JSON schema cannot express."""
    tok = values["tokenizer"]
    res = values["data"]["resolution"]
    factor = 2 ** (len(tok["channel_mult"]) - 1)
    if res % factor:
        raise ConfigError(
            f"{source}: data.resolution {res} is not divisible by the tokenizer's downsampling "
            f"{factor} (2 ** (len(tokenizer.channel_mult) - 1)); change one of them")
    sample = values["sample"]
    if sample["steps_default"] > token_count(values):
        raise ConfigError(
            f"{source}: sample.steps_default {sample['steps_default']} exceeds the "
            f"{token_count(values)} tokens of the grid")
    for key in ("steps", "strategy_steps"):
        too_many = [s for s in sample[key] if s > token_count(values)]
        if too_many:
            raise ConfigError(
                f"{source}: sample.{key} {too_many} exceed the {token_count(values)} tokens of the grid")
    side = token_grid(values)
    for key in ("orders", "strategies"):  # region-BxB cuts the token grid into B x B blocks
        uneven = [o for o in sample[key] if o.startswith("region-") and side % int(o.split("x")[-1])]
        if uneven:
            raise ConfigError(f"{source}: sample.{key} {uneven} need a token grid divisible by the block count; "
                              f"the grid is {side}x{side}: drop them or use another resolution")


def stage_threads(values: Mapping, command: str) -> int:
    """Torch intra-op threads of one `arpg` command. Always a params value, never the cores a
    scheduler happens to grant: conv kernels (tokenizer, classifier) give other bits at another
    thread count, so the count is part of what determines a result."""
    if command == "train":
        return values["train"]["threads"]
    if command == "profile":
        return values["profile"]["threads"]
    return values["threads"]


def token_grid(values: Mapping) -> int:
    """Side of the token grid: data.resolution / tokenizer downsampling."""
    return values["data"]["resolution"] // 2 ** (len(values["tokenizer"]["channel_mult"]) - 1)


def token_count(values: Mapping) -> int:
    return token_grid(values) ** 2


def sweep_points(values: Mapping) -> list[SweepPoint]:
    """Every (model, steps, cfg, order) the study samples and evaluates, for each registered decoder.

    A parallel decoder (ARPG): the step sweep (its native order, default cfg), the guidance sweep
    (default steps), the order sweep (default steps and cfg) and the strategy sweep (each of
    sample.strategies at each of sample.strategy_steps, default cfg). A sequential one (the raster
    baseline): one token per step in its native order, over the same guidance values.
    """
    s = values["sample"]
    n = token_count(values)
    points: set[SweepPoint] = set()
    for d in DECODERS.values():
        if d.parallel:
            points |= {SweepPoint(d.name, steps, s["cfg_default"], d.native_order) for steps in s["steps"]}
            points |= {SweepPoint(d.name, s["steps_default"], cfg, d.native_order) for cfg in s["cfg"]}
            points |= {SweepPoint(d.name, s["steps_default"], s["cfg_default"], order) for order in s["orders"]}
            points |= {SweepPoint(d.name, steps, s["cfg_default"], strategy)
                       for strategy in s["strategies"] for steps in s["strategy_steps"]}
        else:
            points |= {SweepPoint(d.name, n, cfg, d.native_order) for cfg in [*s["cfg"], s["cfg_default"]]}
    return sorted(points, key=lambda p: (p.model, p.order, p.steps, p.cfg))
