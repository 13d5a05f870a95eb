"""Property: any value of any field gives either a valid config or the engine's own ConfigError."""
from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from ebft_engine import ConfigError, RunConfig
from ebft_engine.config import _SECTIONS

values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.sampled_from(["2:4", "4:8", "0:4", "3:2", "self", "c4", "file:", "file:x",
                                              "wanda", "auto", "cuda:0", "1e-3", "64", "nan", ":"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6)

TOP = [f.name for f in dataclasses.fields(RunConfig)]
SECTION_FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()}
sections = st.fixed_dictionaries({}, optional={
    name: st.dictionaries(st.sampled_from(fields + ["typo"]), values, max_size=4) | values
    for name, fields in SECTION_FIELDS.items()})
top_level = st.dictionaries(st.sampled_from([n for n in TOP if n not in _SECTIONS] + ["unknown"]), values,
                            max_size=4)


@settings(max_examples=400, deadline=None)
@given(top=top_level, nested=sections)
def test_from_dict_never_raises_anything_but_config_error(top, nested):
    try:
        config = RunConfig.from_dict({**top, **nested})
    except ConfigError as e:
        assert e.field and e.fix
        return
    assert isinstance(config, RunConfig)
    assert 0 <= config.prune.sparsity < 1
    assert RunConfig.from_dict(config.to_dict()) == config  # a valid config round-trips


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from([f"{s}.{f}" for s, fs in SECTION_FIELDS.items() for f in fs] + TOP), value=values)
def test_single_override_never_raises_anything_but_config_error(key, value):
    try:
        RunConfig().with_overrides({key: value})
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(key=st.text(max_size=20), value=values)
def test_any_dotted_key_is_refused_or_applied(key, value):
    try:
        RunConfig().with_overrides({key: value})
    except ConfigError:
        pass
