"""defender_setup.agent.deferred: a stand-in until first use, then the real module."""

import sys

from defender_setup.agent import deferred


def test_a_deferred_module_is_imported_at_its_first_use(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    deferred.defer("colorsys", "no_such_module_here")
    assert "no_such_module_here" not in sys.modules  # not installed: left alone
    import colorsys

    assert type(colorsys) is deferred._Deferred  # bound, not loaded
    assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)  # the real function
    assert type(sys.modules["colorsys"]) is not deferred._Deferred
    import colorsys as again

    assert again is sys.modules["colorsys"] and again.hsv_to_rgb(0.0, 0.0, 1.0) == (1, 1, 1)
    monkeypatch.delitem(sys.modules, "colorsys")


def test_an_imported_module_is_left_alone():
    before = sys.modules["json"]
    deferred.defer("json")
    assert sys.modules["json"] is before
