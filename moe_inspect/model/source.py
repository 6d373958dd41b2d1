"""From a model string to a config, a tokenizer and a processor: the one place that resolves, checks and words errors.

A model string is a Hub id, a local model folder or (for ``info``) a config JSON file; no string means
$MOE_INSPECT_MODEL, else the demo model shipped with the package. Every failure the user can fix becomes a
``UserError`` with one sentence, written here once for the loader, ``info`` and the tokenizer alike.
Weights are never read here (that is ``loading``).
"""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from moe_inspect.errors import UserError

DEMO_MODEL_ENV = "MOE_INSPECT_MODEL"
_POSITION_ATTRS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length")


def demo_model_path() -> Path:
    """The shipped demo model: inside the installed package, or in the source tree's fixtures/."""
    package = Path(__file__).resolve().parent.parent  # moe_inspect/
    packaged = package / "demo_model"
    if (packaged / "config.json").is_file():
        return packaged
    return package.parent / "fixtures" / "demo-model"


def resolve_model(model: str | None) -> tuple[str, bool]:
    """(model id or path, is_default): the given string, then $MOE_INSPECT_MODEL, then the shipped demo model."""
    if model:
        return model, False
    env = os.environ.get(DEMO_MODEL_ENV)
    if env:
        return env, False
    path = demo_model_path()
    if not (path / "config.json").is_file():
        raise UserError(f"No model was given and the shipped demo model is missing from {path}.")
    return str(path), True


def looks_like_path(model: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else that does not exist is a mistyped path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model or model.endswith(".json")


def hub_offline() -> bool:
    """Whether huggingface_hub will refuse network access (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def first_line(exc: BaseException) -> str:
    """The gist of an exception; validation errors put the reason on the line after 'field x:'."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text.rstrip(".")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub ($HF_ENDPOINT) opens within ``timeout`` seconds (asked once)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _check_hub(model: str, revision: str | None) -> None:
    """A Hub id with no network: refuse at once if it is not cached, else read the cache without retries.

    Without this, huggingface_hub retries five times (about 30 s) and transformers ends in its own words.
    """
    if hub_offline() or hub_reachable():
        return
    import huggingface_hub.constants
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str):
        raise UserError(
            f"'{model}' is not in the local Hugging Face cache and the Hub cannot be reached; connect to the "
            "network, or set HF_HUB_OFFLINE=1 to skip the wait when the model is cached."
        )
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # cached: use it now rather than after the retries
    os.environ["HF_HUB_OFFLINE"] = "1"


def check_source(model: str, config_file_ok: bool = False, revision: str | None = None) -> Path | None:
    """The config.json to read for a local model (None for a Hub id); refuses paths that cannot be a model.

    ``config_file_ok``: a path to a config JSON file itself is accepted (``info`` reads configs alone).
    A Hub id is checked against the cache when the Hub cannot be reached.
    """
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(f"'{model}' has no config.json, so it is not a transformers model folder.")
            return path / "config.json"
        if config_file_ok:
            return path
        raise UserError(f"'{model}' is a file; pass the model's folder (with config.json) instead.")
    if looks_like_path(model):
        raise UserError(f"No such file or folder: '{model}'." if config_file_ok else f"No model folder at '{model}'.")
    _check_hub(model, revision)
    return None


def loader_error(model: str, exc: BaseException, what: str = "load") -> UserError:
    """One sentence for an exception transformers or huggingface_hub raised while reading ``model``."""
    text = str(exc)
    if "does not recognize this architecture" in text or "trust_remote_code" in text:
        return UserError(
            f"transformers does not know the model type of '{model}'; if the model ships its own code, "
            "retry with `trust_remote_code=True`."
        )
    if hub_offline() and not Path(model).expanduser().exists():
        return UserError(
            f"'{model}' is not in the local Hugging Face cache and the machine is offline (HF_HUB_OFFLINE is set)."
        )
    return UserError(f"Could not {what} '{model}': {first_line(exc)}.")


