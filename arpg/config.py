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
from arpg.paths import DEFAULT_PARAMS, SCHEMA_PATH, Layout, format_cfg
from arpg.sizes import sizes_of

PARAMS_ENV = "ARPG_PARAMS"


# Keys that set how often a training logs or saves its state, or ask for a compiler that changes no
# weights: no result depends on them, so they are read unrecorded and are in no job's fingerprint
# (changing one reruns nothing). A resumed training checks every other key of its section.
NOT_RESULT_KEYS = {"tokenizer": ("checkpoint_every", "log_every"),
                   "train": ("checkpoint_every", "log_every", "compile")}


def unrecorded(params: Mapping) -> Mapping:
    """The plain values behind `params` (for placing and labelling work, not computing it)."""
    return params.values if isinstance(params, Params) else params


def section_values(params: Mapping, section: str, names) -> dict[str, Any]:
    """`params[section][name]` for each of `names`; the section's NOT_RESULT_KEYS are read unrecorded
    (no fingerprint holds them)."""
    recorded, plain = params[section], unrecorded(params)[section]
    skip = NOT_RESULT_KEYS.get(section, ())
    return {name: (plain if name in skip else recorded)[name] for name in names}


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
        train["properties"][d.model_key]["enum"] = sizes_of(d.network)  # the sizes that build its network
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
    if error.validator == "uniqueItems":
        return "each value once"
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
    _check_sweeps_disjoint(sample, source)
    side = token_grid(values)
    for key in ("orders", "strategies"):  # region-BxB cuts the token grid into B x B blocks
        uneven = [o for o in sample[key] if o.startswith("region-") and side % int(o.split("x")[-1])]
        if uneven:
            raise ConfigError(f"{source}: sample.{key} {uneven} need a token grid divisible by the block count; "
                              f"the grid is {side}x{side}: drop them or use another resolution")


def _check_sweeps_disjoint(sample: Mapping, source: str) -> None:
    """Each sweep point in one family (`arpg.sweeps`): dvc.yaml runs each family as one stage over
    its params list, and two stages may not write the same point."""
    problems = []
    if sample["steps_default"] not in sample["steps"]:
        problems.append(f"sample.steps_default {sample['steps_default']} is not in sample.steps "
                        f"{sample['steps']}: the step sweep holds the default point; add it to sample.steps")
    if any(float(c) == float(sample["cfg_default"]) for c in sample["cfg"]):
        problems.append(f"sample.cfg {sample['cfg']} lists sample.cfg_default {sample['cfg_default']}: sample.cfg "
                        "holds the guidance values besides the default (the step sweep has the default point); "
                        "drop it from sample.cfg")
    native = [d.native_order for d in DECODERS.values() if d.parallel]
    for key, others, what in (("orders", native, "a parallel decoder's native order (the step sweep has it)"),
                              ("strategies", [*native, *sample["orders"]], "in sample.orders or a native order")):
        clash = [o for o in sample[key] if o in others]
        if clash:
            problems.append(f"sample.{key} {clash} {'is' if len(clash) == 1 else 'are'} {what}: "
                            f"sample.{key} holds the others only; drop {', '.join(clash)} from sample.{key}")
    # DVC writes a guidance value into paths as YAML holds it ('4'), Snakemake as format_cfg does ('4.0')
    for key, values in (("cfg_default", [sample["cfg_default"]]), ("cfg", sample["cfg"])):
        misspelt = [v for v in values if str(v) != format_cfg(v)]
        if misspelt:
            problems.append(f"sample.{key}: write {', '.join(map(str, misspelt))} as "
                            f"{', '.join(format_cfg(v) for v in misspelt)} (DVC names sweep-point paths by the "
                            "value as written, Snakemake by its decimal form)")
    if problems:
        raise ConfigError(f"{source}: " + "\n  ".join(problems))


def stage_threads(values: Mapping, command: str) -> int:
    """Torch intra-op threads of one `arpg` command. Always a params value, never the cores a
    scheduler happens to grant: conv kernels (tokenizer, classifier) give other bits at another
    thread count, so the count is part of what determines a result."""
    if command == "train":
        return values["train"]["threads"]
    if command == "profile":
        return values["profile"]["threads"]
    if command in POINT_COMMANDS:
        return values["point_threads"]
    return values["threads"]


# The commands of the many small jobs (per sweep point, and the zero-shot ones): at `point_threads`
# each, so that on a small machine several run side by side.
POINT_COMMANDS = ("sample", "evaluate", "select", "zero-shot", "gallery")


def token_grid(values: Mapping) -> int:
    """Side of the token grid: data.resolution / tokenizer downsampling."""
    return values["data"]["resolution"] // 2 ** (len(values["tokenizer"]["channel_mult"]) - 1)


def token_count(values: Mapping) -> int:
    return token_grid(values) ** 2


def dotted(values: Mapping, key: str) -> Any:
    """The value of a dotted params key (`train.lr`)."""
    node: Any = values
    for part in key.split("."):
        node = node[part]
    return node
