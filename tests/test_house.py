"""The house (issue 9): one LoadOptions, one output layer, instant help, and the four defects it found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

import moe_inspect
from moe_inspect.cli import app
from moe_inspect.cli.options import with_load_options
from moe_inspect.errors import UserError
from moe_inspect.model.options import LoadOptions

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
SHORT = "def add(a, b):\n    return a + b"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in a fresh interpreter, reporting which heavy modules it imported."""
    code = (
        "import sys\nfrom moe_inspect.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
        "    code = e.code\nelse:\n    code = 0\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def insp(tiny_dir):  # type: ignore[no-untyped-def]
    return moe_inspect.load(str(tiny_dir("mixtral")), device="cpu")


# ------------------------------------------------------------------------------------------------ defects


def test_api_list_of_short_texts_is_routed_as_documents(insp) -> None:  # type: ignore[no-untyped-def]
    texts = [SHORT, "x = 1"]
    report = insp.balance(texts, batch_size=2)
    expected = sum(len(insp.tokenizer(t)["input_ids"]) for t in texts)
    assert report.run["mode"] == "documents"
    assert report.run["tokens"] == expected
    assert int(report.layers["tokens"].iloc[0]) == expected
    # A text longer than one window is cut into windows, its tail routed too (nothing dropped).
    long = insp.balance([SHORT * 20], seq_len=16)
    assert long.run["tokens"] == len(insp.tokenizer(SHORT * 20)["input_ids"])
    assert long.run["unrouted_tail_tokens"] == 0


def test_api_packing_still_refuses_too_short_texts_naming_the_api_argument(insp) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError, match="shorter than one window") as caught:
        insp.balance([SHORT], pack=True)
    assert "`seq_len`" in str(caught.value) and "--seq-len" not in str(caught.value)
    assert "--seq-len" in caught.value.for_cli() and "--lines" in caught.value.for_cli()


GRANITE_3B_A800M = {  # ibm-granite/granite-3.0-3b-a800m-base config.json, published as "800M active"
    "vocab_size": 49155, "hidden_size": 1536, "intermediate_size": 512, "num_hidden_layers": 32,
    "num_attention_heads": 24, "num_key_value_heads": 8, "num_local_experts": 40, "num_experts_per_tok": 8,
    "tie_word_embeddings": True, "max_position_embeddings": 4096,
}


def test_active_params_non_embedding_reproduces_granite_800m() -> None:
    from transformers import GraniteMoeConfig

    from moe_inspect.analysis.info import describe

    info = describe(GraniteMoeConfig(**GRANITE_3B_A800M))
    assert info.tied_embeddings
    assert info.active_params == info.active_params_excl_input_embedding == 882_874_368
    embedding = 49155 * 1536
    assert info.input_embedding_params == embedding
    assert info.active_params_non_embedding == 882_874_368 - embedding == 807_372_288  # "800M active"
    assert info.to_dict()["active_params_non_embedding"] == 807_372_288


def test_active_params_non_embedding_untied_subtracts_both() -> None:
    from transformers import MixtralConfig

    from moe_inspect.analysis.info import describe

    config = MixtralConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
    )
    info = describe(config)
    assert not info.tied_embeddings and info.input_embedding_params == info.lm_head_params == 1600
    assert info.active_params_non_embedding == info.active_params - 3200
    assert info.active_params_excl_input_embedding == info.active_params - 1600


