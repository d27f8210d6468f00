"""One ``target`` / ``params`` block: its values checked against the target's signature, errors
that name the key, and building it."""

from __future__ import annotations

import pytest

from ldm_smd.blocks import check_type, import_target, instantiate, validate_spec
from ldm_smd.errors import ConfigError


class Widget:
    """Test target.

    Args:
        size: an int.
        tags: a list of strings.
        scale: a float.
    """

    def __init__(self, *, size: int, tags: list[str] | None = None, scale: float = 1.0) -> None:
        self.size, self.tags, self.scale = size, tags, scale


WIDGET = f"{__name__}.Widget"


@pytest.mark.parametrize(
    "value,annotation,ok",
    [(3, float, True), (True, int, False), ("a", int, False), ([1, 2], list[int], True),
     ([1, "a"], list[int], False), (None, int | None, True), ({"a": 1}, dict, True),
     ((1, 2), tuple[int, int], True), ([1], tuple[int, int], False)],
)
def test_check_type(value, annotation, ok):
    assert check_type(value, annotation) is ok


@pytest.mark.parametrize("params,error", [
    ({"size": 2, "colour": "red"},
     r"net\.params\.colour: unknown parameter .*valid: scale, size, tags"),
    ({"size": "2"}, r"net\.params\.size: expected int, got str"),
    ({"tags": ["a"]}, r"net\.params: missing required parameter\(s\) \['size'\]"),
    ({"size": 2, "tags": [1]}, r"net\.params\.tags: expected list\[str\] \| None"),
])
def test_a_bad_block_is_named_by_its_key(params, error):
    with pytest.raises(ConfigError, match=error):
        validate_spec({"target": WIDGET, "params": params}, key="net")


def test_a_good_block_is_built_with_extra_arguments():
    spec = {"target": WIDGET, "params": {"size": 3, "tags": ["x"]}}
    validate_spec(spec, key="net")
    built = instantiate(spec, scale=0.5)
    assert (built.size, built.tags, built.scale) == (3, ["x"], 0.5)
    with pytest.raises(ConfigError, match=r"net\.target: .* has no 'Gadget'; it defines: .*Widget"):
        import_target(f"{__name__}.Gadget", key="net.target")
