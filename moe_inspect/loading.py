"""Load a model, its tokenizer and its router map from a Hub id or a local folder.

Hub ids work for real users (HF_HUB_OFFLINE and the usual HF_TOKEN variables are honoured by
huggingface_hub itself); tests load tiny models saved to a folder through this same path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_inspect.capture import capture
from moe_inspect.errors import NotMoEError, UserError
from moe_inspect.model.footprint import measure_footprint, quantization_report
from moe_inspect.model.prequantized import checkpoint_quantization, prequantized_note
from moe_inspect.model.quantize import QuantOptions, no_grad_context, quantization_config, quantized_forward_error
from moe_inspect.routers import RouterSpec, find_routers, find_routers_heuristic

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEMO_MODEL_ENV = "MOE_INSPECT_MODEL"


@dataclass
class LoadedModel:
    """A model ready for routing capture, with what was asked for and what was got."""

    model: nn.Module
    tokenizer: Any
    routers: list[RouterSpec]
    model_id: str
    revision: str | None
    dtype: str
    device: str
    quantization: str | None = None
    is_default: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def input_device(self) -> torch.device:
        """Where input ids must go: the embedding's device (differs from 'device' under device maps)."""
        embeddings = self.model.get_input_embeddings()
        return embeddings.weight.device if embeddings is not None else torch.device(self.device)

    @property
    def model_type(self) -> str:
        return str(getattr(self.model.config, "model_type", "unknown"))

    def footprint_bytes(self) -> int:
        """Bytes really held by parameters, buffers and quantization scales, as loaded."""
        return measure_footprint(self.model, self.routers).total


def demo_model_path() -> Path:
    """The shipped demo model: inside the installed package, or in the source tree's fixtures/."""
    packaged = Path(__file__).parent / "demo_model"
    if (packaged / "config.json").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "fixtures" / "demo-model"


def resolve_model(model: str | None) -> tuple[str, bool]:
    """(model id or path, is_default): --model, then $MOE_INSPECT_MODEL, then the shipped demo model."""
    if model:
        return model, False
    env = os.environ.get(DEMO_MODEL_ENV)
    if env:
        return env, False
    path = demo_model_path()
    if not (path / "config.json").is_file():
        raise UserError(f"No --model given and the shipped demo model is missing from {path}.")
    return str(path), True


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available, else cpu; validates explicit choices."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} was asked for but no CUDA device is available.")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise UserError(f"--device {device} does not exist: {torch.cuda.device_count()} CUDA device(s) found.")
        return device
    raise UserError(f"--device must be auto, cpu, cuda or cuda:N, not '{device}'.")


def looks_like_path(model: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else that does not exist is a mistyped path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model or model.endswith(".json")


def hub_offline() -> bool:
    """Whether huggingface_hub will refuse network access (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _check_source(model: str) -> None:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"'{model}' is a file; pass the model's folder (with config.json) instead.")
        if not (path / "config.json").is_file():
            raise UserError(f"'{model}' has no config.json, so it is not a transformers model folder.")
    elif looks_like_path(model):
        raise UserError(f"No model folder at '{model}'.")


def _load_error(model: str, exc: Exception) -> UserError:
    offline = hub_offline()
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if offline and not Path(model).expanduser().exists():
        return UserError(
            f"Could not load '{model}': it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set."
        )
    if "trust_remote_code" in str(exc) or "does not recognize this architecture" in str(exc):
        return UserError(f"transformers does not know the model type of '{model}'; retry with --trust-remote-code.")
    return UserError(f"Could not load '{model}': {text}")


def probe_routers(model: nn.Module, routers: list[RouterSpec], input_device: torch.device) -> None:
    """Run one short forward and take E and k from what each router actually returned.

    Config keys lie in places (PhiMoE ignores num_experts_per_tok; HunYuan has per-layer lists), the
    router's own output does not.
    """
    ids = torch.tensor([[1, 2]], device=input_device)
    with no_grad_context(model), capture(routers) as cap:
        model(input_ids=ids)
    for spec, calls in zip(routers, cap.calls, strict=True):
        if not calls:
            continue
        out = calls[0]
        spec.top_k = int(out.experts.shape[-1])
        if spec.scoring != "product_key":
            spec.num_experts = int(out.logits.shape[-1]) - spec.null_experts


def load_tokenizer(model_id: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer alone (fast), so corpus checks can run before the weights load."""
    from transformers import AutoTokenizer

    _check_source(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise _load_error(model_id, exc) from exc
    if tokenizer.pad_token is None:
        # Pads are masked out everywhere, so any existing token will do; a new one would be out of vocabulary.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def max_positions(model_id: str, revision: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The configured context length (max_position_embeddings and kin), if the config states one."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(model_id, exc) from exc
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load(
    model: str | None = None,
    *,
    tokenizer: Any = None,
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    quant: QuantOptions | None = None,
) -> LoadedModel:
    """Load model + tokenizer + routers; every user-caused failure is a UserError with one sentence."""
    from transformers import AutoModelForCausalLM

    model_id, is_default = resolve_model(model)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'.")
    # quantization (moe_inspect.model.quantize): QuantOptions, or built from the two legacy flags
    quant = quant or QuantOptions.from_flags(load_in_4bit, load_in_8bit)
    _check_source(model_id)
    resolved_device = resolve_device(device)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": DTYPES[dtype]}
    quantization = quant.label
    prequantized = checkpoint_quantization(model_id, quant, revision, trust_remote_code)
    if quant.enabled:
        compute = DTYPES[dtype] if isinstance(DTYPES[dtype], torch.dtype) else torch.bfloat16
        try:
            kwargs["quantization_config"] = quantization_config(model_id, quant, revision, trust_remote_code, compute)
        except (OSError, ValueError, KeyError) as exc:
            raise _load_error(model_id, exc) from exc
    if device_map:
        kwargs["device_map"] = device_map
    elif resolved_device != "cpu" or quantization:
        kwargs["device_map"] = {"": resolved_device}
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise _load_error(model_id, exc) from exc
    if tokenizer is None:
        tokenizer = load_tokenizer(model_id, revision, trust_remote_code)
    hf_model.eval()
    hf_model.requires_grad_(False)
    loaded = LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        routers=[],
        model_id=model_id,
        revision=revision,
        dtype=str(next(hf_model.parameters()).dtype).removeprefix("torch."),
        device=device_map or resolved_device,
        quantization=quantization,
        is_default=is_default,
    )
    loaded.routers = _routers_for(hf_model, loaded.input_device, trust_remote_code)
    try:
        probe_routers(hf_model, loaded.routers, loaded.input_device)
    except RuntimeError as exc:
        raise quantized_forward_error(quant, exc) from exc
    if quantization:
        loaded.notes.append(quantization_report(hf_model, loaded.routers, quantization))
    if prequantized:
        loaded.notes.append(prequantized_note(prequantized, hf_model))
    return loaded


def _routers_for(model: nn.Module, input_device: torch.device, trust_remote_code: bool) -> list[RouterSpec]:
    try:
        return find_routers(model)
    except NotMoEError:
        from transformers import CONFIG_MAPPING

        model_type = getattr(model.config, "model_type", "")
        if not trust_remote_code or model_type in CONFIG_MAPPING:
            raise
    return find_routers_heuristic(model, torch.tensor([[1, 2]], device=input_device))
