"""The page's config controls and the run config, both ways, keyed by config field path ("prune.sparsity").

Every panel builder returns its config controls as ``{field path: component}``; :class:`Controls` keeps the
page's together. A handler given a set of them as inputs receives ``{component: value}`` from Gradio, which
:meth:`Controls.fields` turns back into field paths: there is no list of positions to keep in step.

:func:`values_to_config` (control values -> RunConfig, through ``RunConfig.with_overrides``) and
:func:`config_to_values` (RunConfig -> control values) are the only two conversions.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from gradio.components import Component

from ebft_engine import RunConfig

from . import policy


def _whole(value: Any) -> Any:
    """A Number may give 48.0 for 48: read it as the whole number (the config turns it back into a float where the
    field is one)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _zero_for_none(value: Any) -> Any:
    return 0 if value is None else value


def _none_for_zero(value: Any) -> Any:
    return _whole(value) or None


def _text(value: Any) -> str:
    return value or ""


def _path_or_none(value: Any) -> str | None:
    return str(value or "").strip() or None


def _comma_list(value: Iterable[str]) -> str:
    return ",".join(value or [])


def _comma_split(value: Any) -> list[str]:
    return [t.strip() for t in str(value or "").split(",") if t.strip()]


def _choices(value: Any) -> list[Any]:
    return list(value or [])


def _recoveries(value: Any) -> list[str]:
    return list(value or RunConfig().recoveries)  # none ticked: the default recovery (EBFT)


def _as_is(value: Any) -> Any:
    return value


# How a control shows a field (config value -> control value) and how it is read back, for the fields a control
# cannot hold as they are: "none" is 0 in a Number and "" in a Textbox, a task list is one comma-separated line.
# Every other field is shown as it is and read with _whole.
CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "eval.seqlen": (_zero_for_none, _none_for_zero),
    "eval.windows": (_zero_for_none, _none_for_zero),
    "eval.zeroshot_limit": (_zero_for_none, _none_for_zero),
    "eval.zeroshot": (_comma_list, _comma_split),
    "save_model": (_text, _path_or_none),
    "baselines": (_choices, _choices),
    "recoveries": (_choices, _recoveries),
}
_PLAIN = (_as_is, _whole)


def field_value(config: RunConfig | dict[str, Any], path: str) -> Any:
    """The config's value at a dotted field path, as ``to_dict`` gives it; KeyError names an unknown path."""
    node: Any = config.to_dict() if isinstance(config, RunConfig) else config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def config_to_values(config: RunConfig, paths: Iterable[str]) -> dict[str, Any]:
    """RunConfig -> the values the controls at ``paths`` show (a preset, a History reload)."""
    data = config.to_dict()
    return {path: CODECS.get(path, _PLAIN)[0](field_value(data, path)) for path in paths}


def values_to_config(values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Control values by field path -> the run config, through ``RunConfig.with_overrides`` (an unknown path or a
    bad value raises ConfigError in the engine's own words), then the deployment's rules (lab/policy.py)."""
    fields = {path: CODECS.get(path, _PLAIN)[1](value) for path, value in values.items()}
    base = base or RunConfig()
    return policy.check(base.with_overrides({**fields, "runs_dir": policy.runs_dir()}))


class ControlValues:
    """A config's values as the controls show them, for a panel builder: ``v["prune.sparsity"]``."""

    def __init__(self, config: RunConfig):
        self._data = config.to_dict()

    def __getitem__(self, path: str) -> Any:
        return CODECS.get(path, _PLAIN)[0](field_value(self._data, path))


class Controls:
    """The page's config controls, ``{field path: component}``, and the way back from a component to its path."""

    def __init__(self, components: dict[str, Component]):
        self.components = dict(components)
        self._paths = {component: path for path, component in self.components.items()}
        if len(self._paths) != len(self.components):
            raise ValueError("one component is given for two config fields")

    @property
    def inputs(self) -> set[Component]:
        """For an event's ``inputs``: its handler then receives ``{component: value}``."""
        return set(self.components.values())

    @property
    def api_order(self) -> list[str]:
        """The field paths in the order the HTTP API (gradio_client) takes their values: Gradio passes a set of
        inputs in the order the components were created, which is the page's order."""
        return sorted(self.components, key=lambda path: self.components[path]._id)

    def fields(self, values: dict[Component, Any]) -> dict[str, Any]:
        """Gradio's ``{component: value}`` -> ``{field path: value}``, leaving out inputs that are not controls."""
        return {self._paths[c]: value for c, value in values.items() if c in self._paths}

    def config(self, values: dict[Component, Any], base: RunConfig | None = None) -> RunConfig:
        return values_to_config(self.fields(values), base)

    def updates(self, config: RunConfig) -> dict[Component, Any]:
        """RunConfig -> ``{component: value}``, a handler's return value that sets every control."""
        values = config_to_values(config, self.components)
        return {self.components[path]: value for path, value in values.items()}
