"""What ``route --generate`` hands to transformers' ``generate`` and reads back, for decoder-only and
encoder-decoder models alike."""

from __future__ import annotations

from typing import Any


def sampling_options(temperature: float, pad_token_id: int | None) -> dict[str, Any]:
    """Greedy at temperature 0, else plain sampling at ``temperature``: the checkpoint's own top-k/top-p defaults
    are switched off so that a temperature means the same on every model."""
    sample = temperature > 0
    return {
        "do_sample": sample,
        "temperature": temperature if sample else None,
        "top_k": None,
        "top_p": None,
        "return_dict_in_generate": True,
        "pad_token_id": pad_token_id,
    }


def kv_cache(out: Any) -> dict[str, Any]:
    """The KV cache ``generate`` returned, under the keyword this transformers takes it by (>= 5.2x names it
    ``cache``; the old name warns with a site-packages path)."""
    if "cache" in getattr(out, "__dataclass_fields__", {}):
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}
