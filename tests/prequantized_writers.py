"""Tiny checkpoints in the pre-quantized formats people download, written here from a tiny bf16 model.

FP8 (DeepSeek-V3 / Qwen3-*-FP8 "fine-grained" fp8): per-expert layout, every linear weight in float8_e4m3fn with a
float32 ``weight_scale_inv`` per 128 × 128 block, router gate, embeddings and LM head left in bf16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
BLOCK = 128


def _fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    scales = torch.empty(math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    w = weight.float()
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]  # one 128 × 128 scale block
            scale = block.abs().max().clamp(min=1e-12) / FP8_MAX
            scales[i, j] = scale
            rows_, cols_ = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
            quantized[rows_, cols_] = (block / scale).to(torch.float8_e4m3fn)
    return quantized, scales


def write_fp8(bf16_dir: Path, out: Path) -> Path:
    """``bf16_dir`` (a fused-layout Qwen3-MoE/Mixtral/DeepSeek-V3 save) rewritten as a fine-grained FP8 checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(bf16_dir / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}

    def put(name: str, weight: torch.Tensor) -> None:
        q, s = _fp8_blocks(weight)
        tensors[name] = q
        tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = s

    for name, value in state.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            half = value.shape[1] // 2
            for j in range(value.shape[0]):
                put(f"{prefix}{j}.gate_proj.weight", value[j, :half])
                put(f"{prefix}{j}.up_proj.weight", value[j, half:])
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for j in range(value.shape[0]):
                put(f"{prefix}{j}.down_proj.weight", value[j])
        elif name.endswith("_proj.weight") and value.dim() == 2:
            put(name, value)
        else:
            tensors[name] = value
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((bf16_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (bf16_dir / extra).exists():
            (out / extra).write_bytes((bf16_dir / extra).read_bytes())
    return out


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, cols, rows] (GPT-OSS layout) -> blocks [E, rows, cols/32, 16] uint8 and scales [E, rows, cols/32] (e8m0)."""
    w = weight.float().transpose(1, 2)  # [E, rows, cols]: 32-value groups run along the input dimension
    experts, rows, cols = w.shape
    groups = w.reshape(experts, rows, cols // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    index = (scaled[..., None] - FP4_VALUES).abs().argmin(-1).to(torch.uint8)  # nearest FP4 value
    blocks = index[..., 0::2] | (index[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def write_mxfp4(bf16_dir: Path, out: Path) -> Path:
    """A GPT-OSS bf16 save rewritten the way openai/gpt-oss ships: MXFP4 expert blocks and scales, the rest bf16."""
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(bf16_dir / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = _mxfp4(value)
        else:
            tensors[name] = value
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((bf16_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (bf16_dir / extra).exists():
            (out / extra).write_bytes((bf16_dir / extra).read_bytes())
    return out


def write_compressed_tensors(bf16_dir: Path, out: Path) -> Path:
    """A bf16 save rewritten as a compressed-tensors "float-quantized" checkpoint (llm-compressor's FP8 W8 scheme):
    every ``nn.Linear`` weight in float8_e4m3fn with a per-output-channel ``weight_scale``; the router gate and the
    LM head ignored. Fused experts are not ``nn.Linear``, so they stay bf16, as llm-compressor leaves them."""
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(bf16_dir / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith("_proj.weight") and value.dim() == 2 and not name.endswith("mlp.gate.weight"):
            scale = value.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
            tensors[name] = (value.float() / scale).to(torch.float8_e4m3fn)
            tensors[name.removesuffix("weight") + "weight_scale"] = scale.to(torch.bfloat16)
        else:
            tensors[name] = value
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((bf16_dir / "config.json").read_text())
    weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head", "re:.*mlp.gate$"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (bf16_dir / extra).exists():
            (out / extra).write_bytes((bf16_dir / extra).read_bytes())
    return out
