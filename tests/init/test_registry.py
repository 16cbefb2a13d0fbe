from functools import partial

import pytest
import torch

from steadygrad import init
from steadygrad.init import InitScheme, available, get, register, scheme_info


def test_get_by_name_alias_callable_and_partial():
    assert get("he_uniform") is init.he_uniform_
    assert get("Kaiming-Uniform") is init.he_uniform_
    assert get("xavier_normal") is init.glorot_normal_
    assert get(torch.nn.init.xavier_uniform_) is torch.nn.init.xavier_uniform_
    fan_out = partial(init.he_normal_, mode="fan_out")
    assert get(fan_out) is fan_out


def test_every_registered_scheme_fills_a_weight_and_matches_its_variance(generator):
    shape = (300, 200)
    for name in available():
        info = scheme_info(name)
        w = info.fn(torch.empty(shape, dtype=torch.float64), generator=generator)
        assert torch.isfinite(w).all()
        if info.variance is not None:
            assert float(w.var(unbiased=False)) == pytest.approx(info.variance(shape), rel=0.05, abs=1e-12), name


def test_unknown_name_lists_every_accepted_name():
    with pytest.raises(ValueError, match=r"Unknown initialization scheme 'he'.*he_uniform.*orthogonal.*identical"):
        get("he")


def test_non_callable_is_a_type_error():
    with pytest.raises(TypeError, match="a name or a callable; got int"):
        get(3)


def test_register_refuses_duplicates_unless_asked():
    scheme = InitScheme("tmp_test_scheme", init.lecun_normal_, "1 / fan_in", None, "test")
    register(scheme)
    try:
        with pytest.raises(ValueError, match="exists"):
            register(scheme)
        register(scheme, overwrite=True)
        assert get("tmp_test_scheme") is init.lecun_normal_
    finally:
        from steadygrad.init.registry import _REGISTRY

        _REGISTRY.pop("tmp_test_scheme")
