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

from moe_inspect.analysis.ablate import AblationReport, build_plan, run_ablation
from moe_inspect.analysis.ablate import Progress as AblateProgress
from moe_inspect.analysis.balance import DEFAULT_CAPACITY_FACTORS, BalanceReport, Progress, run_balance
from moe_inspect.analysis.batching import default_batch_size
from moe_inspect.analysis.encoder_decoder import capacity_rule
from moe_inspect.analysis.image_balance import balance_images
from moe_inspect.analysis.modality import (
    DEFAULT_IMAGE_PROMPT,
    check_image_run,
)
from moe_inspect.analysis.route import route_prompt
from moe_inspect.analysis.tables import routers_frame
from moe_inspect.errors import UserError
from moe_inspect.io.corpus import CorpusFile, CorpusReader, check_files
from moe_inspect.io.images import image_files
from moe_inspect.io.targets import check_aligned, paired_batches, target_source
from moe_inspect.model.loading import LoadedModel, decoder_start_id
from moe_inspect.model.loading import load as load_model
from moe_inspect.model.options import LoadOptions
from moe_inspect.model.source import (
    check_seq_len,
    check_takes_images,
    load_processor,
    load_tokenizer,
    positions_limit,
    resolve_model,
)
from moe_inspect.units import layer_ranges

if TYPE_CHECKING:
    from moe_inspect.analysis.compare import CompareReport

DEFAULT_IMAGE_BATCH = 4
"""Images per forward in ``balance`` unless a batch size is given (each image is a few hundred tokens)."""


def _corpus_info(reader: CorpusReader, **extra: Any) -> dict[str, Any]:
    """The corpus settings every run.json records (``run_info``), then any command-specific ones."""
    return {
        "seq_len": reader.seq_len,
        "batch_size": reader.batch_size,
        "mode": reader.mode,
        "max_tokens": reader.max_tokens,
        **extra,
    }


