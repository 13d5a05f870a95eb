"""Property: any value of any field gives either a valid config or the engine's own ConfigError."""
from __future__ import annotations

import dataclasses

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from ebft_engine import ConfigError, RunConfig
from ebft_engine import registry
from ebft_engine.config import _SECTIONS, section_fields

values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.sampled_from(["2:4", "4:8", "0:4", "3:2", "self", "c4", "file:", "file:x",
                                              "wanda", "auto", "cuda:0", "1e-3", "64", "nan", ":"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6)

TOP = [f.name for f in dataclasses.fields(RunConfig)]
FIELDS = section_fields()  # the prune section's registered options included
SECTION_FIELDS = {name: list(fields) for name, fields in FIELDS.items()}
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


DOTTED = [f"{s}.{f}" for s, fs in SECTION_FIELDS.items() for f in fs]
ANNOTATIONS = {**{f"{s}.{name}": kind for s, fields in FIELDS.items() for name, (kind, _d) in fields.items()},
               **{f.name: str(f.type) for f in dataclasses.fields(RunConfig)}}
LISTS = ("baselines", "recoveries", "eval.zeroshot")  # comma-separated strings or lists, kept as unique stripped names


def _expected(key, value, new):
    """What ``key`` reads back as in ``new.to_dict()`` after a successful override with ``value``: the value
    itself, modulo the config's normalisation (numbers from strings, ints widened to float, lists split,
    stripped and de-duplicated) and its two couplings: a left-out sparsity is the pattern's own, and llm-pruner
    turns the default unstructured pattern into structured."""
    annotation = ANNOTATIONS[key]
    if key in LISTS:
        items = value.split(",") if isinstance(value, str) else value
        return list(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if key == "prune.sparsity" and value is None:
        nm = new.prune.nm
        return 0.2 if new.prune.structured else 0.5 if nm is None else 1 - nm[0] / nm[1]
    if key == "prune.pattern" and value == "unstructured" and registry.is_structured(new.prune.method):
        return "structured"
    if value is None:
        return None
    if "float" in annotation:
        return float(value)
    if "int" in annotation:
        return int(value)
    return value


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _assert_landed(old, new, key, value):
    """The override took effect: ``key`` reads back as the (normalised) value, and no other field moved
    (but for llm-pruner's structured pattern)."""
    before, after = _flat(old.to_dict()), _flat(new.to_dict())
    if key in _SECTIONS:  # a whole section: the fields given land, the others are the section's defaults
        given = value or {}
        overrides = {f"{key}.{name}": given.get(name, default) for name, (_k, default) in FIELDS[key].items()}
    else:
        overrides = {key: value}
    for dotted, v in overrides.items():
        try:
            want = _expected(dotted, v, new)
        except (TypeError, ValueError):
            raise AssertionError(f"{dotted}={v!r} was accepted, and it is no {ANNOTATIONS[dotted]}") from None
        got = after[dotted]
        assert got == want and type(got) is type(want), f"{dotted}={v!r} read back as {got!r}, not {want!r}"
        before[dotted] = want
    if registry.is_structured(new.prune.method):
        before["prune.pattern"] = "structured"
    moved = {k: (before[k], after[k]) for k in after if before[k] != after[k]}
    assert not moved, f"overriding {key} also changed {moved}"


def _override(key, value) -> bool:
    """Apply one override to the defaults: either the engine's own ConfigError, or the value landed.
    Returns whether it was applied."""
    old = RunConfig()
    try:
        new = old.with_overrides({key: value})
    except ConfigError as e:
        assert e.field and e.fix
        return False
    _assert_landed(old, new, key, value)
    return True


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(DOTTED + TOP), value=values)
def test_single_override_lands_or_raises_config_error(key, value):
    _override(key, value)


# One value a user might give for every field (strings where the CLI gives strings), none of them the default:
# the fuzz above mostly hits refusals, so this is where each field's landing is sure to be checked.
EXAMPLES = {
    "model": "./my-model", "prune": {"method": "llm-pruner"}, "prune.method": "sparsegpt",
    "prune.sparsity": "0.7", "prune.pattern": "2:4", "prune.dsnot_init": "magnitude", "prune.dsnot_layers": "all",
    "prune.alps_iterations": "60", "prune.owl_lambda": 1, "prune.owl_m": "3", "prune.keep_first": "2",
    "prune.keep_last": 0, "prune.taylor_samples": 5, "prune.taylor_seqlen": "32",
    "calib": {"nsamples": 16, "source": "self"}, "calib.source": "wikitext2", "calib.nsamples": "64",
    "calib.seqlen": 128, "calib.self_nsamples": 4,
    "ebft": {"epochs": 3}, "ebft.epochs": 0, "ebft.lr": "1e-3", "ebft.batch_size": 4, "ebft.weight_decay": 0,
    "ebft.max_grad_norm": 2,
    "lora": {"rank": 2}, "lora.rank": 4, "lora.alpha": 8, "lora.dropout": "0.1", "lora.targets": "q_proj,k_proj",
    "lora.lr": 3e-4, "lora.epochs": 1, "lora.batch_size": "2", "lora.budget": "epochs",
    "eval": {"seqlen": 256}, "eval.source": "c4", "eval.seqlen": "512", "eval.windows": 3,
    "eval.zeroshot": " boolq,rte,,boolq", "eval.zeroshot_limit": 10, "eval.zeroshot_include": "tasks/",
    "baselines": "magnitude, wanda,wanda", "recoveries": ["ebft-gp", "lora"], "device": "cpu",
    "dtype": "float32", "activations": "host", "seed": "7", "runs_dir": "out", "save_model": "model-out",
    "json_out": "result.json",
}


def test_examples_cover_every_field():
    assert set(EXAMPLES) == set(DOTTED + TOP)


def test_a_section_set_to_null_goes_back_to_its_defaults():
    old = RunConfig().with_overrides({"lora.rank": 4})
    new = old.with_overrides({"lora": None})
    assert new.lora.rank == 8
    _assert_landed(old, new, "lora", None)


@pytest.mark.parametrize("key", list(EXAMPLES))
def test_each_field_override_lands(key):
    old = RunConfig()
    new = old.with_overrides({key: EXAMPLES[key]})
    _assert_landed(old, new, key, EXAMPLES[key])
    assert new != old  # the example is no default, so landing it is a change


@settings(max_examples=200, deadline=None)
@given(key=st.text(max_size=20) | st.sampled_from(DOTTED + TOP), value=values)
def test_any_dotted_key_is_refused_or_applied(key, value):
    old = RunConfig()
    try:
        new = old.with_overrides({key: value})
    except ConfigError:
        return
    assert key in ANNOTATIONS  # only a known field can be applied
    _assert_landed(old, new, key, value)
