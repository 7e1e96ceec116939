"""What a real run hit (issue 13): bf16/fp16 training, mask tokens, non-finite values, resume
safety, bad data records, Ctrl-C, threads and the console log. Tiny embedded models, CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bidirlm.cli import main as cli_main
from bidirlm.runtime.embedded import embedded_tiny_model, save_random_qwen3
from bidirlm.runtime.training.audit import config_changes
from bidirlm.runtime.training.config import load_train_config
from bidirlm.runtime.training.trainer import (
    TrainingError,
    TrainingInterrupted,
    train,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SMALL = {
    "causal": ["data.tokens_per_batch=128", "data.max_seq_len=32"],
    "mntp": ["data.tokens_per_batch=128", "data.max_seq_len=32", "mntp.mask_ratio=0.3"],
    "contrastive": ["data.batch_size=4", "data.query_max_len=16", "data.document_max_len=24"],
}


@pytest.fixture(autouse=True)
def _cpu_torch_kernels(monkeypatch: pytest.MonkeyPatch):
    """The torch reference ops (whole models in the Triton interpreter are slow) on one thread."""
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(phase: str, output: Path, *extra: str):
    overrides = [
        f"train.output={output}",
        "train.progress_bar=false",
        "train.checkpoint_every=0",
        "train.device=cpu",
        *SMALL[phase],
        *extra,
    ]
    return load_train_config(EXAMPLES / f"tiny-{phase}.toml", overrides)


def _rows(output: Path) -> list[dict]:
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


def _all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


# ---------------------------------------------------------------- item 1: bf16 / fp16 training


@pytest.mark.parametrize("phase", ["causal", "mntp", "contrastive"])
def test_bf16_training_every_phase(phase: str, tmp_path: Path) -> None:
    final = train(_config(phase, tmp_path, "train.steps=2", "train.dtype=bfloat16"))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows), rows
    assert _all_finite(final)


def test_fp16_training(tmp_path: Path) -> None:
    final = train(_config("mntp", tmp_path, "train.steps=2", "train.dtype=float16"))
    assert all(math.isfinite(r["loss"]) for r in _rows(tmp_path)) and _all_finite(final)


def test_activations_stay_in_the_autocast_dtype() -> None:
    """float32 master weights under a bf16 autocast: q, k, v (and so the attention) are bf16,
    the LM head sees bf16 hidden states, and the loss is close to the float32 one."""
    from bidirlm.runtime.models import load_model
    from bidirlm.runtime.training.phases import PhaseModule

    encoder = load_model(embedded_tiny_model(), dtype=torch.float32)
    seen: list[torch.dtype] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
        for name, m in encoder.named_modules()
        if name.endswith(("q_norm", "k_norm", "wv"))
    ]
    ids = torch.randint(10, 500, (40,), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    labels = torch.roll(ids, -1)
    module = PhaseModule(encoder)
    with torch.no_grad():
        ref = module(ids, cu, 23, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(ids, cu, 23, labels)
            pooled = module(ids, cu, 23)
    for hook in hooks:
        hook.remove()
    assert set(seen[len(seen) // 2 :]) == {torch.bfloat16}  # the autocast forward
    assert pooled.dtype == torch.bfloat16
    assert abs(out.item() - ref.item()) < 0.02 * abs(ref.item())


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_rmsnorm_matches_transformers_in_low_precision(kind: str) -> None:
    """Output dtype and values as transformers' norm for a model in that dtype: Qwen3 rounds
    `x_normed` to the input dtype then multiplies by the weight; Gemma3 scales in float32."""
    from bidirlm.runtime.models.common import GemmaRMSNorm, RMSNorm

    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(5, 48, generator=g)).to(torch.bfloat16)
    w = (0.5 + torch.rand(48, generator=g)).to(torch.bfloat16).float()  # exact in bf16
    if kind == "qwen3":
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm as Ref

        ours = RMSNorm(48, eps=1e-6)
    else:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm as Ref

        ours = GemmaRMSNorm(48, eps=1e-6)
    ref = Ref(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(w)  # float32 master weight (autocast training)
        ref.weight.copy_(w)
        ref = ref.to(torch.bfloat16)  # transformers' model in bf16
        out, expected = ours(x), ref(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_bf16_encoder_matches_transformers() -> None:
    """The whole tiny model in bf16 against transformers' Qwen3 in bf16 (bidirectional)."""
    from transformers import AutoConfig, Qwen3Model

    from bidirlm.runtime.models import load_model

    folder = embedded_tiny_model()
    ours = load_model(folder, dtype=torch.bfloat16, bidirectional=True)
    config = AutoConfig.from_pretrained(folder)
    config.is_causal = False
    ref = Qwen3Model.from_pretrained(folder, config=config, dtype=torch.bfloat16).eval()
    ref32 = Qwen3Model.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    ids = torch.randint(10, 2000, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ours(ids)
        expected = ref(ids).last_hidden_state
        exact = ref32(ids).last_hidden_state
    assert out.dtype == torch.bfloat16
    # as close to float32 as transformers' own bf16 model is (bf16 rounding differs by op order)
    err = (out.float() - exact).abs().max().item()
    err_hf = (expected.float() - exact).abs().max().item()
    assert err <= 2 * err_hf + 1e-2, (err, err_hf)


# ---------------------------------------------------------------- item 3: the mask token


@pytest.fixture(scope="module")
def no_mask_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a tokenizer that has no mask token (like Qwen3's and Gemma3's)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_tiny_model()))
    tokenizer.mask_token = None
    folder = tmp_path_factory.mktemp("no-mask") / "model"
    save_random_qwen3(folder, tokenizer)
    reloaded = AutoTokenizer.from_pretrained(str(folder))
    assert reloaded.mask_token is None and "_" in reloaded.get_vocab()
    return folder


