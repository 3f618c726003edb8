import json

import pytest

from arpg.config import load_params, token_count, token_grid, validate
from arpg.sweeps import sweep_points
from arpg.errors import ConfigError
from arpg.paths import REPO_ROOT, SCHEMA_PATH, SweepPoint


def test_default_params_are_valid():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params["data"]["source"] == "fashion-mnist"
    assert token_grid(params) == 8 and token_count(params) == 64
    assert len(params.digest) == 12


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(config):
    load_params(REPO_ROOT / "configs" / config)


def test_bad_sweep_value_names_the_key(params_file):
    with pytest.raises(ConfigError) as err:
        load_params(params_file(**{"sample.steps": [8, "x"]}))
    message = str(err.value)
    assert "sample.steps" in message and '"x"' in message and "integer" in message


def test_bad_enum_lists_allowed_values(params_file):
    with pytest.raises(ConfigError) as err:
        load_params(params_file(**{"sample.schedule": "cosinus"}))
    message = str(err.value)
    assert "sample.schedule" in message and '"cosinus"' in message and '"arccos"' in message


def test_unknown_key_is_named(params_file):
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) lr_typo"):
        load_params(params_file(**{"train.lr_typo": 1.0}))


def test_all_errors_reported_at_once(params_file):
    with pytest.raises(ConfigError) as err:
        load_params(params_file(**{"seed": -1, "data.channels": 2}))
    assert "seed" in str(err.value) and "data.channels" in str(err.value)


def test_resolution_must_fit_the_tokenizer(params_file):
    with pytest.raises(ConfigError, match="data.resolution 36 is not divisible"):
        load_params(params_file(**{"data.resolution": 36, "tokenizer.channel_mult": [1, 2, 2, 2]}))


def test_steps_beyond_the_grid_are_rejected(params_file):
    with pytest.raises(ConfigError, match=r"sample.steps \[65\]"):
        load_params(params_file(**{"sample.steps": [8, 65]}))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_schema_is_strict_everywhere():
    """Every object in the schema rejects unknown keys and requires its keys."""
    schema = json.loads((REPO_ROOT / "workflow/schemas/params.schema.json").read_text())

    def objects(node):
        if isinstance(node, dict):
            if node.get("type") == "object":
                yield node
            for value in node.values():
                yield from objects(value)

    # the one deliberate exception: a profile override may leave repeats / warmup at the profile's values
    optional = {("batch_sizes", "model", "repeats", "steps", "warmup"): {"repeats", "warmup"}}
    for obj in objects(schema):
        assert obj["additionalProperties"] is False
        keys = set(obj["properties"])
        assert set(obj["required"]) == keys - optional.get(tuple(sorted(keys)), set())


def test_sweep_points_cover_each_sweep(params_file):
    params = load_params(params_file(**{"sample.steps": [2, 8], "sample.cfg": [1.0],
                                        "sample.orders": ["raster"],
                                        "sample.strategies": ["locality", "region-4x4"], "sample.strategy_steps": [2, 4],
                                        "sample.steps_default": 8, "sample.cfg_default": 3.0}))
    points = set(sweep_points(params))
    assert points == {
        SweepPoint("arpg", 2, 3.0, "random"), SweepPoint("arpg", 8, 3.0, "random"),
        SweepPoint("arpg", 8, 1.0, "random"), SweepPoint("arpg", 8, 3.0, "raster"),
        SweepPoint("raster", 64, 1.0, "raster"), SweepPoint("raster", 64, 3.0, "raster"),
        *(SweepPoint("arpg", steps, 3.0, s) for s in ("locality", "region-4x4") for steps in (2, 4)),
    }
    assert SweepPoint("arpg", 8, 3.0, "random").tag == "steps8_cfg3.0_random"
    assert SweepPoint("arpg", 8, 1.25, "z-curve").tag == "steps8_cfg1.25_z-curve"


