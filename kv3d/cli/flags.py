"""`kv3d serve` flags generated from `KV3DConfig`: every configuration key is a flag.

A key's flag is spelt exactly as the key is in the config file, the README's table and the
`KV3D_SECTION__FIELD` variable: `--engine.kv_type q8_0`, `--prefix.enabled` / `--no-prefix.enabled`,
`--model.n_gpu_layers none`. One spelling everywhere means nothing to translate and nothing to
keep in step: a field added to the model is a flag the next time the parser is built. On top,
`ALIASES` gives the names llama-server users already type (and `kv3d serve`'s own from before the
flags were generated) as extra spellings of one generated flag each.

Values are checked at parse time by the field's own pydantic type and constraints, so a bad
value is argparse's one-line error naming the flag (exit 2); `load_config` validates the whole
again (cross-field rules) and stays the one place that ranks defaults < file < env < flags.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from kv3d.config import KV3DConfig, load_config

# Extra spellings, each of one config key: llama-server's, and the flags kv3d serve had before
# (README, scripts and tests use them).
ALIASES: dict[str, tuple[str, ...]] = {
    "model.path": ("-m", "--model"),
    "model.context_tokens": ("-c", "--ctx-size"),
    "model.n_gpu_layers": ("-ngl", "--n-gpu-layers"),
    "engine.max_sequences": ("-np", "--parallel"),
    "engine.kv_type": ("--kv-type",),
    "server.threads": ("-t", "--threads"),
    "server.host": ("--host",),
    "server.port": ("--port",),
    "server.api_key": ("--api-key",),
    "server.safe_mode": ("--safe-mode",),
    "deploy.replicas": ("--replicas",),
    "sampling.temperature": ("--temp",),
    "sampling.top_p": ("--top-p",),
    "sampling.top_k": ("--top-k",),
    "sampling.min_p": ("--min-p",),
}

NONE_WORDS = frozenset({"none", "null"})

SCHEME = (
    "Every configuration key is a flag, spelt as in the config file: --SECTION.FIELD VALUE "
    "(switches: --SECTION.FIELD / --no-SECTION.FIELD; optional numbers also take 'none'). "
    "Flags beat KV3D_* environment variables, which beat the config file, which beats the "
    "defaults shown."
)
USAGE = "%(prog)s [--config FILE] [--SECTION.FIELD VALUE ...] [llama-server style flags]"


def config_fields(
    model: type[BaseModel] = KV3DConfig, prefix: str = ""
) -> Iterator[tuple[str, FieldInfo]]:
    """Every leaf field of the configuration as (dotted key, field), in the model's order."""
    for name, field in model.model_fields.items():
        if _is_model(field.annotation):
            yield from config_fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key, grouped by section; unset flags stay out of the namespace."""
    fields = dict(config_fields())
    unknown = sorted(set(ALIASES) - set(fields))
    if unknown:  # a renamed field: fail at start-up, not silently drop the alias
        raise KeyError(f"ALIASES name keys the config does not have: {unknown}")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, field in fields.items():
        section = key.rpartition(".")[0] or "general"
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} (config section)")
        _add_flag(groups[section], key, field)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The keys given on the command line, nested as `load_config(overrides=...)` takes them."""
    nested: dict[str, Any] = {}
    for key, value in _given(args):
        *sections, name = key.split(".")
        _node(nested, sections)[name] = value
    return nested


def config_from_args(path: str | None, args: argparse.Namespace) -> KV3DConfig:
    """`load_config(path)` under the flags in `args`; an explicit `none` beats file and env."""
    config = load_config(path, overrides=overrides(args))
    nulls = [key for key, value in _given(args) if value is None]
    if not nulls:
        return config
    # load_config's merge reads None as "not set" (the Serve YAML leaves keys null), so a flag's
    # `none` would lose to the file; put it back on top and validate the whole once more.
    data = config.model_dump()
    for key in nulls:
        *sections, name = key.split(".")
        _node(data, sections)[name] = None
    return KV3DConfig(**data)


class HelpFormatter(argparse.HelpFormatter):
    """Names a flag's spellings, then its value once: `-c, --ctx-size, --model.context_tokens INT`.

    (argparse repeats the value after every spelling, which buries the help of aliased flags.)
    """

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {metavar}"


def _add_flag(group: argparse._ArgumentGroup, key: str, field: FieldInfo) -> None:
    names = (*ALIASES.get(key, ()), f"--{key}")
    default = field.get_default(call_default_factory=True)
    # argparse %-formats help text; a literal % in a description must not be read as a field.
    text = (field.description or "").replace("%", "%%")
    help_text = f"{text} (default: {_shown(default)})"
    common = {"dest": key, "default": argparse.SUPPRESS, "help": help_text}
    if field.annotation is bool:
        group.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
    else:
        group.add_argument(*names, type=_parser_of(field), metavar=_metavar(field), **common)


def _parser_of(field: FieldInfo) -> Callable[[str], Any]:
    """The flag's `type=`: the field's pydantic type and constraints applied to the text."""
    constrained = Annotated[(field.annotation, *field.metadata)] if field.metadata else None
    adapter = TypeAdapter(constrained or field.annotation)
    nullable = _allows_none(field.annotation)
    structured = _is_structured(field.annotation)

    def parse(raw: str) -> Any:
        if nullable and raw.strip().lower() in NONE_WORDS:
            return None
        try:
            return adapter.validate_json(raw) if structured else adapter.validate_python(raw)
        except ValidationError as exc:
            reason = "; ".join(err["msg"] for err in exc.errors())
            raise argparse.ArgumentTypeError(f"{reason} (got {raw!r})") from None

    return parse


def _metavar(field: FieldInfo) -> str:
    annotation = field.annotation
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(str(choice) for choice in typing.get_args(annotation)) + "}"
    if _is_structured(annotation):
        return "JSON"
    base = [arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation]
    name = getattr(base[0], "__name__", "value").upper()
    return f"{name}|none" if _allows_none(annotation) else name


def _shown(default: Any) -> str:
    if default is None:
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    if default == "":
        return '""'
    return str(default)


def _allows_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_structured(annotation: Any) -> bool:
    # Lists, dicts and models have no one-word spelling: their flags take JSON.
    return _is_model(annotation) or typing.get_origin(annotation) in (list, dict, tuple, set)


def _given(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    given = vars(args)
    return ((key, given[key]) for key, _ in config_fields() if key in given)


def _node(nested: dict[str, Any], sections: list[str]) -> dict[str, Any]:
    for section in sections:
        nested = nested.setdefault(section, {})
    return nested
