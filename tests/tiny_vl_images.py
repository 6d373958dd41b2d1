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


def image_tokenizer(token: str = IMAGE_TOKEN) -> PreTrainedTokenizerFast:
    """The tiny BPE with an image placeholder (Aria's by default) as a special token (``tokenizer.image_token``).

    A copy: the shared tiny tokenizer is cached, and every model built after would otherwise grow its vocabulary.
    """
    import copy

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(train_tiny_tokenizer().backend_tokenizer), pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", unk_token="<unk>", extra_special_tokens={"image_token": token},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [token]})
    return tokenizer


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


# ------------------------------------------------------------------ Qwen3-VL-MoE without its real processor

QWEN_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


class QwenImageStandIn:
    """Qwen3VLProcessor's image path alone: its real Qwen2-VL image processor (Pillow backend) and its expansion of
    each <|image_pad|> into image_grid_thw.prod() // merge_size**2 tokens. The real processor cannot be built here
    (its video processor needs torchvision), so this checks the model side (multimodal RoPE over padded batches),
    not the processor."""

    chat_template = None
    image_token, vision_start_token, vision_end_token = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # pads before the image: the mask and 3-D positions must handle them
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
        )

    def __call__(self, text: list[str], images: list[list], padding: bool = True, return_tensors: str = "pt") -> dict:
        flat = [image for per_text in images for image in per_text]
        pixels = self.image_processor(images=flat, return_tensors=return_tensors)
        counts = iter((pixels["image_grid_thw"].prod(-1) // 4).tolist())
        expanded = []
        for t in text:
            while self.image_token in t:
                t = t.replace(self.image_token, "\0" * next(counts), 1)
            expanded.append(t.replace("\0", self.image_token))
        encoded = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        types = (encoded["input_ids"] == image_id).int()  # what the real processor returns: 1 image, 2 video
        return {**encoded, **pixels, "mm_token_type_ids": types}


def save_qwen3_vl(path: Path) -> tuple[Path, QwenImageStandIn]:
    """tiny_seq2seq_vl's Qwen3-VL-MoE with Qwen's image tokens added to the tokenizer (ids in the config)."""
    import transformers
    from tiny_seq2seq_vl import vl_config

    tokenizer = train_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_TOKENS)})
    config = vl_config()
    config.text_config.vocab_size = len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(list(QWEN_TOKENS))
    config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id = ids
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Qwen3VLMoeForConditionalGeneration(config)
    _randomize_routing(model.eval(), torch.Generator().manual_seed(0))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, QwenImageStandIn(tokenizer)


def save_deepseek_ocr2(path: Path) -> Path:
    """A tiny DeepSeek-OCR-2 saved with its real processor, whose image processor has a Pillow backend.

    Global view only (``crop_to_patches=False``): the 1024-pixel image, 16-pixel SAM patches, 4x downsampling,
    16 x 16 = 256 query tokens plus one separator, the counts the model's own query table is made for.
    """
    from transformers import DeepseekOcr2ForConditionalGeneration, DeepseekOcr2Processor
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

    tokenizer = image_tokenizer("<image>")
    config = generic_vl_config("deepseek_ocr2")
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id = tokenizer.image_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DeepseekOcr2ForConditionalGeneration(config)
    _randomize_routing(model, torch.Generator().manual_seed(0))
    path.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor = DeepseekOcr2ImageProcessorPil(crop_to_patches=False)
    DeepseekOcr2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
