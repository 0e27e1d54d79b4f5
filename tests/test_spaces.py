"""Search spaces declared next to each method's parameters (``Param.space``) and ``spaces(name)``."""
import math

import pytest

from mie.errors import MieInputError
from mie.methods import METHODS, create_method, method_params, spaces
from mie.methods.params import boolean

KINDS = {"log", "float", "int", "choice"}
# Registered names whose settable hyper-parameters are all switches or schedules: nothing to search.
SWITCHES_ONLY = {"joint", "joint_concat", "joint_sum", "unimodal", "alternating", "mla", "smv"}
# Epoch schedules: searching them would change what the run's epoch budget means.
SCHEDULES = {"modulation_starts", "modulation_ends", "ogm_ends", "epochs_per_stage", "rectify_epochs", "warmup",
             "warmup_epochs", "pretrain_epochs", "per_epochs"}
# Settings that a registered variant fixes name which method it is: never searched.
IDENTITY = {key for _, fixed, _ in METHODS.values() for key in fixed} | {"fusion"}


def declared():
    """(class name, parameter, Param) for every Param with a space, over every registered class."""
    classes = {cls for cls, _, _ in METHODS.values()}
    return [(cls.__name__, key, p) for cls in sorted(classes, key=lambda c: c.__name__)
            for key, p in cls.params.items() if p.space is not None]


def ends(space):
    return list(space.choices) if space.kind == "choice" else [space.low, space.high]


@pytest.mark.parametrize("owner,key,param", declared(), ids=lambda v: v if isinstance(v, str) else "")
def test_space_is_valid_and_holds_the_default(owner, key, param):
    space = param.space
    assert space.kind in KINDS
    if space.kind == "choice":
        assert space.choices and param.default in space.choices
    else:
        assert space.low < space.high
        assert space.low <= param.default <= space.high
        if space.kind == "log":
            assert space.low > 0
        if space.kind == "int":
            assert all(isinstance(v, int) and not isinstance(v, bool) for v in (space.low, space.high))
            assert isinstance(param.default, int)
    for value in ends(space) + [param.default]:
        assert param.check is None or param.check(value) is None, (owner, key, value)


@pytest.mark.parametrize("owner,key,param", declared(), ids=lambda v: v if isinstance(v, str) else "")
def test_switches_and_schedules_are_not_searched(owner, key, param):
    assert param.check is not boolean and not isinstance(param.default, (bool, str))
    assert key not in IDENTITY | SCHEDULES


def test_log_spaces_are_centred_on_the_default():
    """A log space's default sits within a factor of 5 of its geometric centre (a decade each side ↦ 1)."""
    for owner, key, param in declared():
        if param.space.kind == "log":
            centre = math.sqrt(param.space.low * param.space.high)
            assert 1 / 5 <= param.default / centre <= 5, (owner, key)


def test_spaces_of_the_registry():
    assert set(spaces("mie")) == {"tau", "rho"}
    assert set(spaces("mie_sam_only")) == {"rho"}          # GM off: τ has no effect
    assert set(spaces("mie_gm_only")) == {"tau"}           # SAM off: ρ has no effect
    assert set(spaces("mie_released")) == {"tau", "rho", "mixup_alpha", "flat_weight"}
    assert set(spaces("ogm")) == set(spaces("ogm_ge")) == {"alpha"}
    assert set(spaces("opm_ogm")) == set(spaces("opm")) | {"alpha"}
    assert "mu" not in spaces("pmr") and "mu" in spaces("pmr_per")
    assert spaces("smv") == {} and set(spaces("smv_modality")) == {"alpha"}
    assert spaces("mie")["tau"] == METHODS["mie"][0].params["tau"].space
    assert set(spaces("mie_recipe")) == set(spaces("mie_recipe_heads")) == {"tau", "rho", "ensemble_weight"}


@pytest.mark.parametrize("name", list(METHODS))
def test_spaces_cover_settable_parameters_only(name):
    space = spaces(name)
    cls, fixed, _ = METHODS[name]
    assert set(space) <= set(method_params(name)) and not set(space) & set(fixed)
    assert (space == {}) == (name in SWITCHES_ONLY)
    for key, s in space.items():                           # each end is a method the registry builds
        for value in ends(s):
            assert getattr(create_method(name, **{key: value}), key) == value


def test_spaces_of_an_unknown_method():
    with pytest.raises(MieInputError, match="unknown method"):
        spaces("nope")