def _read_json(path: Path) -> dict[str, Any]:
    """Parse the config ourselves so a broken file gets a precise sentence, not a transformers traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not a UTF-8 text file, so it cannot be a config.json.") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"'{path}' is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None
    except OSError as exc:
        raise UserError(f"Cannot read '{path}': {exc.strerror or exc}.") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' holds a JSON {type(data).__name__}, not the object a config.json holds.")
    return data


def _check_model_type(data: dict[str, Any], path: Path, trust_remote_code: bool) -> None:
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not model_type:
        raise UserError(f"'{path}' has no model_type, so transformers cannot tell which architecture it describes.")
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in data):
        import transformers

        known = f"transformers {transformers.__version__} does not know model type '{model_type}'"
        if trust_remote_code:
            raise UserError(f"{known} and the config names no code of its own (auto_map).")
        raise UserError(f"{known}; if the model ships its own code, retry with `trust_remote_code=True`.")


def load_config(
    model: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    token: str | bool | None = None,
) -> Any:
    """A ``PretrainedConfig`` from a Hub id, a model folder or a path to a config JSON file; never weights."""
    from transformers import AutoConfig

    config_file = check_source(model, config_file_ok=True, revision=revision)
    if config_file is not None:
        data = _read_json(config_file)
        _check_model_type(data, config_file, trust_remote_code)
        source = str(config_file.parent) if config_file.name == "config.json" else str(config_file)
        try:
            return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception as exc:  # the user's file: any failure to parse it is theirs to fix
            if "trust_remote_code" in str(exc):
                raise loader_error(model, exc) from None
            raise UserError(f"'{model}' is not a valid {data['model_type']} config: {first_line(exc)}.") from None
    try:
        return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code, token=token)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        raise loader_error(model, exc, "read the config of") from None


def text_config(config: Any) -> Any:
    """The decoder's own config: multimodal configs nest it (``text_config``); others are their own."""
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter()
        except Exception:  # per-layer configs can refuse global attributes; fall through
            pass
    nested = getattr(config, "text_config", None)
    return nested if nested is not None else config


def positions_limit(config: Any) -> int | None:
    """The context length a config states (max_position_embeddings and kin), if any."""
    text = text_config(config)
    for name in _POSITION_ATTRS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_seq_len(seq_len: int | None, limit: int | None) -> int:
    """The window length to use: min(2048, limit) by default; refuses one past the model's maximum positions."""
    if seq_len is None:
        return min(2048, limit or 2048)
    if limit is not None and seq_len > limit:
        raise UserError(
            f"A `seq_len` of {seq_len:,} is past the model's maximum positions ({limit:,}); pass at most {limit:,}."
        )
    return seq_len


def check_prompt_length(prompt_tokens: int, generate: int, limit: int | None) -> None:
    """Refuse (rather than truncate) a prompt, plus the tokens to generate, longer than the model's positions."""
    if limit is None or prompt_tokens + generate <= limit:
        return
    extra = f" plus {generate:,} to generate" if generate else ""
    raise UserError(
        f"The prompt has {prompt_tokens:,} tokens{extra}, more than the model's maximum positions ({limit:,}); "
        "shorten it."
    )


