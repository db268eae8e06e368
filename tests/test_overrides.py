"""The one override/coercion module shared by the training config and the Serve app's arguments."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from rrt_ray.overrides import BOOL_WORDS, apply_override, build, coerce, valid_keys


@dataclass
class Inner:
    flag: bool = False
    ratio: float = 1.0


@dataclass
class Outer:
    count: int = 1
    limit: int | None = None
    name: str = "x"
    inner: Inner = field(default_factory=Inner)


@pytest.mark.parametrize("word", sorted(BOOL_WORDS))
def test_one_bool_rule_for_strings(word):
    assert coerce(word, bool, "k") is BOOL_WORDS[word]
    assert coerce(word.upper(), bool, "k") is BOOL_WORDS[word]


@pytest.mark.parametrize("bad", ["flase", "2", "", "t"])
def test_a_misspelt_bool_is_an_error_not_false(bad):
    with pytest.raises(ValueError, match=f"k must be bool, got {bad!r}"):
        coerce(bad, bool, "k")


def test_numbers_nulls_and_unions():
    assert coerce("3e-4", float, "lr") == pytest.approx(3e-4)
    assert isinstance(coerce(2, float, "lr"), float)
    assert coerce("8", int | str, "rank") == 8 and coerce("full", int | str, "rank") == "full"
    assert coerce("null", int | None, "n") is None and coerce(None, int | None, "n") is None
    with pytest.raises(ValueError, match="n must not be null"):
        coerce(None, int, "n")
    with pytest.raises(ValueError, match="n must be int, got 2.5"):
        coerce(2.5, int, "n")
    with pytest.raises(ValueError, match="n must be int, got True"):
        coerce(True, int, "n")


def test_build_nested_with_dotted_overrides_and_unknown_keys():
    data: dict = {}
    for item in ("count=3", "inner.flag=on", "inner.ratio=0.5", "limit=null"):
        apply_override(data, item)
    built = build(Outer, data)
    assert built == Outer(count=3, limit=None, inner=Inner(flag=True, ratio=0.5))
    assert valid_keys(Outer) == ["count", "limit", "name", "inner.flag", "inner.ratio"]
    with pytest.raises(ValueError, match="unknown config key 'inner.flagg'; valid keys: inner.flag, inner.ratio"):
        build(Outer, {"inner": {"flagg": True}})


def test_serve_app_arguments_use_the_same_rules():
    pytest.importorskip("ray.serve")
    from rrt_ray.serve.app import ServeAppConfig

    with pytest.raises(ValueError, match="engine.max_num_seqs must be int, got 'eight'"):
        ServeAppConfig.from_args({"model": "/m", "engine.max_num_seqs": "eight"})
    assert ServeAppConfig.from_args({"model": "/m", "model_name": "null"}).model_name == "m"


def test_train_config_uses_the_same_rules():
    from rrt_ray.train.config import TrainConfig

    assert TrainConfig.load(None, ["model.teacher=t", "run.verify_export=off"]).run.verify_export is False
    with pytest.raises(ValueError, match="run.verify_export must be bool, got 'flase'"):
        TrainConfig.from_dict({"model": {"teacher": "t"}, "run": {"verify_export": "flase"}})
