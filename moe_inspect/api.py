"""The Python API for notebooks; the CLI is a thin layer over it.

    insp = moe_inspect.load("mistralai/Mixtral-8x7B-v0.1", dtype="bfloat16")
    df = insp.route("def add(a, b): return a + b")   # same columns as `route --csv`
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from moe_inspect.balance import DEFAULT_CAPACITY_FACTORS, BalanceReport, Progress, run_balance
from moe_inspect.capture import capture
from moe_inspect.corpus import CorpusFile, CorpusReader, check_files
from moe_inspect.errors import UserError
from moe_inspect.loading import LoadedModel, load_tokenizer, resolve_model
from moe_inspect.loading import load as load_model
from moe_inspect.tables import route_frame, routers_frame

if TYPE_CHECKING:
    from moe_inspect.analysis.compare import CompareReport


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
        config = self.model.config
        config = getattr(config, "text_config", None) or config
        limit = getattr(config, "max_position_embeddings", None)
        return min(2048, limit) if isinstance(limit, int) and limit > 0 else 2048

    def corpus(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        files: Sequence[str | Path] | None = None,
        seq_len: int | None = None,
        batch_size: int = 4,
        lines: bool = False,
        max_tokens: int | None = None,
    ) -> CorpusReader:
        """A reader over in-memory ``texts`` (each its own stream) and/or validated ``files``."""
        sources: list[CorpusFile] = []
        if isinstance(texts, str):
            texts = [texts]
        sources += [CorpusFile.from_text(t, f"<text {i}>") for i, t in enumerate(texts or [])]
        sources += check_files([str(f) for f in files or []]) if files else []
        if not sources:
            raise UserError("Give texts or files to measure.")
        return CorpusReader(sources, self.tokenizer, seq_len or self.default_seq_len(), batch_size, lines, max_tokens)

    def balance(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        files: Sequence[str | Path] | None = None,
        seq_len: int | None = None,
        batch_size: int = 4,
        lines: bool = False,
        max_tokens: int | None = None,
        capacity_factors: Sequence[float] = DEFAULT_CAPACITY_FACTORS,
        reader: CorpusReader | None = None,
        progress: Progress | None = None,
        by_file: bool = False,
    ) -> BalanceReport:
        """Expert load, entropy, balance and what-if figures over a corpus (tables of ``schemas``).

        ``by_file`` measures each text/file on its own (``max_tokens`` then caps each) and adds a ``source``
        column to ``layers`` and ``experts``: one block per file, then ``all``.
        """
        if reader is None:
            reader = self.corpus(
                texts, files=files, seq_len=seq_len, batch_size=batch_size, lines=lines, max_tokens=max_tokens
            )
            reader.check_long_enough()
        info = {
            "corpus": [f.describe() for f in reader.files],
            "seq_len": reader.seq_len,
            "batch_size": reader.batch_size,
            "mode": "lines" if reader.lines else "packed",
            "max_tokens": reader.max_tokens,
        }
        if by_file:
            readers = [replace(reader, files=[f]) for f in reader.files]
            sources = [(r.files[0].name, r.batches()) for r in readers]
            report = run_balance(self.loaded, [], tuple(capacity_factors), progress, info, sources=sources)
            if not reader.lines:
                report.run["unrouted_tail_tokens"] = sum(r.unrouted_tail_tokens for r in readers)
            return report
        report = run_balance(self.loaded, reader.batches(), tuple(capacity_factors), progress, info)
        if not reader.lines:
            report.run["unrouted_tail_tokens"] = reader.unrouted_tail_tokens
        return report

    def compare(
        self,
        other: Inspector | Mapping[str, Any] | Any,
        texts: str | Sequence[str] | None = None,
        *,
        files: Sequence[str | Path] | None = None,
        seq_len: int | None = None,
        batch_size: int = 4,
        lines: bool = False,
        max_tokens: int | None = None,
        scratch: str | Path | None = None,
    ) -> CompareReport:
        """Routing and output drift of ``other`` (model B) against this model (A) on the same token batches.

        ``other`` is an Inspector (both are already in memory, so each batch runs through both in turn) or load
        options (a dict or options object with ``load``'s keywords plus ``model``): then B is loaded only after A's
        pass left its record on disk. Returns ``.layers``, ``.experts``, ``.summary`` (schemas ``COMPARE_*``).
        """
        from moe_inspect.analysis.compare import check_same_tokenizer, compare_together, compare_two_pass

        reader = self.corpus(
            texts, files=files, seq_len=seq_len, batch_size=batch_size, lines=lines, max_tokens=max_tokens
        )
        info = {
            "corpus": [f.describe() for f in reader.files],
            "seq_len": reader.seq_len,
            "batch_size": reader.batch_size,
            "mode": "lines" if reader.lines else "packed",
            "max_tokens": reader.max_tokens,
        }
        if isinstance(other, Inspector):
            check_same_tokenizer(self.tokenizer, other.tokenizer)
            reader.check_long_enough()
            return compare_together(self.loaded, other.loaded, reader.batches(), run_info=info)
        options = dict(other) if isinstance(other, Mapping) else dict(vars(other))
        model_id = resolve_model(options.get("model"))[0]
        tokenizer = load_tokenizer(model_id, options.get("revision"), bool(options.get("trust_remote_code")))
        check_same_tokenizer(self.tokenizer, tokenizer)
        reader.check_long_enough()
        return compare_two_pass(
            lambda: self.loaded,
            lambda: load_model(tokenizer=tokenizer, **options),
            reader.batches(),
            scratch=scratch,
            run_info=info,
        )

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
    ) -> pd.DataFrame:
        """Per-token routing of ``text`` (and of ``generate`` new tokens), schema ``schemas.ROUTE``.

        ``frame.attrs`` holds ``text``, ``generated_text`` and ``prompt_tokens``.
        """
        encoded = self.tokenizer(text, return_tensors="pt")
        input_ids = encoded["input_ids"].to(self.loaded.input_device)
        if input_ids.shape[1] == 0:
            raise ValueError("the prompt tokenized to zero tokens")
        prompt_len = int(input_ids.shape[1])
        with torch.inference_mode(), capture(self.loaded.routers) as cap:
            if generate > 0:
                ids = self._generate(input_ids, generate, temperature, seed)
            else:
                self.model(input_ids=input_ids)
                ids = input_ids[0]
        token_ids = ids.tolist()
        phases = ["prefill"] * prompt_len + ["decode"] * (len(token_ids) - prompt_len)
        frame = route_frame(self.loaded.routers, cap.calls, token_ids, self._token_strings(token_ids), phases)
        if layers is not None:
            frame = frame[frame["layer"].isin(set(layers))].reset_index(drop=True)
        frame.attrs.update(
            text=text,
            prompt_tokens=prompt_len,
            generated_text=self.tokenizer.decode(token_ids[prompt_len:]) if generate else "",
        )
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
            self.model(
                input_ids=sequence[:, -1:],
                attention_mask=torch.ones_like(sequence),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return sequence[0]


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
) -> Inspector:
    """Load a Hub id or local folder (default: the shipped demo model) and return an Inspector."""
    return Inspector(
        load_model(
            model,
            tokenizer=tokenizer,
            dtype=dtype,
            device=device,
            revision=revision,
            trust_remote_code=trust_remote_code,
            device_map=device_map,
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
        )
    )