@pytest.mark.parametrize("change, message", [
    ({"sample.steps_default": 16, "sample.steps": [2, 8]}, r"sample.steps_default 16 is not in sample.steps .*add it"),
    ({"sample.cfg": [1.0, 4.0]}, r"sample.cfg \[1.0, 4.0\] lists sample.cfg_default 4.0.*drop it from sample.cfg"),
    ({"sample.orders": ["random", "raster"]}, r"sample.orders \['random'\] is a parallel decoder's native order"),
    ({"sample.orders": ["locality"], "sample.strategies": ["locality"]},
     r"sample.strategies \['locality'\] is in sample.orders or a native order.*drop locality"),
    ({"sample.cfg_default": 4}, r"sample.cfg_default: write 4 as 4.0"),
    ({"sample.cfg": [1, 2.0]}, r"sample.cfg: write 1 as 1.0"),
    ({"sample.steps": [2, 8, 8]}, r"sample.steps: got \[2, 8, 8\], expected each value once"),
])
def test_overlapping_or_misspelt_sweeps_are_refused_with_the_fix(params_file, change, message):
    """Each point in one sweep family (dvc.yaml runs each family as one stage over its list), each
    guidance value spelt as DVC and Snakemake both write it."""
    with pytest.raises(ConfigError, match=message):
        load_params(params_file(**change))


def test_the_families_are_disjoint_and_cover_the_points():
    from arpg.sweeps import sweep_families

    for name in ("params.yaml", "configs/smoke.yaml", "configs/paper.yaml"):
        values = load_params(REPO_ROOT / name).values
        each = [p for f in sweep_families(values) for p in f.points(values)]
        assert len(each) == len(set(each)) == len(sweep_points(values)), name


def test_null_written_as_empty_loads_the_same(tmp_path):
    """`dvc exp run -S` rewrites the params file and writes null as an empty value: the same params,
    digest and job fingerprints."""
    from arpg import pipeline

    text = (REPO_ROOT / "configs/smoke.yaml").read_text()
    assert ": null" in text
    (tmp_path / "empty.yaml").write_text(text.replace(": null", ":"))
    a, b = load_params(REPO_ROOT / "configs/smoke.yaml"), load_params(tmp_path / "empty.yaml")
    assert a.values == b.values and a.digest == b.digest
    assert [pipeline.fingerprint(a, j) for j in pipeline.jobs(a)] == [pipeline.fingerprint(b, j) for j in pipeline.jobs(b)]


def test_flat_params_use_dotted_keys():
    params = load_params(REPO_ROOT / "params.yaml")
    flat = params.flat()
    assert flat["sample.steps"] == params["sample"]["steps"]
    assert flat["data.resolution"] == 32


def test_validate_rejects_non_mapping():
    with pytest.raises(ConfigError, match="expected object"):
        validate([1, 2], "x.yaml")


def test_strategy_sweep_values_are_checked_against_the_grid(params_file):
    with pytest.raises(ConfigError, match=r"sample.strategy_steps \[65\] exceed the 64 tokens"):
        load_params(params_file(**{"sample.strategy_steps": [2, 65]}))
    with pytest.raises(ConfigError, match=r"sample.strategies \['region-4x4'\] need a token grid divisible"):
        load_params(params_file(**{"data.resolution": 24, "sample.steps": [2, 8],  # 6x6 tokens
                                   "sample.strategies": ["region-4x4"]}))
    with pytest.raises(ConfigError, match="sample.strategies"):
        load_params(params_file(**{"sample.strategies": ["spiral"]}))


def test_the_schema_offers_exactly_the_samplers_orders_and_strategies():
    from arpg.engine import sampler, strategies

    sample = json.loads(SCHEMA_PATH.read_text())["properties"]["sample"]["properties"]
    assert sample["orders"]["items"]["enum"] == list(sampler.ORDERS)
    assert sample["strategies"]["items"]["enum"] == [*strategies.REGION_ORDERS, strategies.LOCALITY,
                                                     strategies.CONFIDENCE]
