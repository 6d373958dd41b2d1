"""A tiny random Aria checkpoint saved WITH its real processor, and small generated images, for image routing tests.

Aria (``AriaForConditionalGeneration``, rhymes-ai/Aria) is the vision-language MoE whose processor transformers 5.24
builds without torchvision (its image processor has a Pillow backend; Qwen3-VL's video processor and Pixtral's
processor need torchvision, which this environment does not have). The processor is the real ``AriaProcessor``:
``AriaImageProcessorPil`` (images scaled to 490 x 490, 14-pixel patches: 35 x 35 = 1225 patches, which Aria's
projector turns into 128 query tokens) plus the tiny tokenizer with Aria's ``<|img|>`` placeholder added and a
chat template, saved into the checkpoint folder, so moe-inspect loads it back with ``AutoProcessor`` like a user's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tiny_models import _randomize_routing, train_tiny_tokenizer
from tiny_seq2seq_vl import generic_vl_config
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

IMAGE_TOKEN = "<|img|>"
IMAGE_SIZE = 490  # one of Aria's two sizes (490 -> 128 tokens per image, 980 -> 256)
PATCH = 14
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<|img|>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
)


def image_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny BPE with Aria's image placeholder as a special token (``tokenizer.image_token`` names it)."""
    base = train_tiny_tokenizer()
    base.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def aria_config(tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """tiny_seq2seq_vl's generic Aria config, sized for the real processor's 490-pixel images."""
    config = generic_vl_config("aria")
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.max_position_embeddings = 2048  # two images of 256 tokens and a prompt
    config.image_token_index = tokenizer.image_token_id
    config.vision_config.image_size = IMAGE_SIZE
    config.vision_config.patch_size = PATCH
    return config


def processor(tokenizer: PreTrainedTokenizerFast, chat_template: str | None = CHAT_TEMPLATE):
    from transformers import AriaProcessor
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

    return AriaProcessor(
        image_processor=AriaImageProcessorPil(max_image_size=IMAGE_SIZE), tokenizer=tokenizer,
        chat_template=chat_template,
    )


def build(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    from transformers import AriaForConditionalGeneration

    tokenizer = image_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AriaForConditionalGeneration(aria_config(tokenizer))
    generator = torch.Generator().manual_seed(seed)
    _randomize_routing(model, generator)
    with torch.no_grad():  # at init scale (0.02) every query attends alike: all image tokens would route the same
        for param in model.model.multi_modal_projector.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5, generator=generator)
    return model.eval(), tokenizer


def save(path: Path, with_processor: bool = True, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Model, tokenizer and (unless ``with_processor`` is False) the processor, saved as one checkpoint folder."""
    model, tokenizer = build()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if with_processor:
        processor(tokenizer, chat_template).save_pretrained(path)
    return path


def gradient(size: int = 64, seed: int = 0):
    """A size x size RGB gradient (red down, green across, blue from ``seed``): a real, tiny picture."""
    from PIL import Image

    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[:, None]
    pixels[..., 1] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
    pixels[..., 2] = (seed * 67) % 256
    return Image.fromarray(pixels)


def image_folder(path: Path, count: int = 3) -> Path:
    """``count`` gradients saved as PNG/JPEG files (sorted names), plus a text file the folder listing must skip."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        gradient(seed=i).save(path / f"img{i}.{'png' if i % 2 == 0 else 'jpg'}")
    (path / "notes.txt").write_text("not an image\n", encoding="utf-8")
    return path