def test_mntp_without_mask_token_uses_underscore(no_mask_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    config = _config("mntp", tmp_path, f"model={no_mask_model}", "train.steps=1")
    assert config.mntp.mask_token == "_"
    train(config)
    assert math.isfinite(_rows(tmp_path)[0]["loss"])
    underscore = AutoTokenizer.from_pretrained(str(no_mask_model)).get_vocab()["_"]
    from bidirlm.runtime.training.masking import check_mask_token

    assert check_mask_token(no_mask_model, "_") == underscore


def test_bad_mask_token_names_the_key_before_work(
    no_mask_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    argv = [
        "train",
        str(EXAMPLES / "tiny-mntp.toml"),
        "--set",
        f"model={no_mask_model}",
        "--set",
        f"train.output={out}",
        "--set",
        "mntp.mask_token=no such token at all",
    ]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mntp.mask_token" in err[0] and "single token" in err[0], err
    assert not out.exists()


# ---------------------------------------------------------------- items 7, 11: config values


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=inf", "optim.lr: must be a finite number"),
        ("optim.lr=nan", "optim.lr: must be a finite number"),
        ("contrastive.temperature=-inf", "contrastive.temperature: must be a finite number"),
        ("data.sources.0.weight=nan", "data.sources[0].weight: must be a finite number"),
        ("optim.betas=[0.9, inf]", "optim.betas[1]: must be a finite number"),
        ("optim.betas=[0.9, 1.5]", "optim.betas[1] must be in [0, 1)"),
        ("optim.eps=0", "optim.eps must be > 0"),
        ("optim.eps=-1e-8", "optim.eps must be > 0"),
        ("train.seed=-1", "train.seed must be in [0, 2**63)"),
        ("train.device=potato", "train.device: 'potato' is not a device"),
        ("train.log_every=-1", "train.log_every must be >= 0"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(
    override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    argv = ["train", str(EXAMPLES / "tiny-causal.toml"), "--set", f"train.output={out}"]
    assert cli_main([*argv, "--set", override]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_missing_gpu_names_train_device(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    argv = ["train", str(EXAMPLES / "tiny-causal.toml"), "--set", f"train.output={out}"]
    assert cli_main([*argv, "--set", "train.device=cuda"]) == 1
    err = capsys.readouterr().err
    assert "train.device='cuda' but no GPU" in err and "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------- item 7: no non-finite output


def test_non_finite_parameters_are_never_saved(tmp_path: Path, capsys) -> None:
    """Weights that turn NaN mid-run (a divergence): no checkpoint, no final model, an error
    naming the step; the earlier checkpoint stays the latest."""
    config = _config("causal", tmp_path, "train.steps=3", "train.checkpoint_every=1")

    def poison(row: dict) -> None:
        if row["step"] == 2:
            with torch.no_grad():
                next(iter(run_params)).fill_(float("nan"))

    from bidirlm.runtime.training import trainer

    real_run = trainer._Run
    run_params: list = []

    class SpyRun(real_run):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            run_params.append(next(self.encoder.parameters()))

    trainer._Run = SpyRun
    try:
        with pytest.raises(TrainingError, match=r"step 2: the parameters are non-finite"):
            train(config, on_step=poison)
    finally:
        trainer._Run = real_run
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step-00000001"]
    assert not (tmp_path / "final").exists()


# ---------------------------------------------------------------- item 8: changed config


def test_resume_with_changed_config_is_refused_then_recorded(tmp_path: Path) -> None:
    base = ("train.steps=3", "train.checkpoint_every=1")
    with pytest.raises(TrainingInterrupted):
        train(_config("causal", tmp_path, *base), stop_after=1)
    original = (tmp_path / "config.toml").read_text()
    changed = _config("causal", tmp_path, *base, "optim.lr=1e-3", "train.seed=3")
    with pytest.raises(ValueError, match=r"another config: optim.lr: 0.003 -> 0.001; train.seed"):
        train(changed)
    assert (tmp_path / "config.toml").read_text() == original
    # console-only keys are not a change
    with pytest.raises(TrainingInterrupted):
        train(_config("causal", tmp_path, *base, "train.log_every=5"), stop_after=1)
    allowed = _config("causal", tmp_path, *base, "optim.lr=1e-3", "train.allow_config_change=true")
    train(allowed)
    assert (tmp_path / "config.toml").read_text() == original  # the original is kept
    records = [json.loads(x) for x in (tmp_path / "config-changes.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == 2
    assert records[0]["changes"] == {"optim.lr": {"old": 0.003, "new": 0.001}}
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]


def test_cli_allow_config_change_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = str(EXAMPLES / "tiny-causal.toml")
    common = ["--set", f"train.output={tmp_path}", "--set", "train.device=cpu", "--threads", "1"]
    common += [x for o in [*SMALL["causal"], "train.checkpoint_every=1"] for x in ("--set", o)]
    assert cli_main(["train", cfg, *common, "--set", "train.steps=1"]) == 0
    capsys.readouterr()
    assert cli_main(["train", cfg, *common, "--set", "train.steps=2"]) == 1
    err = capsys.readouterr().err
    assert "train.steps: 1 -> 2" in err and "--allow-config-change" in err
    assert cli_main(["train", cfg, *common, "--set", "train.steps=2", "--allow-config-change"]) == 0
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
    assert (tmp_path / "config-changes.jsonl").is_file()


def test_config_changes_lists_nested_keys() -> None:
    old = {"optim": {"lr": 1.0, "betas": [0.9, 0.99]}, "data": {"sources": [{"path": "a"}]}}
    new = {"optim": {"lr": 1.0, "betas": (0.9, 0.9)}, "data": {"sources": [{"path": "b"}]}}
    assert config_changes(old, new) == {
        "data.sources.0.path": ("a", "b"),
        "optim.betas": ([0.9, 0.99], [0.9, 0.9]),
    }


# ---------------------------------------------------------------- item 11: another model


def test_resume_with_a_model_of_another_shape(tmp_path: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(embedded_tiny_model(), model)
    config = _config("causal", tmp_path / "out", f"model={model}", "train.steps=2")
    with pytest.raises(TrainingInterrupted):
        train(config, stop_after=1)
    shutil.rmtree(model)  # the same folder now holds a wider model
    save_random_qwen3(
        model, AutoTokenizer.from_pretrained(str(embedded_tiny_model())), hidden_size=96
    )
    with pytest.raises(ValueError, match=r"checkpoint of another model: encoder\.\S+ is \["):
        train(config)


# ---------------------------------------------------------------- item 12: torn metrics line


def test_torn_metrics_line_does_not_block_resume(tmp_path: Path) -> None:
    config = _config("causal", tmp_path, "train.steps=3", "train.checkpoint_every=1")
    with pytest.raises(TrainingInterrupted):
        train(config, stop_after=2)
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "loss": 4.2, "lr": 0.0')  # killed in the middle of a write
    train(config)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]


# ---------------------------------------------------------------- items 11, 13: bad records


def _docs(n: int) -> list[dict]:
    from bidirlm.runtime.embedded import python_docs_texts

    return [{"text": t[:200]} for t in python_docs_texts()[:n]]


def test_bad_json_lines_fail_before_work_with_line_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lines = [json.dumps(r) for r in _docs(6)]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join([*lines[:2], "", '{"text": "cut', *lines[2:]]) + "\n")
    out = tmp_path / "out"
    base = ["train", str(EXAMPLES / "tiny-causal.toml"), "--set", f"train.output={out}"]
    argv = [*base, "--set", f"data.sources.0.path={data}", "--set", "data.sources.1.weight=0.01"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "docs.jsonl: line 4 is not valid JSON" in err[0], err
    assert "data.skip_bad_records" in err[0] and not out.exists()
    # not UTF-8
    data.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "docs.jsonl: line 2 is not valid UTF-8" in err and not out.exists()
    # a record without the text field, and a non-object
    data.write_text('{"text": "a b c"}\n[1, 2]\n{"body": "x"}\n')
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "line 2 is not a JSON object (2 bad records in all)" in err


def test_skip_bad_records_counts_them(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in _docs(30)]
    lines[5] = '{"text": '
    lines[9] = '{"body": "no text"}'
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    config = _config(
        "causal",
        tmp_path / "out",
        "train.steps=15",
        f"data.sources.0.path={data}",
        "data.sources.1.weight=0.001",
        "data.skip_bad_records=true",
    )
    train(config)
    rows = _rows(tmp_path / "out")
    assert rows[-1]["bad_records"] >= 2  # 15 steps x 128 tokens read the whole file


def test_bad_record_mid_run_checkpoints_first(tmp_path: Path) -> None:
    """A bad record that only streaming finds (Parquet is not pre-read; neither is a JSON Lines
    file above the size limit): the steps done are checkpointed, then the error names the row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [r["text"] for r in _docs(40)]
    texts[17] = None
    data = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts}), data)
    args = ("train.steps=40", f"data.sources.0.path={data}", "data.sources.1.weight=0.001")
    with pytest.raises(ValueError, match=r"docs.parquet: row 18 field 'text' is NoneType") as info:
        train(_config("causal", tmp_path / "out", *args))
    message = str(info.value)
    step = int(message.split("found at step ")[1].split(";")[0])
    assert step > 1 and f"step-{step - 1:08d}" in message
    saved = tmp_path / "out" / "checkpoints" / f"step-{step - 1:08d}"
    assert (saved / "state.json").is_file()
    # resume, skipping the record this time (a recorded config change)
    train(
        _config(
            "causal",
            tmp_path / "out",
            *args,
            "data.skip_bad_records=true",
            "train.allow_config_change=true",
        )
    )
    rows = _rows(tmp_path / "out")
    assert [r["step"] for r in rows] == list(range(1, 41)) and rows[-1]["bad_records"] >= 1


# ---------------------------------------------------------------- item 14: Ctrl-C


def test_ctrl_c_checkpoints_in_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bidirlm.cli", "train", str(EXAMPLES / "tiny-causal.toml")]
    for o in ["train.steps=500", f"train.output={out}", "train.checkpoint_every=0"]:
        cmd += ["--set", o]
    cmd += [x for o in SMALL["causal"] for x in ("--set", o)]
    env = {**os.environ, "BIDIRLM_KERNELS": "torch", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert "Ctrl-C: saving a checkpoint after this step" in stderr
    assert "saved checkpoint" in stdout and "(Ctrl-C)" in stdout
    step = len(metrics.read_text().splitlines())
    assert (out / "checkpoints" / f"step-{step:08d}" / "state.json").is_file()
    assert "Traceback" not in stderr


def test_second_ctrl_c_aborts_at_once(tmp_path: Path) -> None:
    config = _config("causal", tmp_path, "train.steps=50")

    def on_step(row: dict) -> None:
        if row["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # first: checkpoint after this step...
            os.kill(os.getpid(), signal.SIGINT)  # ...second: abort now

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=on_step)
    assert not (tmp_path / "checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is before  # restored


# ---------------------------------------------------------------- item 16 and the console


def test_threads_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from bidirlm.commands import _threads
    from bidirlm.runtime.training import trainer

    seen = []
    monkeypatch.setattr(trainer, "train", lambda config: seen.append(torch.get_num_threads()))
    cfg = str(EXAMPLES / "tiny-causal.toml")
    assert cli_main(["train", cfg, "--threads", "2"]) == 0 and seen == [2]
    assert torch.get_num_threads() == 1  # restored
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cli_main(["train", cfg]) == 0 and seen[-1] == _threads.default_threads()
    assert 1 <= _threads.default_threads() <= 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _threads.resolve_threads(None) is None  # the environment's choice is kept
    assert cli_main(["train", cfg, "--threads", "0"]) == 1
    assert "--threads must be an integer >= 1" in capsys.readouterr().err


def test_log_every_and_one_line_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _config(
        "causal", tmp_path, "train.steps=4", "train.log_every=2", "train.progress_bar=true"
    )
    train(config)
    err = capsys.readouterr().err
    assert "\r" not in err  # no progress-bar frames when stderr is not a terminal
    lines = [x for x in err.splitlines() if " loss " in x]
    assert [x.split()[3] for x in lines] == ["2/4", "4/4"], err
    summary = [x for x in err.splitlines() if "full config:" in x]
    assert len(summary) == 1 and str(tmp_path / "config.toml") in summary[0]
    assert "[train]" not in err  # the full config is in the file, not on the console


def test_source_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _docs(4)))
    (folder / "c.toml").write_text(
        'model = "embedded:tiny"\nphase = "causal"\n[train]\noutput = "out"\nsteps = 1\n'
        '[[data.sources]]\npath = "docs.jsonl"\n'
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_train_config("../project/c.toml")
    assert config.data.sources[0].path == str(folder / "docs.jsonl")
    assert config.train.output == "out"  # outputs stay relative to the working directory
    (elsewhere / "mine.jsonl").write_text('{"text": "x"}\n')
    config = load_train_config("../project/c.toml", ["data.sources.0.path=mine.jsonl"])
    assert config.data.sources[0].path == "mine.jsonl"  # --set paths: the working directory


def test_encode_and_eval_take_threads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import numpy as np

    texts = tmp_path / "t.txt"
    texts.write_text("def f(): pass\nreturn a value\n")
    model = str(embedded_tiny_model())
    out = tmp_path / "e.npy"
    assert (
        cli_main(["encode", model, "--input", str(texts), "--output", str(out), "--threads", "1"])
        == 0
    )
    assert np.load(out).shape[0] == 2
    for command in (
        ["encode", model, "--input", str(texts), "--output", str(out)],
        ["eval", model],
    ):
        assert cli_main([*command, "--threads", "0"]) == 1
        assert "--threads must be an integer >= 1" in capsys.readouterr().err


def test_diverged_last_step_publishes_no_model(tmp_path: Path, capsys) -> None:
    """A finite but absurd lr: the gradients turn NaN after step 1; the run must not end with a
    published final model and exit 0."""
    argv = ["train", str(EXAMPLES / "tiny-causal.toml"), "--set", f"train.output={tmp_path}"]
    for o in ["optim.lr=1e30", "optim.warmup_steps=0", "train.steps=3", *SMALL["causal"]]:
        argv += ["--set", o]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bidirlm train: error: step 3: non-finite") and "not written" in err
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("phase", ["mntp", "contrastive"])
def test_bf16_training_gemma3(phase: str, tmp_path: Path) -> None:
    """Gemma3 (sandwich norms, scaled embeddings, soft-capped head) trains in bf16 too; its
    tokenizer has no mask token, so MNTP masks with "_"."""
    from tests.models.test_models import build_checkpoint

    model = build_checkpoint("gemma3", tmp_path / "gemma3")
    final = train(
        _config(phase, tmp_path / "out", f"model={model}", "train.steps=2", "train.dtype=bfloat16")
    )
    rows = _rows(tmp_path / "out")
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows), rows
    assert _all_finite(final)


def test_non_utf8_text_file_names_file_and_line(tmp_path: Path) -> None:
    from bidirlm.runtime.training.config import SourceConfig
    from bidirlm.runtime.training.data import check_sources

    data = tmp_path / "notes.txt"
    data.write_bytes(b"first paragraph\n\nsecond caf\xe9\n")
    with pytest.raises(ValueError, match=r"notes.txt: line 3 is not valid UTF-8 \(byte 0xe9\)"):
        check_sources([SourceConfig(str(data))], fields=("text",))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("phase", ["causal", "mntp", "contrastive"])
def test_low_precision_training_on_gpu(
    phase: str, dtype: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Triton kernels under a bf16/fp16 autocast: q, k, v share the dtype on the GPU too."""
    monkeypatch.setenv("BIDIRLM_KERNELS", "triton")
    config = _config(phase, tmp_path, "train.steps=2", f"train.dtype={dtype}", "train.device=cuda")
    final = train(config)
    rows = _rows(tmp_path)
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows), rows
    assert _all_finite(final)
