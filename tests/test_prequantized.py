"""Checkpoints that ship quantized weights: a fine-grained FP8 one written here loads (dequantized on a machine
without an FP8 kernel, and the status line says so) and routes like its bf16 source; formats that cannot load are
refused in one sentence naming the format and what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_inspect.api import Inspector
from moe_inspect.errors import UserError
from moe_inspect.model.loading import LoadedModel
from moe_inspect.model.loading import load as load_options
from moe_inspect.model.options import LoadOptions


def load(model: str | Path, **fields: object) -> LoadedModel:
    return load_options(LoadOptions(str(model), **fields))  # type: ignore[arg-type]


PROMPT = "def add(a, b): return a + b  # The router sends every token to two experts."


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory: pytest.TempPathFactory):
    from prequantized_writers import write_fp8
    from tiny_models import save_tiny

    root = tmp_path_factory.mktemp("prequantized")

    def get(family: str) -> tuple[str, str]:
        src = save_tiny(family, root / f"{family}-bf16", dtype=torch.bfloat16)
        return str(src), str(write_fp8(src, root / f"{family}-fp8"))

    return get


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fine_grained_fp8_checkpoint_loads_and_routes(fp8_pair, family: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("on a GPU with an FP8 kernel the weights stay FP8; this checks the CPU dequantization path")
    src, fp8 = fp8_pair(family)
    raw = json.loads((Path(fp8) / "config.json").read_text())
    assert raw["quantization_config"]["quant_method"] == "fp8"
    loaded, reference = load(fp8), load(src)
    (note,) = loaded.notes
    assert note.startswith("Pre-quantized fine-grained FP8 checkpoint: dequantized to torch.bfloat16")
    for spec, ref in zip(loaded.routers, reference.routers, strict=True):
        assert torch.equal(spec.module.weight, ref.module.weight)  # the writer left routers in bf16
    experts, ref_experts = loaded.model.model.layers[1].mlp.experts, reference.model.model.layers[1].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        got, want = getattr(experts, name).float(), getattr(ref_experts, name).float()
        assert got.shape == want.shape
        assert (got - want).abs().mean() / want.abs().mean() < 0.05, name
    frame = Inspector(loaded).route(PROMPT, generate=2)
    ref_frame = Inspector(reference).route(PROMPT)
    prompt_rows = frame[frame["phase"] != "decode"]
    keys = ["position", "layer"]
    got = prompt_rows.groupby(keys)["expert"].apply(frozenset)
    want = ref_frame.groupby(keys)["expert"].apply(frozenset)
    assert (got == want.loc[got.index]).mean() >= 0.9


def _agreement(loaded, reference) -> float:
    frame = Inspector(loaded).route(PROMPT, generate=2)
    prompt_rows = frame[frame["phase"] != "decode"]
    keys = ["position", "layer"]
    got = prompt_rows.groupby(keys)["expert"].apply(frozenset)
    want = Inspector(reference).route(PROMPT).groupby(keys)["expert"].apply(frozenset)
    return float((got == want.loc[got.index]).mean())


def test_mxfp4_gpt_oss_checkpoint_loads_and_routes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from prequantized_writers import write_mxfp4
    from tiny_models import save_tiny

    if torch.cuda.is_available():
        pytest.skip("with Triton and the kernels package on a GPU the experts stay MXFP4")
    src = save_tiny("gpt_oss", tmp_path / "bf16", dtype=torch.bfloat16)
    mxfp4 = write_mxfp4(src, tmp_path / "mxfp4")
    loaded, reference = load(str(mxfp4)), load(str(src))
    (note,) = loaded.notes
    assert note.startswith("Pre-quantized MXFP4 checkpoint: dequantized to torch.bfloat16")
    for spec, ref in zip(loaded.routers, reference.routers, strict=True):
        assert torch.equal(spec.module.weight, ref.module.weight) and torch.equal(spec.module.bias, ref.module.bias)
    experts, ref_experts = loaded.model.model.layers[1].mlp.experts, reference.model.model.layers[1].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        got, want = getattr(experts, name).float(), getattr(ref_experts, name).float()
        assert got.shape == want.shape  # GPT-OSS's transposed [E, H, 2I] layout came back
        assert (got - want).abs().mean() / want.abs().mean() < 0.15, name  # FP4: ~0.12 on random weights
    agreement = _agreement(loaded, reference)
    with capsys.disabled():
        print(f"\nMXFP4 GPT-OSS: top-k set equal to bf16 on {agreement:.0%} of (token, layer)")
    assert agreement >= 0.6


def test_compressed_tensors_checkpoint_loads_and_routes(fp8_pair, tmp_path: Path) -> None:
    """Runs where the compressed-tensors package is installed (it is not in the test extra)."""
    pytest.importorskip("compressed_tensors")
    from prequantized_writers import write_compressed_tensors

    src, _ = fp8_pair("qwen3_moe")
    ct = write_compressed_tensors(Path(src), tmp_path / "ct")
    loaded, reference = load(str(ct)), load(src)
    (note,) = loaded.notes
    assert note.startswith("Pre-quantized compressed-tensors checkpoint: dequantized to torch.bfloat16")
    for name, param in reference.model.named_parameters():
        got = loaded.model.get_parameter(name)
        assert got.shape == param.shape, name
        if name.endswith(("_proj.weight", "_proj")) and not name.endswith("mlp.gate.weight"):
            # linears come back from float8; compressed-tensors 0.20 also round-trips the fused experts it left bf16
            assert (got.float() - param.float()).abs().mean() / param.float().abs().mean() < 0.05, name
        else:
            assert torch.equal(got, param), name  # routers, norms, embeddings untouched
    assert _agreement(loaded, reference) >= 0.9


def test_quantizing_a_quantized_checkpoint_is_one_sentence(fp8_pair) -> None:
    _, fp8 = fp8_pair("qwen3_moe")
    with pytest.raises(UserError, match=r"is already quantized \(fine-grained FP8\); load it without 4bit-nf4"):
        load(fp8, load_in_4bit=True)


def test_compressed_tensors_without_its_package_is_one_sentence(
    fp8_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moe_inspect.model.prequantized as prequantized

    src, _ = fp8_pair("mixtral")
    folder = tmp_path / "ct"
    folder.mkdir()
    for item in Path(src).iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(prequantized, "_has_package", lambda name: False)
    with pytest.raises(UserError, match=r"is a compressed-tensors checkpoint; reading it needs the compressed-tensors"):
        load(str(folder))
