"""The Python API for notebooks; the CLI is a thin layer over it.

    insp = moe_inspect.load("mistralai/Mixtral-8x7B-v0.1", dtype="bfloat16")
    df = insp.route("def add(a, b): return a + b")   # same columns as `route --csv`
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from moe_inspect.balance import DEFAULT_CAPACITY_FACTORS, BalanceReport, Progress, run_balance
from moe_inspect.capture import capture
from moe_inspect.corpus import CorpusFile, CorpusReader, check_files
from moe_inspect.errors import UserError
from moe_inspect.loading import LoadedModel
from moe_inspect.loading import load as load_model
from moe_inspect.options import LoadOptions
from moe_inspect.source import IMAGE_TEXT, check_prompt_length, check_seq_len, positions_limit
from moe_inspect.tables import route_frame, routers_frame
from moe_inspect.tokens import token_bytes
from moe_inspect.units import layer_ranges


class Inspector:
    """A loaded MoE model with its routers hooked on demand."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def routers(self) -> pd.DataFrame:
        """One row per hooked router (schema ``schemas.ROUTERS``)."""
        return routers_frame(self.loaded.routers)

    def default_seq_len(self) -> int:
        """min(2048, the model's maximum positions)."""
        return check_seq_len(None, positions_limit(self.model.config))

    def corpus(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        files: Sequence[str | Path] | None = None,
        seq_len: int | None = None,
        batch_size: int = 4,
        lines: bool = False,
        max_tokens: int | None = None,
        pack: bool = False,
    ) -> CorpusReader:
        """A reader over in-memory ``texts`` and/or validated ``files``.

        Texts are documents: each is routed as its own sequence(s), padded in batches, unless ``pack`` asks
        for them to be packed into full windows like files are (short texts then may not fill one).
        """
        sources: list[CorpusFile] = []
        if isinstance(texts, str):
            texts = [texts]
        sources += [CorpusFile.from_text(t, f"<text {i}>") for i, t in enumerate(texts or [])]
        sources += check_files([str(f) for f in files or []]) if files else []
        if not sources:
            raise UserError("Give texts or files to measure.")
        documents = bool(texts) and not pack and not lines
        return CorpusReader(
            sources, self.tokenizer, check_seq_len(seq_len, positions_limit(self.model.config)), batch_size, lines,
            max_tokens, documents,
        )

    def balance(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        capacity_factors: Sequence[float] = DEFAULT_CAPACITY_FACTORS,
        reader: CorpusReader | None = None,
        progress: Progress | None = None,
        **corpus_options: Any,
    ) -> BalanceReport:
        """Expert load, entropy, balance and what-if figures over a corpus (tables of ``schemas``).

        ``corpus_options`` are those of ``corpus`` (files, seq_len, batch_size, lines, max_tokens, pack): a
        list of texts is a list of documents; ``pack=True`` packs them into full windows.
        """
        if self.loaded.is_seq2seq:
            raise UserError("Corpus balance of encoder-decoder models is not supported yet; route sentences instead.")
        if reader is None:
            reader = self.corpus(texts, **corpus_options)
            reader.check_long_enough()
        info = {
            "seq_len": reader.seq_len,
            "batch_size": reader.batch_size,
            "mode": reader.mode,
            "max_tokens": reader.max_tokens,
        }
        report = run_balance(self.loaded, reader.batches(), tuple(capacity_factors), progress, info)
        report.run["corpus"] = [f.describe() for f in reader.files]  # after the run: stdin is hashed as read
        if reader.mode != "lines":
            report.run["unrouted_tail_tokens"] = reader.unrouted_tail_tokens
        return report

    def _check_layers(self, layers: Iterable[int]) -> set[int]:
        """The selection, refused when empty or when it names a layer with no router."""
        selected = set(layers)
        known = {spec.layer for spec in self.loaded.routers}
        unknown = selected - known
        if not selected or unknown:
            what = "selects no layer" if not selected else f"names layer(s) {layer_ranges(unknown)} with no router"
            raise UserError(f"`layers` {what}; this model's MoE layers are {layer_ranges(known)}.")
        return selected

    def _token_strings(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    def route(
        self,
        text: str,
        *,
        generate: int = 0,
        temperature: float = 0.0,
        seed: int | None = None,
        layers: Iterable[int] | None = None,
        target: str | None = None,
    ) -> pd.DataFrame:
        """Per-token routing of ``text`` (and of ``generate`` new tokens), schema ``schemas.ROUTE``.

        ``frame.attrs`` holds ``text``, ``generated_text`` and ``prompt_tokens``. Encoder-decoders route ``text``
        through the encoder and ``target`` (default: the decoder's start token) through the decoder.
        """
        selected = self._check_layers(layers) if layers is not None else None
        if self.loaded.is_seq2seq:
            return self._route_seq2seq(text, target, generate, seed, selected)
        if target is not None:
            raise UserError("A `target` is only for encoder-decoder models; this one is decoder-only.")
        encoded = self.tokenizer(text, return_tensors="pt")
        input_ids = encoded["input_ids"].to(self.loaded.input_device)
        if input_ids.shape[1] == 0:
            raise UserError("The prompt tokenized to zero tokens.")
        prompt_len = int(input_ids.shape[1])
        check_prompt_length(prompt_len, generate, positions_limit(self.model.config))
        with torch.inference_mode(), capture(self.loaded.routers) as cap:
            if generate > 0:
                ids = self._generate(input_ids, generate, temperature, seed)
            else:
                self.model(**self.loaded.forward_inputs(input_ids))
                ids = input_ids[0]
        token_ids = ids.tolist()
        phases = ["prefill"] * prompt_len + ["decode"] * (len(token_ids) - prompt_len)
        strings = self._token_strings(token_ids)
        raw = token_bytes(self.tokenizer, token_ids, strings)
        frame = route_frame(self.loaded.routers, cap.calls, token_ids, strings, phases, raw)
        if selected is not None:
            frame = frame[frame["layer"].isin(selected)].reset_index(drop=True)
        frame.attrs.update(
            text=text,
            prompt_tokens=prompt_len,
            generated_text=self.tokenizer.decode(token_ids[prompt_len:]) if generate else "",
        )
        return frame

    def _route_seq2seq(
        self, text: str, target: str | None, generate: int, seed: int | None, selected: set[int] | None
    ) -> pd.DataFrame:
        from moe_inspect.model.encoder_decoder import route_encoder_decoder

        if generate:
            raise UserError("Generating with an encoder-decoder model is not supported yet; give a `target` prefix.")
        frame = route_encoder_decoder(self.loaded, text, target, seed)
        if selected is not None:
            frame = frame[frame["layer"].isin(selected)].reset_index(drop=True)
        return frame

    def _generate(self, input_ids: torch.Tensor, new_tokens: int, temperature: float, seed: int | None) -> torch.Tensor:
        """Generate, then feed the last new token once more so every generated token has routing rows."""
        if seed is not None:
            torch.manual_seed(seed)
        sample = temperature > 0
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_k=None,
            top_p=None,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        sequence = out.sequences
        if sequence.shape[1] > input_ids.shape[1]:
            # transformers >= 5.2x names the KV cache `cache` (the old name warns with a site-packages path)
            new_name = "cache" in getattr(out, "__dataclass_fields__", {})
            cache = {"cache": out.cache} if new_name else {"past_key_values": out.past_key_values}
            # Multimodal models derive 3-D RoPE positions from the mask; one unpadded sequence needs none.
            mask = {} if self.loaded.kind == IMAGE_TEXT else {"attention_mask": torch.ones_like(sequence)}
            self.model(input_ids=sequence[:, -1:], use_cache=True, **mask, **cache)
        return sequence[0]


def load(model: str | LoadOptions | None = None, *, tokenizer: Any = None, **fields: Any) -> Inspector:
    """Load a Hub id or local folder (default: the shipped demo model) and return an Inspector.

    ``fields`` are those of ``LoadOptions`` (dtype, device, revision, trust_remote_code, device_map,
    load_in_4bit, load_in_8bit); or pass one ``LoadOptions`` as ``model``.
    """
    if isinstance(model, LoadOptions):
        options = replace(model, **fields) if fields else model
    else:
        unknown = sorted(set(fields) - set(LoadOptions.field_names()))
        if unknown:
            raise TypeError(f"load() got unexpected keyword argument(s): {', '.join(unknown)}")
        options = LoadOptions(model=model, **fields)
    return Inspector(load_model(options, tokenizer=tokenizer))
