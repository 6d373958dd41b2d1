"""Options shared by every command, declared once as Annotated types (the huggingface_hub `hf` style).

The model-loading options are one group, added to a command by ``with_load_options`` and handed to it as
one ``LoadOptions``; a prefix ("against-") gives a second group for commands that load two models.
Nothing here imports torch, transformers or pandas: ``--help`` must stay instant.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Annotated, Any, TypeVar

import typer

from moe_inspect.errors import UserError
from moe_inspect.model.options import DTYPE_NAMES, LoadOptions

MODEL_PANEL = "Model loading"

F = TypeVar("F", bound=Callable[..., Any])

Dtype = Enum("Dtype", {name: name for name in DTYPE_NAMES}, type=str)  # type: ignore[misc]


def flag(*decls: str, **kwargs: Any) -> Any:
    """A boolean option that takes no value: no '<bool>' in --help, which had users write '--lines true'."""
    return typer.Option(*decls, metavar="", **kwargs)


QuietOpt = Annotated[
    bool, flag("--quiet", "-q", help="Print no status lines, progress or tables; errors, --json and files only.")
]
JsonOpt = Annotated[bool, flag("--json", help="Print the tables as one JSON document on stdout (for scripts).")]

# (LoadOptions field, short flag, type, help); the flag is the field with dashes, both get the prefix.
_LOAD_FIELDS: tuple[tuple[str, str | None, Any, str], ...] = (
    (
        "model", "-m", str | None,
        "Hub id (e.g. mistralai/Mixtral-8x7B-v0.1) or local folder. Default: $MOE_INSPECT_MODEL, "
        "else the small demo model shipped with moe-inspect.",
    ),
    ("dtype", None, Dtype, "Weight dtype; auto keeps the checkpoint's."),
    ("device", None, str, "auto, cpu, cuda or cuda:N; auto picks cuda when available."),
    ("revision", None, str | None, "Git revision (branch, tag or commit) on the Hub."),
    ("trust_remote_code", None, bool, "Allow the model's own Python code from the Hub to run."),
    (
        "device_map", None, str | None,
        "accelerate device map, e.g. 'auto' to spread a model over GPUs with CPU offload.",
    ),
    ("load_in_4bit", None, bool, "bitsandbytes 4-bit, routed experts included (routers stay full precision)."),
    ("load_in_8bit", None, bool, "bitsandbytes int8, routed experts included (routers stay full precision)."),
    ("bnb_4bit_quant_type", None, str, "4-bit data type: nf4 or fp4."),
    ("double_quant", None, bool, "With 4-bit loading: quantize the 4-bit scales too (about 0.4 bits per weight less)."),
    (
        "quantize", None, str | None,
        "float8: torchao weight-only float8 on the experts and linears (routers stay full precision).",
    ),
)


def _load_option(name: str, prefix: str = "", panel: str = MODEL_PANEL, help_text: str | None = None) -> Any:
    """One loading option as an Annotated type, its flag prefixed (``--against-model``, also ``--against``).

    ``help_text`` replaces the field's own help (and its shown default), for a group whose defaults differ.
    """
    _, short, kind, own_help = next(f for f in _LOAD_FIELDS if f[0] == name)
    decls = [f"--{prefix}{name.replace('_', '-')}"] + ([short] if short and not prefix else [])
    if name == "model" and prefix:
        decls.insert(0, f"--{prefix.rstrip('-')}")  # the second model itself: --against MODEL
    default = getattr(LoadOptions(), name)
    option = flag if kind is bool else typer.Option
    show_default = help_text is None and default not in (None, False)
    return Annotated[
        kind, option(*decls, rich_help_panel=panel, help=help_text or own_help, show_default=show_default)
    ]


RevisionOpt = _load_option("revision")
TrustRemoteCodeOpt = _load_option("trust_remote_code")


def load_option_parameters(
    prefix: str = "", panel: str = MODEL_PANEL, helps: Mapping[str, str] | None = None
) -> list[inspect.Parameter]:
    """The loading options as keyword parameters named ``{prefix}{field}`` with flags ``--{prefix}{flag}``."""
    defaults = LoadOptions()
    return [
        inspect.Parameter(
            prefix.replace("-", "_") + name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=_load_option(name, prefix, panel, (helps or {}).get(name)),
            default=Dtype(getattr(defaults, name)) if kind is Dtype else getattr(defaults, name),
        )
        for name, _, kind, _ in _LOAD_FIELDS
    ]


def with_load_options(
    prefix: str = "", dest: str = "load", panel: str = MODEL_PANEL, helps: Mapping[str, str] | None = None
) -> Callable[[F], F]:
    """Give a command the loading options (prefixed) and call it with one ``LoadOptions`` as ``dest``.

    ``helps`` replaces some fields' help texts (a second model's options, whose defaults are the first's).
    """

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        added = load_option_parameters(prefix, panel, helps)
        kept = [p for p in signature.parameters.values() if p.name != dest]
        names = [p.name for p in added]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = [kwargs.pop(name) for name in names]
            fields = {f[0]: v.value if isinstance(v, Enum) else v for f, v in zip(_LOAD_FIELDS, values, strict=True)}
            kwargs[dest] = LoadOptions(**fields)
            return func(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def parse_layers(spec: str | None) -> set[int] | None:
    """'0,5-7' -> {0, 5, 6, 7}; None (option not given) means every layer; an empty selection is refused."""
    if spec is None:
        return None
    if not spec.strip():
        raise UserError("`layers` is empty; give layers like 0,5-7, or leave the option out for all layers.")
    layers: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        low, sep, high = part.partition("-")
        if not (low.isdigit() and (not sep or high.isdigit())):
            raise UserError(f"'{part}' in `layers` is not a layer or a range like 5-7.")
        first, last = int(low), int(high) if sep else int(low)
        if first > last:
            raise UserError(f"The range {part} in `layers` is reversed; write {last}-{first}.")
        layers.update(range(first, last + 1))
    return layers
