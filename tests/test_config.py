"""The config loader: overrides, validation errors that name the key, nested blocks built."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ldm_smd.blocks import instantiate
from ldm_smd.config import ConfigError, load_config, validate_config


class Leaf:
    """Test target.

    Args:
        width: an int.
        rate: a float.
        name: a string.
        mults: a list of ints.
        extra: optional dict.
    """

    def __init__(self, *, width: int, rate: float = 0.1, name: str = "x",
                 mults: list[int] | None = None, extra: dict | None = None) -> None:
        self.width, self.rate, self.name, self.mults, self.extra = width, rate, name, mults, extra


class Holder:
    """Test target holding a built object and a spec kept as data.

    Args:
        child: built from its block before construction.
        spec: kept as a dict.
    """

    def __init__(self, *, child: Leaf, spec: dict | None = None) -> None:
        self.child, self.spec = child, spec


LEAF = f"{__name__}.Leaf"
HOLDER = f"{__name__}.Holder"


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def base() -> dict:
    return {"seed": 1, "model": {"target": LEAF, "params": {"width": 4}}}


def test_overrides_merge_with_yaml_types(tmp_path):
    cfg = load_config(write(tmp_path, base()),
                      ["model.params.rate=0.5", "model.params.mults=[1,2]", "seed=7"])
    assert cfg["model"]["params"] == {"width": 4, "rate": 0.5, "mults": [1, 2]}
    assert cfg["seed"] == 7


def test_mapping_override_replaces_block_and_tilde_deletes(tmp_path):
    cfg = base()
    cfg["model"]["params"]["extra"] = {"a": 1, "b": 2}
    out = load_config(write(tmp_path, cfg), ["model.params.extra={c: 3}", "~seed"])
    assert out["model"]["params"]["extra"] == {"c": 3} and "seed" not in out
    with pytest.raises(ConfigError, match="no key 'model.params.nope'"):
        load_config(write(tmp_path, cfg), ["~model.params.nope"])


def test_unknown_param_names_key_and_lists_valid(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, base()), ["model.params.widht=3"])
    msg = str(err.value)
    assert "model.params.widht" in msg and "width" in msg and "rate" in msg


def test_wrong_type_names_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.params\.width: expected int"):
        load_config(write(tmp_path, base()), ["model.params.width=wide"])


def test_missing_required_param_is_named(tmp_path):
    cfg = base()
    cfg["model"]["params"] = {}
    with pytest.raises(ConfigError, match="missing required parameter.*width"):
        load_config(write(tmp_path, cfg))


def test_unknown_top_level_and_trainer_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown top-level key.*modle"):
        validate_config({**base(), "modle": {}})
    with pytest.raises(ConfigError, match="trainer.max_step.*max_steps"):
        validate_config({**base(), "trainer": {"max_step": 3}})


def test_bad_target_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="has no 'Nope'"):
        validate_config({"model": {"target": f"{__name__}.Nope"}})
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(write(tmp_path, base()), ["seed"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_nested_blocks_validated_and_built_unless_dict_annotated():
    spec = {"target": HOLDER, "params": {"child": {"target": LEAF, "params": {"width": 2}},
                                         "spec": {"target": LEAF, "params": {"width": 3}}}}
    validate_config({"model": spec})
    built = instantiate(spec)
    assert isinstance(built.child, Leaf) and built.child.width == 2
    assert built.spec == {"target": LEAF, "params": {"width": 3}}
    bad = {"target": HOLDER, "params": {"child": {"target": LEAF, "params": {"width": "2"}}}}
    with pytest.raises(ConfigError, match=r"model\.params\.child\.params\.width"):
        validate_config({"model": bad})


def test_every_shipped_config_validates():
    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(p for p in root.rglob("*.yaml") if "mixture" not in p.parts)
    assert paths, "no configs found"
    for path in paths:
        load_config(path)