class Inspector:
    """A loaded MoE model with its routers hooked on demand."""

    def __init__(self, loaded: LoadedModel, processor: Any = None) -> None:
        self.loaded = loaded
        self._processor = processor

    @property
    def processor(self) -> Any:
        """The checkpoint's own processor (vision-language models), loaded offline on first use."""
        if self._processor is None:
            check_takes_images(self.model.config, self.loaded.model_id)
            self._processor = load_processor(self.loaded.model_id, self.loaded.revision)
        return self._processor

    @processor.setter
    def processor(self, processor: Any) -> None:
        self._processor = processor

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
        batch_size: int | None = None,
        lines: bool = False,
        max_tokens: int | None = None,
        pack: bool = False,
    ) -> CorpusReader:
        """A reader over in-memory ``texts`` and/or validated ``files``.

        Texts are documents: each is routed as its own sequence(s), padded in batches, unless ``pack`` asks
        for them to be packed into full windows like files are (short texts then may not fill one).
        ``batch_size=None`` picks the default of ``analysis.batching.default_batch_size``.
        """
        sources: list[CorpusFile] = []
        if isinstance(texts, str):
            texts = [texts]
        sources += [CorpusFile.from_text(t, f"<text {i}>") for i, t in enumerate(texts or [])]
        sources += check_files([str(f) for f in files or []]) if files else []
        if not sources:
            raise UserError("Give texts or files to measure.")
        documents = bool(texts) and not pack and not lines
        seq_len = check_seq_len(seq_len, positions_limit(self.model.config))
        batch_size = batch_size or default_batch_size(self.loaded, seq_len)
        return CorpusReader(sources, self.tokenizer, seq_len, batch_size, lines, max_tokens, documents)

    def balance(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        capacity_factors: Sequence[float] = DEFAULT_CAPACITY_FACTORS,
        reader: CorpusReader | None = None,
        progress: Progress | None = None,
        top_tokens: int = 0,
        min_count: int = 5,
        top_token_layers: Iterable[int] | None = None,
        by_file: bool = False,
        targets: str | Path | Iterable[str] | None = None,
        seed: int | None = None,
        images: str | Path | Sequence[str | Path] | None = None,
        image_prompt: str | None = None,
        **corpus_options: Any,
    ) -> BalanceReport:
        """Expert load, entropy, balance and what-if figures over a corpus (tables of ``schemas``).

        ``corpus_options`` are those of ``corpus`` (files, seq_len, batch_size, lines, max_tokens, pack): a
        list of texts is a list of documents; ``pack=True`` packs them into full windows.
        ``top_tokens=N`` also fills ``report.expert_tokens`` (each expert's N most frequent and N highest-lift
        token ids with at least ``min_count`` assignments) and ``vocab_specialization`` in ``report.layers``;
        ``top_token_layers`` limits the counting (memory: see ``analysis.token_counts``) to those decoder layers.
        ``by_file`` measures each text/file on its own (``max_tokens`` then caps each) and adds a ``source``
        column to ``layers`` and ``experts``: one block per file, then ``all``.

        Encoder-decoders route each line or window through the encoder and their decoder over its start token, or
        over ``targets`` (a file path or lines, one per source line; needs ``lines=True``); ``seed`` seeds torch
        first (NLLB-MoE's random second-expert policies). ``run["capacity"]`` states the routers' capacity rule.
        ``images`` (a folder, or image paths) routes each image with ``image_prompt`` (default
        ``analysis.modality.DEFAULT_IMAGE_PROMPT``) through the model's processor,
        after any texts/files, and splits the tables by ``modality`` (see ``analysis.modality``).
        """
        seq2seq = self.loaded.is_seq2seq
        if seq2seq and top_tokens:
            raise UserError("Top tokens per expert are counted for decoder-only models only.")
        target_file = target_source(targets, seq2seq) if targets is not None else None
        if target_file is not None and by_file:
            raise UserError("Aligned targets pair lines across the whole corpus; measure it without `by_file`.")
        if top_tokens < 0 or min_count < 1:
            raise UserError("`top_tokens` must be at least 0 and `min_count` at least 1.")
        if top_tokens and top_token_layers is not None:
            top_token_layers = self._check_layers(top_token_layers, "top_token_layers")
        if images is not None:
            return self._balance_images(
                texts, images, image_prompt, capacity_factors, reader, progress, top_tokens, min_count,
                top_token_layers, by_file, corpus_options,
            )
        if reader is None:
            reader = self.corpus(texts, **corpus_options)
            reader.check_long_enough()
        if target_file is not None:
            check_aligned(reader, target_file)
        info = _corpus_info(reader)
        rule = capacity_rule(self.loaded, reader.batch_size, seed) if seq2seq else None
        if rule is not None:
            info["capacity"] = rule
        if seq2seq:
            info["decoder_input"] = "start token" if target_file is None else f"targets {target_file.name}"
        if seed is not None:
            torch.manual_seed(seed)
        if target_file is not None:
            start = decoder_start_id(self.model.config)
            readers, batches, sources = [reader], paired_batches(reader, target_file, start), None
        elif by_file:
            readers = [replace(reader, files=[f]) for f in reader.files]
            batches, sources = [], [(r.files[0].name, r.batches()) for r in readers]
        else:
            readers, batches, sources = [reader], reader.batches(), None
        report = run_balance(
            self.loaded, batches, tuple(capacity_factors), progress, info, top_tokens, min_count,
            top_token_layers, sources=sources,
        )
        report.run["corpus"] = [f.describe() for f in reader.files]  # after the run: stdin is hashed as read
        if target_file is not None:
            report.run["targets"] = target_file.describe()
        if reader.mode != "lines":
            report.run["unrouted_tail_tokens"] = sum(r.unrouted_tail_tokens for r in readers)
        return report

    def _balance_images(
        self, texts: Any, images: Any, prompt: str | None, factors: Sequence[float], reader: CorpusReader | None,
        progress: Progress | None, top_tokens: int, min_count: int, token_layers: Any, by_file: bool,
        corpus_options: dict[str, Any],
    ) -> BalanceReport:
        """``balance`` over image files (and any texts/files before them), split by modality."""
        check_image_run(by_file)
        prompt = DEFAULT_IMAGE_PROMPT if prompt is None else prompt
        files = image_files(images) if isinstance(images, str | Path) else [Path(p) for p in images]
        if not files:
            raise UserError("No image files were given.")
        processor = self.processor
        if reader is None and (texts or corpus_options.get("files")):
            reader = self.corpus(texts, **corpus_options)
            reader.check_long_enough()
        batch_size = corpus_options.get("batch_size") or (
            reader.batch_size if reader is not None else DEFAULT_IMAGE_BATCH
        )
        return balance_images(
            self.loaded, processor, files, prompt, batch_size, reader,
            _corpus_info(reader) if reader is not None else None, tuple(factors), progress, top_tokens, min_count,
            token_layers, max_tokens=reader.max_tokens if reader is not None else corpus_options.get("max_tokens"),
        )

    def compare(
        self,
        other: Inspector | LoadOptions | Mapping[str, Any],
        texts: str | Sequence[str] | None = None,
        *,
        scratch: str | Path | None = None,
        **corpus_options: Any,
    ) -> CompareReport:
        """Routing and output drift of ``other`` (model B) against this model (A) on the same token batches.

        ``other`` is an Inspector (both are already in memory, so each batch runs through both in turn) or
        ``LoadOptions`` (or a dict of its fields): then B is loaded only after A's pass left its record on disk.
        ``corpus_options`` are those of ``corpus``. Returns ``.layers``, ``.experts``, ``.summary`` (schemas
        ``COMPARE_*``).
        """
        from moe_inspect.analysis.compare import check_same_tokenizer, compare_together, compare_two_pass

        reader = self.corpus(texts, **corpus_options)
        info = _corpus_info(reader)
        if isinstance(other, Inspector):
            check_same_tokenizer(self.tokenizer, other.tokenizer)
            reader.check_long_enough()
            report = compare_together(self.loaded, other.loaded, reader.batches(), run_info=info)
        else:
            options = other if isinstance(other, LoadOptions) else LoadOptions(**dict(other))
            model_id = resolve_model(options.model)[0]
            tokenizer = load_tokenizer(model_id, options.revision, options.trust_remote_code)
            check_same_tokenizer(self.tokenizer, tokenizer)
            reader.check_long_enough()
            report = compare_two_pass(
                lambda: self.loaded,
                lambda: load_model(options, tokenizer=tokenizer),
                reader.batches(),
                scratch=scratch,
                run_info=info,
            )
        report.run["corpus"] = [f.describe() for f in reader.files]  # after the run: stdin is hashed as read
        return report

    def ablate(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        top_k: Sequence[int] = (),
        dense: bool = False,
        drop_experts: Sequence[str] = (),
        capacity_factors: Sequence[float] = (),
        drop_policy: str = "position",
        importance: bool = False,
        layers: Iterable[int] | None = None,
        gradients: bool = False,
        reader: CorpusReader | None = None,
        progress: AblateProgress | None = None,
        **corpus_options: Any,
    ) -> AblationReport:
        """Loss under routing changes against the unchanged model on the same batches (tables of ``schemas``).

        ``corpus_options`` are those of ``corpus`` (files, seq_len, batch_size, lines, max_tokens, pack), as in
        ``balance``: a list of texts is a list of documents.
        """
        plan = build_plan(
            self.loaded, top_k=top_k, dense=dense, drop_experts=drop_experts, capacity_factors=capacity_factors,
            drop_policy=drop_policy, importance=importance, layers=layers, gradients=gradients,
        )
        if reader is None:
            reader = self.corpus(texts, **corpus_options)
            reader.check_long_enough()
        info = _corpus_info(reader, drop_policy=drop_policy)
        report = run_ablation(self.loaded, reader.batches(), plan, progress, info)
        report.run["corpus"] = [f.describe() for f in reader.files]  # after the run: stdin is hashed as read
        if reader.mode != "lines":
            report.run["unrouted_tail_tokens"] = reader.unrouted_tail_tokens
        return report

    def _check_layers(self, layers: Iterable[int], name: str = "layers") -> set[int]:
        """The selection, refused when empty or when it names a layer with no router."""
        selected = set(layers)
        known = {spec.layer for spec in self.loaded.routers}
        unknown = selected - known
        if not selected or unknown:
            what = "selects no layer" if not selected else f"names layer(s) {layer_ranges(unknown)} with no router"
            raise UserError(f"`{name}` {what}; this model's MoE layers are {layer_ranges(known)}.")
        return selected

    def route(
        self,
        text: str,
        *,
        generate: int = 0,
        temperature: float = 0.0,
        seed: int | None = None,
        layers: Iterable[int] | None = None,
        target: str | None = None,
        images: Sequence[str | Path | Any] | None = None,
    ) -> pd.DataFrame:
        """Per-token routing of ``text`` (and of ``generate`` new tokens), schema ``schemas.ROUTE``.

        ``images`` (paths or PIL images; vision-language models) go through the model's processor with ``text``:
        the whole model runs (vision tower, then language model) and image tokens are routed with the text, their
        rows marked ``modality`` = ``image``.

        ``frame.attrs`` holds ``text``, ``generated_text`` and ``prompt_tokens``. Encoder-decoders route ``text``
        through the encoder and ``target`` (default: the decoder's start token) through the decoder.
        """
        selected = self._check_layers(layers) if layers is not None else None
        if images:
            check_takes_images(self.model.config, self.loaded.model_id)
        if self.loaded.is_seq2seq:
            from moe_inspect.analysis.encoder_decoder import generate_encoder_decoder, route_encoder_decoder

            if generate:
                frame = generate_encoder_decoder(self.loaded, text, target, generate, temperature, seed)
            else:
                frame = route_encoder_decoder(self.loaded, text, target, seed)
        else:
            if target is not None:
                raise UserError("A `target` is only for encoder-decoder models; this one is decoder-only.")
            processor = self.processor if images else None
            frame = route_prompt(self.loaded, text, generate, temperature, seed, processor, images)
        if selected is not None:
            frame = frame[frame["layer"].isin(selected)].reset_index(drop=True)
        return frame


def load(
    model: str | LoadOptions | None = None, *, tokenizer: Any = None, processor: Any = None, **fields: Any
) -> Inspector:
    """Load a Hub id or local folder (default: the shipped demo model) and return an Inspector.

    ``fields`` are those of ``LoadOptions`` (dtype, device, revision, trust_remote_code, device_map,
    load_in_4bit, load_in_8bit, bnb_4bit_quant_type, double_quant, quantize); or pass one ``LoadOptions``.
    """
    if isinstance(model, LoadOptions):
        options = replace(model, **fields) if fields else model
    else:
        unknown = sorted(set(fields) - set(LoadOptions.field_names()))
        if unknown:
            raise TypeError(f"load() got unexpected keyword argument(s): {', '.join(unknown)}")
        options = LoadOptions(model=model, **fields)
    return Inspector(load_model(options, tokenizer=tokenizer), processor)
