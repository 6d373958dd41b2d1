"""Options shared by every command, declared once as Annotated types (the huggingface_hub `hf` style)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

MODEL_PANEL = "Model loading"

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        rich_help_panel=MODEL_PANEL,
        help="Hub id (e.g. mistralai/Mixtral-8x7B-v0.1) or local folder. Default: $MOE_INSPECT_MODEL, "
        "else the small demo model shipped with moe-inspect.",
        show_default=False,
    ),
]


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DtypeOpt = Annotated[
    Dtype, typer.Option("--dtype", rich_help_panel=MODEL_PANEL, help="Weight dtype; auto keeps the checkpoint's.")
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", rich_help_panel=MODEL_PANEL, help="auto, cpu, cuda or cuda:N; auto picks cuda when available."
    ),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", rich_help_panel=MODEL_PANEL, help="Git revision (branch, tag or commit) on the Hub."),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        rich_help_panel=MODEL_PANEL,
        help="Allow the model's own Python code from the Hub to run.",
    ),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        rich_help_panel=MODEL_PANEL,
        help="accelerate device map, e.g. 'auto' to spread a model over GPUs with CPU offload.",
    ),
]
LoadIn4bitOpt = Annotated[
    bool,
    typer.Option(
        "--load-in-4bit",
        rich_help_panel=MODEL_PANEL,
        help="Quantize with bitsandbytes nf4 (routers stay full precision).",
    ),
]
LoadIn8bitOpt = Annotated[
    bool,
    typer.Option(
        "--load-in-8bit",
        rich_help_panel=MODEL_PANEL,
        help="Quantize with bitsandbytes int8 (routers stay full precision).",
    ),
]

# The second model of `compare`: the same loading options with an --against- prefix.
AGAINST_PANEL = "Model B (compare)"

AgainstOpt = Annotated[
    str | None,
    typer.Option(
        "--against",
        rich_help_panel=AGAINST_PANEL,
        help="Model B: Hub id or local folder. Default: the same model as --model (e.g. to compare it quantized).",
        show_default=False,
    ),
]
AgainstDtypeOpt = Annotated[
    Dtype | None,
    typer.Option("--against-dtype", rich_help_panel=AGAINST_PANEL, help="Model B's weight dtype. Default: --dtype."),
]
AgainstDeviceOpt = Annotated[
    str | None,
    typer.Option("--against-device", rich_help_panel=AGAINST_PANEL, help="Model B's device. Default: --device."),
]
AgainstRevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--against-revision",
        rich_help_panel=AGAINST_PANEL,
        help="Model B's Git revision. Default: --revision when --against is not given.",
    ),
]
AgainstDeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--against-device-map",
        rich_help_panel=AGAINST_PANEL,
        help="Model B's accelerate device map. Default: --device-map when --against is not given.",
    ),
]
AgainstLoadIn4bitOpt = Annotated[
    bool,
    typer.Option(
        "--against-load-in-4bit", rich_help_panel=AGAINST_PANEL, help="Quantize model B with bitsandbytes nf4."
    ),
]
AgainstLoadIn8bitOpt = Annotated[
    bool,
    typer.Option(
        "--against-load-in-8bit", rich_help_panel=AGAINST_PANEL, help="Quantize model B with bitsandbytes int8."
    ),
]


def parse_layers(spec: str | None) -> set[int] | None:
    """'0,5-7' -> {0, 5, 6, 7}; None means every layer."""
    if spec is None or not spec.strip():
        return None
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise ValueError
                layers.update(range(low, high + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise typer.BadParameter(f"'{part}' is not a layer or a range like 5-7.", param_hint="--layers") from None
    return layers
