"""Load a model's weights (optionally quantized) and its router map; ``source`` resolves and checks the name.

Hub ids work for real users (HF_HUB_OFFLINE and the usual HF_TOKEN variables are honoured by
huggingface_hub itself); tests load tiny models saved to a folder through this same path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from moe_inspect.errors import NotMoEError, UserError
from moe_inspect.model.capture import capture
from moe_inspect.model.families import capacity_notes, check_supported, checkpoint_part
from moe_inspect.model.footprint import measure_footprint, quantization_report
from moe_inspect.model.heuristic_routers import find_routers_heuristic
from moe_inspect.model.options import DTYPE_NAMES, LoadOptions
from moe_inspect.model.prequantized import checkpoint_quantization, prequantized_note
from moe_inspect.model.quantize import QuantOptions, no_grad_context, quantization_config, quantized_forward_error
from moe_inspect.model.routers import RouterSpec, find_routers
from moe_inspect.model.source import (
    IMAGE_TEXT,
    SEQ2SEQ,
    check_source,
    load_config,
    load_tokenizer,
    loader_error,
    model_class,
    model_kind,
    resolve_model,
)

DTYPES: dict[str, torch.dtype | str] = {name: name if name == "auto" else getattr(torch, name) for name in DTYPE_NAMES}


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
    kind: str = "causal-lm"  # source.model_kind: causal-lm, image-text-to-text or seq2seq

    @property
    def is_seq2seq(self) -> bool:
        return self.kind == SEQ2SEQ

    def forward_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs for routing ``input_ids``: an encoder-decoder also needs its decoder's start token."""
        if not self.is_seq2seq:
            return {"input_ids": input_ids}
        start = decoder_start_id(self.model.config)
        decoder = torch.full((input_ids.shape[0], 1), start, dtype=input_ids.dtype, device=input_ids.device)
        return {"input_ids": input_ids, "decoder_input_ids": decoder}

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


def decoder_start_id(config: Any) -> int:
    """The token an encoder-decoder's decoder starts from (T5-style models start from the pad token)."""
    for name in ("decoder_start_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def routed_part(model: nn.Module, routers: list[RouterSpec], kind: str) -> str | None:
    """Which part of a multimodal or encoder-decoder checkpoint the routers sit in, for the status line."""
    if kind == SEQ2SEQ:
        stacks = [stack for stack in ("encoder", "decoder") if any(spec.stack == stack for spec in routers)]
        return f"routing the {' and '.join(stacks)} stack{'s' if len(stacks) > 1 else ''}"
    if kind != IMAGE_TEXT:
        return None
    prefixes = sorted({spec.path.split(".layers.")[0] for spec in routers})
    towers = [name for name, _ in model.named_children()] + [
        f"model.{name}" for name, _ in getattr(model, "model", nn.Module()).named_children()
    ]
    notes = [f"text and image tokens route through the language model ({', '.join(prefixes)})"]
    for tower in (t for t in towers if t not in prefixes):
        if "audio" in tower:
            notes.append(f"{tower} is loaded but not run (moe-inspect routes no audio inputs)")
        elif "visual" in tower or "vision" in tower:
            notes.append(f"{tower} runs only when images are given")
    return "; ".join(notes)


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available, else cpu; validates explicit choices."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"Device {device} was asked for but no CUDA device is available.")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise UserError(f"Device {device} does not exist: {torch.cuda.device_count()} CUDA device(s) found.")
        return device
    raise UserError(f"The `device` must be auto, cpu, cuda or cuda:N, not '{device}'.")


def probe_routers(
    model: nn.Module,
    routers: list[RouterSpec],
    input_device: torch.device,
    inputs: dict[str, torch.Tensor] | None = None,
) -> None:
    """Run one short forward and take E and k from what each router actually returned.

    Config keys lie in places (PhiMoE ignores num_experts_per_tok; HunYuan has per-layer lists), the
    router's own output does not.
    """
    inputs = inputs or {"input_ids": torch.tensor([[1, 2]], device=input_device)}
    with no_grad_context(model), capture(routers) as cap:
        model(**inputs)
    for spec, calls in zip(routers, cap.calls, strict=True):
        if not calls:
            continue
        out = calls[0]
        spec.top_k = int(out.experts.shape[-1])
        if spec.scoring != "product_key":
            spec.num_experts = int(out.logits.shape[-1]) - spec.null_experts


def load(options: LoadOptions, tokenizer: Any = None) -> LoadedModel:
    """Load model + tokenizer + routers; every user-caused failure is a UserError with one sentence.

    The class is chosen by what the checkpoint is (``source.model_class``): causal LM, vision-language or
    encoder-decoder; the whole checkpoint loads, and text prompts run through its language model.
    """
    model_id, is_default = resolve_model(options.model)
    if options.dtype not in DTYPES:
        raise UserError(f"The `dtype` must be one of {', '.join(DTYPES)}, not '{options.dtype}'.")
    quant = QuantOptions.from_load_options(options)
    check_source(model_id, revision=options.revision)
    resolved_device = resolve_device(options.device)
    kwargs: dict[str, Any] = {
        "revision": options.revision, "trust_remote_code": options.trust_remote_code, "dtype": DTYPES[options.dtype]
    }
    quantization = quant.label
    prequantized = checkpoint_quantization(model_id, quant, options.revision, options.trust_remote_code)
    if quant.enabled:
        compute = DTYPES[options.dtype] if isinstance(DTYPES[options.dtype], torch.dtype) else torch.bfloat16
        try:
            kwargs["quantization_config"] = quantization_config(
                model_id, quant, options.revision, options.trust_remote_code, compute
            )
        except (OSError, ValueError, KeyError) as exc:
            raise loader_error(model_id, exc) from exc
    if options.device_map:
        kwargs["device_map"] = options.device_map
    elif resolved_device != "cpu" or quantization:
        kwargs["device_map"] = {"": resolved_device}
    config = load_config(model_id, options.revision, options.trust_remote_code)
    check_supported(config)
    part = checkpoint_part(config)
    if part is not None:  # the part that reads the prompt, alone: transformers' weight conversion for its class
        config = getattr(config, part.config_key)  # strips the checkpoint's prefix (PrefixChange "thinker")
        kwargs["config"] = config
    try:
        hf_model = model_class(config).from_pretrained(model_id, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, SafetensorError) as exc:  # SafetensorError: corrupt weights
        raise loader_error(model_id, exc) from exc
    if tokenizer is None:
        tokenizer = load_tokenizer(model_id, options.revision, options.trust_remote_code)
    hf_model.eval()
    hf_model.requires_grad_(False)
    loaded = LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        routers=[],
        model_id=model_id,
        revision=options.revision,
        dtype=str(next(hf_model.parameters()).dtype).removeprefix("torch."),
        device=options.device_map or resolved_device,
        quantization=quantization,
        is_default=is_default,
        kind=model_kind(config),
    )
    loaded.routers = _routers_for(hf_model, loaded.input_device, options.trust_remote_code)
    probe = loaded.forward_inputs(torch.tensor([[1, 2]], device=loaded.input_device))
    try:
        probe_routers(hf_model, loaded.routers, loaded.input_device, probe)
    except RuntimeError as exc:
        raise quantized_forward_error(quant, exc) from exc
    routed = routed_part(hf_model, loaded.routers, loaded.kind)
    if routed:
        loaded.notes.append(routed[0].upper() + routed[1:] + ".")
    if part is not None:
        loaded.notes.append(f"Loaded the checkpoint's {part.attr} alone: {part.others}.")
    loaded.notes += capacity_notes(config)
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