def max_positions(model_id: str, revision: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The model's maximum positions, read from its config alone (before any weight loads)."""
    return positions_limit(load_config(model_id, revision, trust_remote_code))


def load_tokenizer(model_id: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer alone (fast), so corpus checks can run before the weights load."""
    from transformers import AutoTokenizer

    check_source(model_id, revision=revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise loader_error(model_id, exc) from exc
    if tokenizer.pad_token is None:
        # Pads are masked out everywhere, so any existing token will do; a new one would be out of vocabulary.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


# The files a checkpoint's processor is saved in (processor_config.json since transformers 4.5x; older ones only
# have the image processor's preprocessor_config.json).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _processor_file(model_id: str, revision: str | None) -> str | None:
    """The processor file a local folder or the Hub cache holds, if any (never asks the network)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return next((name for name in PROCESSOR_FILES if (path / name).is_file()), None)
    from huggingface_hub import try_to_load_from_cache

    for name in PROCESSOR_FILES:
        if isinstance(try_to_load_from_cache(model_id, name, revision=revision), str):
            return name
    return None


def load_processor(model_id: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The checkpoint's own processor (image processor + tokenizer), refused in one sentence when it is not there.

    Images only reach a vision-language model through the processor that ships with it: it resizes them and
    expands each image placeholder into as many tokens as the vision tower makes, so nothing else can stand in.
    """
    from transformers import AutoProcessor

    check_source(model_id, revision=revision)
    if _processor_file(model_id, revision) is None and (hub_offline() or Path(model_id).expanduser().is_dir()):
        raise UserError(
            f"'{model_id}' ships no processor (no {' or '.join(PROCESSOR_FILES)}), so images cannot be "
            "prepared for it offline."
        )
    try:
        processor = AutoProcessor.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError, TypeError, AttributeError) as exc:
        raise UserError(f"Could not load the processor of '{model_id}': {first_line(exc)}.") from None
    if getattr(processor, "image_processor", None) is None:
        raise UserError(f"The processor of '{model_id}' has no image processor, so it cannot prepare images.")
    return processor


def check_takes_images(config: Any, model_id: str) -> None:
    """Refuse images for a checkpoint that has no vision input, before its processor or weights load."""
    from moe_inspect.model.families import facts_for, modality_token_ids

    kind = model_kind(config)
    if kind == SEQ2SEQ:
        raise UserError(f"'{model_id}' is an encoder-decoder text model; it takes no images.")
    if kind != IMAGE_TEXT or "image" not in modality_token_ids(config):
        model_type = getattr(config, "model_type", "unknown")
        raise UserError(f"'{model_id}' is a text-only model ({model_type}); it takes no images.")
    if facts_for(str(getattr(config, "model_type", ""))).text_router:
        raise UserError(
            f"'{model_id}' sends image tokens to a separate set of vision experts, which moe-inspect does not "
            "capture yet; route text prompts only."
        )


# What a checkpoint is decides which class loads it: the issue-17 rule, in one place.
CAUSAL, IMAGE_TEXT, SEQ2SEQ = "causal-lm", "image-text-to-text", "seq2seq"


def causal_lm_class_name(model_type: str) -> str | None:
    """The causal-LM class of a model type: its AutoModelForCausalLM entry, or a ``*ForCausalLM`` class that
    transformers files only under image-text-to-text (Mistral-4 in 5.24), which is a text model all the same."""
    from transformers.models.auto import modeling_auto

    name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        name = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
        return name if isinstance(name, str) and name.endswith("ForCausalLM") else None
    return name


def model_kind(config: Any) -> str:
    """Which kind of model a config describes: causal LM, image-text-to-text (vision-language) or seq2seq.

    A type transformers can load as a causal LM stays one (Llama-4 checkpoints load their text model that
    way); vision-language types without a causal-LM class load whole; encoder-decoders load as seq2seq.
    """
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        return SEQ2SEQ
    if causal_lm_class_name(model_type):
        return CAUSAL
    if model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return IMAGE_TEXT
    return CAUSAL


def model_class(config: Any) -> Any:
    """The transformers class that loads this config: the auto class of its kind, else the class the
    checkpoint names in ``architectures`` (NLLB-MoE has no auto mapping in transformers)."""
    import transformers
    from transformers.models.auto import modeling_auto

    kind = model_kind(config)
    auto_classes = {
        CAUSAL: (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM"),
        IMAGE_TEXT: (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "AutoModelForImageTextToText"),
        SEQ2SEQ: (modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "AutoModelForSeq2SeqLM"),
    }
    mapping, auto_name = auto_classes[kind]
    auto = getattr(transformers, auto_name)
    model_type = getattr(config, "model_type", "")
    if model_type in mapping or getattr(config, "auto_map", None):
        return auto
    if kind == CAUSAL and causal_lm_class_name(model_type):
        return getattr(transformers, causal_lm_class_name(model_type))
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and str(name).endswith(("ForConditionalGeneration", "ForCausalLM")):
            return cls
    multimodal = modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES.get(model_type)  # Qwen3-Omni's whole class
    return getattr(transformers, multimodal, auto) if isinstance(multimodal, str) else auto


def skeleton_model(config: Any, trust_remote_code: bool = False) -> Any:
    """The model a config describes, built by the class that loads it (call under a meta device)."""
    cls = model_class(config)
    if hasattr(cls, "from_config"):
        return cls.from_config(config, trust_remote_code=trust_remote_code)
    return cls(config)
