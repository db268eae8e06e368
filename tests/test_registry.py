"""The Registry class: insertion order, decorator and call forms, and the one-line error."""

import pytest

from rrt_ray.registry import Registry


def test_register_as_decorator_and_as_call_keeps_insertion_order():
    reg = Registry("colour")

    @reg.register("red")
    def red():
        return "r"

    assert reg.register("blue", "b") == "b"
    assert red() == "r"  # the decorator returns what it decorates
    assert reg.names() == ("red", "blue") and list(reg) == ["red", "blue"] and len(reg) == 2
    assert reg.get("blue") == "b" and "red" in reg and "green" not in reg and 3 not in reg


def test_unknown_and_duplicate_names_are_refused_with_the_allowed_ones():
    reg = Registry("colour")
    reg.register("red", 1)
    reg.register("blue", 2)
    with pytest.raises(ValueError, match=r"^unknown colour 'green'; allowed: red, blue$"):
        reg.get("green")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("red", 3)
    assert reg.unregister("red") == 1 and reg.names() == ("blue",)