def test_encoder_decoder_moe_gets_real_figures(tmp_path: Path) -> None:
    """Issue 17 replaced the refusal: per-stack layers and k from the routers, never 'top-0'."""
    from transformers import SwitchTransformersConfig

    from moe_inspect.analysis.info import describe

    config = SwitchTransformersConfig(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=4, num_decoder_layers=4, num_heads=2, num_experts=4,
        encoder_sparse_step=2, decoder_sparse_step=2,
    )
    info = describe(config)
    assert [(s.stack, s.moe_layers, s.dense_layers, s.top_k) for s in info.stacks] == [
        ("encoder", [1, 3], [0, 2], 1), ("decoder", [1, 3], [0, 2], 1),
    ]
    # 4 routers x 4 experts x (wi + wo = 2 x 16 x 32); each token uses 1 of 4
    assert info.routed_expert_params == 4 * 4 * 1024
    assert info.active_params == info.total_params - 4 * 4 * 1024 * 3 // 4
    config.save_pretrained(tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "encoder 4 (2 MoE: 1, 3, 2 dense)" in result.output
    assert "top-0" not in result.output and "4 routed, top-1 per token" in result.output


def test_version_flag() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"moe-inspect {moe_inspect.__version__}"
    assert "--version" in runner.invoke(app, ["--help"]).stdout


# --------------------------------------------------------------------------------------------- instant help


@pytest.mark.parametrize(
    "args",
    [
        ["--help"], ["route", "--help"], ["balance", "--help"], ["compare", "--help"], ["info", "--help"],
        ["ablate", "--help"], ["ingest", "--help"], ["plan", "--help"], ["route", "hi", "--no-such"],
    ],
)
def test_help_and_option_errors_import_no_torch(args: list[str]) -> None:
    proc = _cli(*args)
    assert proc.returncode == (2 if "--no-such" in args else 0), proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr


def test_balance_help_groups_its_options() -> None:
    """Eighteen options in one list were hard to scan: each sits in the panel of what it is about."""
    from typer.testing import CliRunner

    from moe_inspect.cli import app

    text = CliRunner().invoke(app, ["balance", "--help"], env={"COLUMNS": "120"}).stdout
    panels = ["Arguments", "Options", "Corpus", "What to measure", "Output",
              "Encoder-decoder and vision-language models", "Model loading"]
    starts = [text.index(f"╭─ {name} ") for name in panels]
    assert starts == sorted(starts)
    within = {"Corpus": "--max-tokens", "What to measure": "--top-tokens", "Output": "--html",
              "Encoder-decoder and vision-language models": "--images"}
    for name, option in within.items():
        start = text.index(f"╭─ {name} ")
        assert start < text.index(option) < text.index("╰", start), name


def test_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moe_inspect", "--version"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("moe-inspect "), proc.stderr


# ---------------------------------------------------------------------------------------------- LoadOptions


def test_api_load_accepts_load_options_or_fields(tiny_dir) -> None:  # type: ignore[no-untyped-def]
    path = str(tiny_dir("mixtral"))
    a = moe_inspect.load(moe_inspect.LoadOptions(path, dtype="float32"))
    b = moe_inspect.load(path, dtype="float32")
    assert a.loaded.model_id == b.loaded.model_id == path and a.loaded.dtype == b.loaded.dtype == "float32"
    with pytest.raises(TypeError, match="dtpye"):
        moe_inspect.load(path, dtpye="float32")


def test_load_options_prefix_builds_a_second_group() -> None:
    seen: dict[str, LoadOptions] = {}
    cli = typer.Typer()

    @cli.command()
    @with_load_options()
    @with_load_options(prefix="against-", dest="against", panel="Second model")
    def two(
        name: Annotated[str, typer.Argument()], load: LoadOptions, against: LoadOptions
    ) -> None:
        seen.update(load=load, against=against, name=name)  # type: ignore[arg-type]

    result = runner.invoke(
        cli, ["x", "-m", "a", "--dtype", "bfloat16", "--against-model", "b", "--against-trust-remote-code"]
    )
    assert result.exit_code == 0, result.output
    assert seen["load"] == LoadOptions(model="a", dtype="bfloat16")
    assert seen["against"] == LoadOptions(model="b", trust_remote_code=True)
    assert "--against-load-in-4bit" in runner.invoke(cli, ["--help"]).stdout


# -------------------------------------------------------------------------------------------- output layer


def test_route_json_and_quiet(tiny_dir) -> None:  # type: ignore[no-untyped-def]
    args = ["route", "hello world", "-m", str(tiny_dir("mixtral"))]
    result = runner.invoke(app, [*args, "--json", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["text"] == "hello world" and data["rows"][0]["rank"] == 0
    assert result.stderr == ""


def test_balance_json_is_one_document(tiny_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    corpus = tmp_path / "c.txt"
    corpus.write_text(SHORT * 10)
    result = runner.invoke(app, ["balance", str(corpus), "-m", str(tiny_dir("mixtral")), "--seq-len", "8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"run", "layers", "experts", "coactivation"}
    assert data["layers"][0]["tokens"] == data["run"]["tokens"] > 0
    assert data["layers"][0]["aux_loss"] is None or isinstance(data["layers"][0]["aux_loss"], float)


def test_info_quiet_prints_nothing_but_json(tiny_dir) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["info", str(tiny_dir("mixtral")), "-q", "--json"])
    assert result.exit_code == 0 and result.stderr == ""
    assert "active_params_non_embedding" in json.loads(result.stdout)


def test_debug_env_shows_the_traceback_of_a_user_error() -> None:
    plain = _cli("route", "hi", "-m", "./no/such/model")
    debug = _cli("route", "hi", "-m", "./no/such/model", env={"MOE_INSPECT_DEBUG": "1"})
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    assert "No model folder at './no/such/model'." in debug.stderr


def test_cli_names_flags_where_the_library_names_arguments() -> None:
    exc = UserError("Retry with `trust_remote_code=True` or a smaller `seq_len`; `x-y` stays.")
    assert exc.for_cli() == "Retry with --trust-remote-code or a smaller --seq-len; `x-y` stays."


# ------------------------------------------------------------------------------------------- README schemas


def test_readme_schema_tables_match_schemas_py() -> None:
    from moe_inspect.io.schemas import readme_drift

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_drift(readme) == []
