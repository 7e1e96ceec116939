"""The public contract, checked from the outside: every promised name and behaviour called exactly
as the design and the issues write it (names, argument names, defaults, return shapes, exit codes,
one-line errors). One small test per item; the deep numerical checks live in the topic files.

Models are the embedded tiny Qwen3 and tiny specialists of its shape; kernels run the torch
reference (`BIDIRLM_KERNELS=torch`) except a few tiny cases in Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
import warnings
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a core dependency there)
    import tomli as tomllib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import bidirlm
from bidirlm.cli import COMMANDS, build_parser, main
from bidirlm.runtime import compose_omni, load_model, merge
from bidirlm.runtime.embedded import embedded_tiny_model
from bidirlm.runtime.models.media import write_wav
from bidirlm.runtime.training import load_train_config, train, train_config_from_dict
from tests.omni.helpers import image, specialists, tone

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(bidirlm.__file__).resolve().parent
TOWERS = ("model.visual.", "model.audio_tower.", "model.multi_modal_projector.")


@pytest.fixture
def torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


def _params(fn) -> dict[str, inspect.Parameter]:  # noqa: ANN001
    return dict(inspect.signature(fn).parameters)


def _keyword_defaults(fn) -> dict[str, object]:  # noqa: ANN001
    return {
        n: p.default
        for n, p in _params(fn).items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }


def _subparser(name: str):  # noqa: ANN202
    parser = build_parser([name])
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name]


def _options(name: str) -> set[str]:
    return {o for a in _subparser(name)._actions for o in a.option_strings}


def _one_line(text: str) -> None:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    assert len(lines) == 1, text


# --- wave 1: kernels API ------------------------------------------------------------------------


def test_kernels_signatures_and_defaults() -> None:
    from bidirlm.kernels import attention, infonce_loss, mntp_loss

    attn = _params(attention.flash_attn_func)
    assert list(attn)[:3] == ["q", "k", "v"]
    assert _keyword_defaults(attention.flash_attn_func) == {
        "softmax_scale": None,
        "window_size": (-1, -1),
        "softcap": 0.0,
        "key_padding_mask": None,
        "deterministic": False,
        "return_lse": False,
    }
    assert list(_params(attention.flash_attn_varlen_func))[:5] == [
        "q",
        "k",
        "v",
        "cu_seqlens",
        "max_seqlen",
    ]
    assert _keyword_defaults(attention.flash_attn_varlen_func) == {
        "softmax_scale": None,
        "window_size": (-1, -1),
        "softcap": 0.0,
        "deterministic": False,
        "return_lse": False,
    }
    assert list(_params(mntp_loss))[:3] == ["hidden", "weight", "labels"]
    got = _keyword_defaults(mntp_loss)
    assert {k: got[k] for k in ("bias", "ignore_index", "softcap", "reduction")} == {
        "bias": None,
        "ignore_index": -100,
        "softcap": None,
        "reduction": "mean",
    }
    assert list(_params(infonce_loss))[:2] == ["queries", "documents"]
    got = _keyword_defaults(infonce_loss)
    want = {
        "temperature": 0.05,
        "symmetric": False,
        "normalize": True,
        "reduction": "mean",
        "gather_across_devices": False,
    }
    assert {k: got[k] for k in want} == want


def test_package_level_names_accept_both_call_forms(torch_kernels) -> None:
    """`bidirlm.kernels.flash_attn_func` takes bidirlm's keyword form and flash-attn's positional
    one; the varlen function takes `(q, k, v, cu_seqlens, max_seqlen)` as documented."""
    from bidirlm.kernels import flash_attn_func, flash_attn_varlen_func
    from bidirlm.kernels.reference import attention_reference  # noqa: F401 (the CPU path exists)

    q, k, v = (torch.randn(2, 6, 4, 16) for _ in range(3))
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1, 4:] = False
    out, lse = flash_attn_func(
        q, k, v, softmax_scale=0.3, window_size=(2, 2), key_padding_mask=kpm, return_lse=True
    )
    assert out.shape == q.shape and lse.dtype == torch.float32
    causal = flash_attn_func(q, k, v, 0.0, None, True)  # flash-attn positional: causal
    native = flash_attn_func(q, k, v, window_size=(-1, 0))
    torch.testing.assert_close(causal, native)
    cu = torch.tensor([0, 5, 6], dtype=torch.int32)
    packed = flash_attn_varlen_func(q[0], k[0], v[0], cu, 5)
    assert packed.shape == q[0].shape


def _attention64(q, k, v, visible):  # noqa: ANN001, ANN202
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * q.shape[-1] ** -0.5
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v.double())


def test_attention_in_the_interpreter_matches_float64_and_no_visible_key_is_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tiny case through the Triton kernel (interpreter on CPU): GQA, window, a padded key,
    a head dim that is not a power of two; the deterministic backward is bitwise repeatable."""
    monkeypatch.setenv("BIDIRLM_KERNELS", "auto")
    from bidirlm.kernels.attention import flash_attn_func

    torch.manual_seed(1)
    q = torch.randn(1, 5, 4, 24)
    k, v = torch.randn(1, 5, 2, 24), torch.randn(1, 5, 2, 24)
    kpm = torch.tensor([[True, True, False, True, True]])
    out = flash_attn_func(q, k, v, window_size=(1, 1), key_padding_mask=kpm)
    i = torch.arange(5)
    visible = ((i[None, :] >= i[:, None] - 1) & (i[None, :] <= i[:, None] + 1))[None, None]
    visible = visible & kpm[:, None, None, :]
    ref = _attention64(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), visible)
    real = kpm[0]  # a padded query row is not compared (its output is not used)
    assert (out.double() - ref)[:, real].abs().max() < 1e-4
    # every key padded: zeros, never NaN
    none = flash_attn_func(q, k, v, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    assert torch.equal(none, torch.zeros_like(none))
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        flash_attn_func(*leaves, deterministic=True).square().sum().backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        ("attn_rank", "q"),
        ("attn_heads", "k"),
        ("mntp_labels", "labels"),
        ("mntp_reduction", "reduction"),
        ("infonce_temperature", "temperature"),
        ("infonce_m_lt_b", "documents"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_argument(torch_kernels, call: str, argument: str):
    from bidirlm.kernels import flash_attn_func, infonce_loss, mntp_loss

    q = torch.randn(1, 4, 4, 8)
    h, w = torch.randn(6, 8), torch.randn(11, 8)
    calls = {
        "attn_rank": lambda: flash_attn_func(q[0], q, q),
        "attn_heads": lambda: flash_attn_func(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)),
        "mntp_labels": lambda: mntp_loss(h, w, torch.zeros(5, dtype=torch.long)),
        "mntp_reduction": lambda: mntp_loss(h, w, torch.zeros(6, dtype=torch.long), reduction="x"),
        "infonce_temperature": lambda: infonce_loss(h, h, temperature=0.0),
        "infonce_m_lt_b": lambda: infonce_loss(h, h[:3]),
    }
    with pytest.raises(ValueError, match=argument) as err:
        calls[call]()
    assert "\n" not in str(err.value)


def test_mntp_loss_equals_cross_entropy_and_mean_over_nothing_is_zero(torch_kernels) -> None:
    from bidirlm.kernels import mntp_loss

    h = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(37, dtype=torch.float64)
    labels = torch.randint(0, 37, (3, 4))
    labels[0, :2] = -100
    got = mntp_loss(h, w, labels, bias=b, softcap=5.0)
    logits = 5.0 * torch.tanh((h @ w.T + b) / 5.0)
    want = F.cross_entropy(logits.reshape(-1, 37), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    total = mntp_loss(h, w, labels, bias=b, softcap=5.0, reduction="sum")
    want = F.cross_entropy(logits.reshape(-1, 37), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(total.double(), want, rtol=1e-6, atol=1e-6)
    # the caller's labelled-row count (issue 27: no host sync) gives the same loss
    known = mntp_loss(h, w, labels, bias=b, softcap=5.0, num_labelled=int((labels != -100).sum()))
    torch.testing.assert_close(known, got)
    assert _keyword_defaults(mntp_loss)["filter_eps"] is None  # gradient filtering off by default
    nothing = mntp_loss(h, w, torch.full((3, 4), -100))
    nothing.backward()
    assert nothing.item() == 0.0 and h.grad is not None and not h.grad.any()


def test_infonce_equals_sentence_transformers_mnrl(torch_kernels) -> None:
    from sentence_transformers import util

    from bidirlm.kernels import infonce_loss

    q, d = torch.randn(4, 16), torch.randn(7, 16)
    got = infonce_loss(q, d, temperature=0.05)
    # MultipleNegativesRankingLoss(scale=1/temperature): cos_sim * scale, cross-entropy on i
    q64, d64 = q.double(), d.double()
    want = F.cross_entropy(util.cos_sim(q64, d64) * 20.0, torch.arange(4))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    sym = infonce_loss(q, d, temperature=0.05, symmetric=True)
    back = F.cross_entropy(util.cos_sim(d64[:4], q64) * 20.0, torch.arange(4))
    torch.testing.assert_close(sym.double(), (want + back) / 2, rtol=1e-5, atol=1e-5)


def test_ops_trace_with_torch_compile_fullgraph(torch_kernels) -> None:
    from bidirlm.kernels import flash_attn_func, infonce_loss, mntp_loss

    q, k, v = (torch.randn(1, 4, 2, 8, requires_grad=True) for _ in range(3))
    h, w, d = torch.randn(6, 8), torch.randn(9, 8), torch.randn(6, 8)
    labels = torch.tensor([1, -100, 3, 4, -100, 0])

    def step(q, k, v, h, w, d):  # noqa: ANN001, ANN202
        out = flash_attn_func(q, k, v)
        return out.sum() + mntp_loss(h, w, labels) + infonce_loss(h, d)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, h, w, d), step(q, k, v, h, w, d))
    assert hasattr(torch.ops.bidirlm, "flash_attn_fwd")


def test_transformers_register_adds_the_bidirlm_attention() -> None:
    from transformers import AttentionInterface

    from bidirlm.integrations.transformers import register

    register()
    assert "bidirlm" in AttentionInterface._global_mapping


def test_env_prints_the_kernel_choice(capsys: pytest.CaptureFixture) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "BIDIRLM_KERNELS" in out
    kernels = next(x for x in out.splitlines() if x.startswith("kernels "))
    assert kernels.split()[1] in ("torch", "triton")  # never silent: the choice is printed


# --- wave 3: the ops package stands alone -------------------------------------------------------


def test_import_kernels_loads_no_heavy_library() -> None:
    code = (
        "import sys, os\n"
        "os.environ['BIDIRLM_KERNELS'] = 'torch'\n"
        "import torch, bidirlm.kernels as K\n"
        "from bidirlm.kernels import flash_attn_func, infonce_loss, mntp_loss\n"
        "from bidirlm.kernels.flash_attn_compat import flash_attn_with_kvcache\n"
        "from bidirlm.kernels.liger_compat import LigerFusedLinearCrossEntropyLoss\n"
        "q = torch.randn(1, 4, 2, 8, requires_grad=True)\n"
        "flash_attn_func(q, q, q).sum().backward()\n"
        "h = torch.randn(4, 8, requires_grad=True)\n"
        "(mntp_loss(h, torch.randn(5, 8), torch.tensor([0, 1, -100, 4])) + infonce_loss(h, h))"
        ".backward()\n"
        "heavy = ('transformers', 'datasets', 'sentence_transformers', 'scipy', 'PIL')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_core_dependencies_exclude_the_heavy_libraries_and_tensorboard_is_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def name(req: str) -> str:
        return req.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()

    core = {name(r).lower() for r in project["dependencies"]}
    assert not core & {"transformers", "datasets", "sentence-transformers", "scipy", "pillow"}
    extras = project["optional-dependencies"]
    assert "tensorboard" in extras
    carried = {name(r).lower() for reqs in extras.values() for r in reqs}
    assert {"transformers", "datasets", "sentence-transformers", "scipy", "pillow"} <= carried
    assert any(name(r) == "tensorboard" for r in extras["tensorboard"])


def test_compile_check_tooling_is_not_in_the_ops_package() -> None:
    names = [p.name for p in (PACKAGE / "kernels").rglob("*.py")]
    assert not [n for n in names if "compile" in n], names
    for path in (PACKAGE / "kernels").rglob("*.py"):
        assert "ptxas" not in path.read_text(encoding="utf-8"), path
    # it stays reachable as `bidirlm bench compile` (the suite lives in the source tree's bench/)
    from bidirlm.commands.bench import SUITES, bench_dir

    assert "compile" in SUITES and (bench_dir() / "compile.py").is_file()


# The phase table (one module per phase), trainer.py's size and the import-circle walk are
# tests/training/test_phases.py and tests/test_imports.py.


# --- wave 3: the performance engineer's workbench -----------------------------------------------

COMPUTING = (
    "train",
    "merge",
    "compose",
    "pipeline",
    "export",
    "encode",
    "eval",
    "predict",
    "finetune-sweep",
    "domain-transfer",
    "profile",
    "check",
    "demo",
    "bench",  # its suites run with OMP_NUM_THREADS set from --threads
)


@pytest.mark.parametrize("command", COMPUTING)
def test_threads_on_every_command_that_computes(command: str) -> None:
    assert "--threads" in _options(command)


def test_workbench_options_exist() -> None:
    assert {"--steps", "--set"} <= _options("profile")
    assert "--plot" in _options("bench")
    assert "--rope-from" in _options("compose")
    assert "--format" in _options("export")
    assert {"--omni", "--quick"} <= _options("demo")
    assert "--quick" in _options("bench")


def test_bench_without_a_suite_lists_the_suites_and_runs_nothing(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bidirlm", "bench"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for suite in ("attention", "mntp_loss", "infonce", "merge", "compile"):
        assert suite in run.stdout
    assert list(tmp_path.iterdir()) == []


def test_bench_suite_plot_writes_a_png(tmp_path: Path, torch_kernels) -> None:
    results = tmp_path / "results"
    argv = ["bench", "mntp_loss", "--quick", "--plot", "--results", str(results)]
    assert main([*argv, "--threads", "0"]) == 1  # one-line error, before anything is written
    assert not results.exists()
    rc = main([*argv, "--threads", "1"])
    assert rc == 0
    pngs = list(results.glob("*.png"))
    assert pngs and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(results.glob("*.jsonl"))


def test_profile_writes_a_trace_and_a_breakdown(tmp_path: Path, torch_kernels) -> None:
    out = tmp_path / "prof"
    config = ROOT / "examples" / "tiny-mntp.toml"
    rc = main(
        ["profile", str(config), "--steps", "2", "--set", "data.tokens_per_batch=128"]
        + ["--output", str(out), "--threads", "1"]
    )
    assert rc == 0
    trace = json.loads((out / "trace.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    assert any("bidirlm.mntp_loss" in str(e.get("name", "")) for e in events)
    assert "MNTP loss" in (out / "breakdown.md").read_text()


@pytest.fixture(scope="module")
def bidirectional_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bi") / "bi"
    load_model(embedded_tiny_model(), bidirectional=True).save_pretrained(out)
    return out


def test_check_exits_1_on_a_causal_model_and_0_on_a_bidirectional_one(
    bidirectional_tiny: Path, torch_kernels, capsys: pytest.CaptureFixture
) -> None:
    assert main(["check", str(embedded_tiny_model()), "--threads", "1"]) == 1
    out = capsys.readouterr()
    assert "causal" in (out.out + out.err)
    assert main(["check", str(bidirectional_tiny), "--threads", "1"]) == 0


# --- wave 2/3: BidirLM-Omni: compose, the released layout, export, media ------------------------


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny specialists; the vision model's RoPE theta differs from the text model's (as the real
    Qwen3-VL-2B's 5e6 differs from Qwen3-1.7B's 1e6)."""
    root = tmp_path_factory.mktemp("parts")
    out = specialists(root)
    config = json.loads((out["vision"] / "config.json").read_text())
    text = config["text_config"]
    if isinstance(text.get("rope_parameters"), dict):
        text["rope_parameters"]["rope_theta"] = 50000.0
    if "rope_theta" in text:
        text["rope_theta"] = 50000.0
    (out["vision"] / "config.json").write_text(json.dumps(config))
    return out


def _theta(config: dict) -> float:
    text = config["text_config"]
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    return float(text.get("rope_theta") or params["rope_theta"])


@pytest.fixture(scope="module")
def omni(parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omni") / "omni"
    args = ["--text", str(parts["text"]), "--vision", str(parts["vision"])]
    rc = main(["compose", *args, "--audio", str(parts["audio"]), str(out), "--threads", "1"])
    assert rc == 0
    return out


def test_compose_default_rope_from_is_vision_and_recorded(omni: Path) -> None:
    config = json.loads((omni / "config.json").read_text())
    assert config["model_type"] == "bidirlm_omni"
    assert config["rope_from"] == "vision"
    assert _theta(config) == 50000.0


@pytest.mark.parametrize("source", ["text", "audio"])
def test_compose_rope_from_option_is_recorded(
    parts: dict[str, Path], tmp_path: Path, source: str, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "omni"
    rc = main(
        ["compose", "--text", str(parts["text"]), "--vision", str(parts["vision"])]
        + ["--audio", str(parts["audio"]), str(out), "--rope-from", source, "--weights", "1,1,1"]
    )
    assert rc == 0
    assert f"rope-from {source}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["rope_from"] == source and _theta(config) == 10000.0


def test_compose_default_without_vision_is_text(parts: dict[str, Path], tmp_path: Path) -> None:
    result = compose_omni(parts["text"], None, parts["audio"], tmp_path / "omni")
    config = json.loads((Path(result.output) / "config.json").read_text())
    assert config["rope_from"] == "text" and _theta(config) == 10000.0


def test_compose_rope_from_bad_value_is_refused(parts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # argparse choices
        main(["compose", "--text", str(parts["text"]), str(tmp_path / "o"), "--rope-from", "x"])
    with pytest.raises(ValueError, match="rope_from"):
        compose_omni(parts["text"], parts["vision"], None, tmp_path / "o2", rope_from="x")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_compose_and_export_refusals_are_one_line(
    parts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["compose", "--text", str(parts["text"]), "--audio", str(parts["audio"])]
    assert main([*args, str(tmp_path / "o"), "--rope-from", "vision"]) == 1  # no vision model
    _one_line(capsys.readouterr().err)
    text = str(embedded_tiny_model())
    assert main(["export", text, str(tmp_path / "e"), "--format", "bidirlm-omni"]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "bidirlm_omni" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_omni_encode_mixed_items_and_empty(omni: Path, tmp_path: Path, torch_kernels) -> None:
    model = load_model(omni)
    pic = tmp_path / "pic.png"
    image(3).save(pic)
    wav = tmp_path / "clip.wav"
    write_wav(wav, tone(300)["array"], 16000)
    items = ["a caption", image(1), str(pic), tone(440), str(wav)]
    emb = model.encode(items)
    d = emb.shape[1]
    assert emb.shape == (5, d) and torch.isfinite(emb).all()
    assert tuple(model.encode([]).shape) == (0, d)
    with pytest.raises(ValueError, match="nope.png"):
        model.encode([str(tmp_path / "nope.png")])


def _names(folder: Path) -> set[str]:
    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            names |= set(h.keys())
    return names


def test_export_bidirlm_omni_layout_loads_back_identically(
    omni: Path, tmp_path: Path, torch_kernels
) -> None:
    out = tmp_path / "released"
    assert main(["export", str(omni), str(out), "--format", "bidirlm-omni", "--threads", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bidirlm_omni"
    assert {"text_config", "vision_config", "audio_config"} <= set(config)
    prefixes = {n.split(".")[0] for n in _names(out)}
    assert prefixes == {"language_model", "visual", "audio_tower"}
    items = ["text", image(0), tone(500)]
    torch.testing.assert_close(load_model(out).encode(items), load_model(omni).encode(items))
    # and the released layout exports again to the same tensors
    again = tmp_path / "again"
    assert main(["export", str(out), str(again), "--format", "bidirlm-omni"]) == 0
    a, b = load_file(next(out.glob("*.safetensors"))), load_file(next(again.glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_bidirlm_text_layout_is_bidirectional(tmp_path: Path, torch_kernels) -> None:
    out = tmp_path / "text"
    assert main(["export", str(embedded_tiny_model()), str(out), "--format", "bidirlm"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config.get("is_causal") is False or config.get("use_bidirectional_attention") is True
    texts = ["def f(x): return x", "import os"]
    ref = load_model(embedded_tiny_model(), bidirectional=True).encode(texts)
    torch.testing.assert_close(load_model(out).encode(texts), ref)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_media_records_fine_tune_an_omni_model(
    omni: Path, tmp_path: Path, kind: str, torch_kernels
) -> None:
    (tmp_path / "media").mkdir()
    rows = []
    for i in range(6):
        if kind == "image":
            image(i).save(tmp_path / "media" / f"{i}.png")
            rows.append({"image": f"media/{i}.png", "text": "bright?", "label": ["a", "b"][i % 2]})
        else:
            write_wav(tmp_path / "media" / f"{i}.wav", tone(200 + 900 * (i % 2))["array"], 16000)
            rows.append({"audio": f"media/{i}.wav", "text": "pitch?", "label": ["a", "b"][i % 2]})
    data = _jsonl(tmp_path / "data.jsonl", rows)
    config = train_config_from_dict(
        {
            "model": str(omni),
            "phase": "sequence-classification",
            "train": {"output": str(tmp_path / "run"), "steps": 2, "progress_bar": False},
            "optim": {"lr": 1e-3},
            "data": {"batch_size": 3, "max_seq_len": 16, "sources": [{"path": str(data)}]},
            "task": {"dev": str(data), "eval_every": 2},
        }
    )
    final = Path(train(config))
    assert final.is_dir()
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("dev" in r for r in metrics)
    before, after = load_file(next(omni.glob("*.safetensors"))), {}
    for f in final.glob("*.safetensors"):
        after.update(load_file(f))
    towers = [n for n in before if n.startswith(TOWERS)]
    assert towers and all(torch.equal(before[n], after[n]) for n in towers)
    # `bidirlm predict` labels the same media records with the fine-tuned classifier
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(final), "--input", str(data), "--output", str(out)]) == 0
    predicted = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(predicted) == 6 and all(r["label"] in ("a", "b") for r in predicted)


def test_shipped_omni_recipe_has_a_compose_phase(tmp_path: Path) -> None:
    recipes = [p for p in (PACKAGE / "recipe").glob("*.toml") if "omni" in p.name]
    assert recipes
    recipe = tomllib.loads(recipes[0].read_text())
    kinds = {name: table.get("kind") for name, table in recipe.items() if isinstance(table, dict)}
    assert "compose" in kinds.values()
    assert "compose" in recipe["recipe"]["phases"]


def test_omni_recipe_check_names_missing_inputs_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "omni-2.5b", "--check"]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "compose.vision" in err and "compose.audio" in err
    assert list(tmp_path.iterdir()) == []


# --- wave 3: large runs --------------------------------------------------------------------------

PAPER_RECIPES = ("qwen3-0.6b", "qwen3-1.7b", "gemma3-270m", "gemma3-1b")


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_carry_table_2_and_3_sizes_and_seed_42(name: str) -> None:
    recipe = tomllib.loads((PACKAGE / "recipe" / f"{name}.toml").read_text())
    trains = {k: t for k, t in recipe.items() if isinstance(t, dict) and t.get("kind") == "train"}
    assert trains
    for table in trains.values():
        assert table["train"]["seed"] == 42
    steps = {table["phase"]: table["train"] for table in trains.values()}
    assert steps["mntp"]["tokens_per_step"] == 2359296
    assert steps["contrastive"]["pairs_per_step"] == 512


def test_pipeline_check_names_missing_data_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """`--check` of a paper recipe on a real model folder fails in one line on the data files
    the user has not provided."""
    monkeypatch.chdir(tmp_path)
    rc = main(
        ["pipeline", "qwen3-0.6b", "--check", "--set", f"recipe.base={embedded_tiny_model()}"]
    )
    out = capsys.readouterr()
    assert rc == 1 and "does not exist" in out.err  # the data files of the recipe are absent
    _one_line(out.err)


def test_mfu_peaks_by_device_name_count_an_mi250x_per_gcd() -> None:
    from bidirlm.runtime.training.mfu import PEAK_FLOPS, peak_flops

    assert peak_flops("AMD Instinct MI250X", "bfloat16") == pytest.approx(191.5e12)
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989e12)
    assert peak_flops("NVIDIA H100 PCIe", "float16") == pytest.approx(756e12)
    assert peak_flops("AMD Instinct MI300X", "bfloat16") == pytest.approx(1307e12)
    assert peak_flops("Some Unknown GPU") is None
    assert {"H200", "A100", "MI325"} <= {k for k in PEAK_FLOPS}


def _parquet_folder(folder: Path) -> Path:
    import pyarrow as pa  # the [train] extra
    import pyarrow.parquet as pq

    from bidirlm.runtime.embedded import corpus

    texts = [t for t in corpus.python_docs_texts() if t.strip()][:40]
    (folder / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:20]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"text": texts[20:]}), folder / "sub" / "part-1.parquet")
    return folder


def test_tokens_per_step_derives_accumulation_on_a_parquet_folder_bf16(
    tmp_path: Path, torch_kernels
) -> None:
    data = _parquet_folder(tmp_path / "shards")
    config = train_config_from_dict(
        {
            "model": "embedded:tiny",
            "phase": "causal",
            "train": {
                "output": str(tmp_path / "run"),
                "steps": 2,
                "tokens_per_step": 256,
                "dtype": "bfloat16",
                "progress_bar": False,
            },
            "data": {"tokens_per_batch": 128, "max_seq_len": 64, "sources": [{"path": str(data)}]},
        }
    )
    assert config.train.tokens_per_step == 256
    train(config)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps and all(r["grad_accum"] == 2 for r in steps)
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert all(r["tokens_per_s"] > 0 for r in steps)  # on a CPU: tokens/s, MFU unknown
    assert all(r.get("mfu") in (None, "unknown") for r in steps)
    # TensorBoard event files appear when the package (the `tensorboard` extra) is installed
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))


def test_tokens_per_step_not_a_multiple_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokens_per_step") as err:
        config = train_config_from_dict(
            {
                "model": "embedded:tiny",
                "phase": "causal",
                "train": {"output": str(tmp_path / "r"), "steps": 1, "tokens_per_step": 200},
                "data": {"tokens_per_batch": 128, "sources": [{"path": "embedded:python-docs"}]},
            }
        )
        train(config)
    assert "\n" not in str(err.value)


def test_contrastive_sources_take_instruction_symmetric_and_pairs_per_step_bf16(
    tmp_path: Path, torch_kernels
) -> None:
    rows = [{"query": f"question {i}", "positive": f"answer {i} text"} for i in range(16)]
    data = _jsonl(tmp_path / "pairs.jsonl", rows)
    config = train_config_from_dict(
        {
            "model": str(embedded_tiny_model()),
            "phase": "contrastive",
            "train": {
                "output": str(tmp_path / "run"),
                "steps": 1,
                "pairs_per_step": 8,
                "dtype": "bfloat16",
                "progress_bar": False,
            },
            "data": {
                "batch_size": 4,
                "sources": [
                    {"path": str(data), "instruction": "Same meaning: ", "symmetric": True}
                ],
            },
        }
    )
    source = config.data.sources[0]
    assert source.instruction == "Same meaning: " and source.symmetric is True
    train(config)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_accum"] for r in rows if "loss" in r] == [2]


# --- wave 3: drop-in compatibility ---------------------------------------------------------------


def test_liger_compat_matches_liger_signatures() -> None:
    from liger_kernel.ops.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyFunction as TheirFunction,
    )
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss as TheirLoss,
    )

    from bidirlm.kernels import liger_compat
    from bidirlm.kernels.liger_compat import LigerFusedLinearCrossEntropyLoss

    assert callable(liger_compat.liger_fused_linear_cross_entropy)
    assert liger_compat.CrossEntropyOutput is not None

    def described(fn) -> list[tuple[str, object]]:  # noqa: ANN001
        return [(n, p.default) for n, p in _params(fn).items() if n not in ("self", "ctx")]

    assert described(LigerFusedLinearCrossEntropyLoss.__init__) == described(TheirLoss.__init__)
    assert [n for n, _ in described(LigerFusedLinearCrossEntropyLoss.forward)] == [
        n for n, _ in described(TheirLoss.forward)
    ]
    # Liger's Function takes 15 arguments before its backend choices (ce_impl, ce_mode, ...)
    assert [n for n, _ in described(TheirFunction.forward)][:3] == [
        "_input",
        "weight",
        "target",
    ]


def test_liger_compat_loss_and_function_forms(torch_kernels) -> None:
    from bidirlm.kernels import LigerFusedLinearCrossEntropyFunction as Function
    from bidirlm.kernels import LigerFusedLinearCrossEntropyLoss as Loss

    torch.manual_seed(0)
    weight = torch.randn(50, 16, requires_grad=True)
    hidden = torch.randn(12, 16, requires_grad=True)
    target = torch.randint(0, 50, (12,))
    target[3] = -100
    bias = torch.randn(50)
    loss = Loss(label_smoothing=0.1)(weight, hidden, target, bias)
    want = F.cross_entropy(hidden @ weight.T + bias, target, label_smoothing=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    out = Loss(return_z_loss=True, lse_square_scale=1e-4, return_token_accuracy=True)(
        weight, _input=hidden, target=target
    )
    assert torch.isfinite(out.loss) and out.z_loss is not None and out.token_accuracy is not None
    # Liger's 15 positional arguments: _input, weight, target, bias, ce_weight, ignore_index,
    # lse_square_scale, label_smoothing, reduction, softcap, return_z_loss, accum_dtype,
    # use_token_scaling, return_token_accuracy, return_predicted_tokens
    args = (hidden, weight, target, None, None, -100, 0.0, 0.0, "mean", None, False)
    got = Function.apply(*args, torch.float32, False, True, True)
    assert isinstance(got, tuple) and len(got) == 4
    loss, z_loss, accuracy, predicted = got
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, target))
    valid = target != -100
    argmax = (hidden @ weight.T).argmax(-1)
    torch.testing.assert_close(accuracy, (argmax == target)[valid].float().mean())
    assert torch.equal(predicted[valid], argmax[valid])


def test_flash_attn_compat_takes_tensors_where_flash_attn_does(torch_kernels) -> None:
    from bidirlm.kernels.flash_attn_compat import flash_attn_func, flash_attn_varlen_func

    q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    window = torch.tensor([2, 1])
    by_tensor = flash_attn_func(q, k, v, window_size=window, softmax_scale=torch.tensor(0.2))
    by_int = flash_attn_func(q, k, v, window_size=(2, 1), softmax_scale=0.2)
    torch.testing.assert_close(by_tensor, by_int)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    a = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, torch.tensor(5), torch.tensor(5))
    b = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, np.float32(0.0))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, k, v, 0.1)
    # numpy scalars and a 0-d tensor softcap, as flash-attn's tests pass them
    np_form = flash_attn_func(
        q, k, v, 0.0, None, np.bool_(True), (np.int64(2), np.int64(0)), torch.tensor(3.0)
    )
    ref = flash_attn_func(q, k, v, causal=True, window_size=(2, 0), softcap=3.0)
    torch.testing.assert_close(np_form, ref)


def test_flash_attn_compat_lse_is_plus_inf_without_a_visible_key(torch_kernels) -> None:
    from bidirlm.kernels.flash_attn_compat import flash_attn_func

    q, k, v = torch.randn(1, 4, 2, 16), torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    # bottom-right causal, Sq=4 > Sk=2: queries 0 and 1 see no key
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    assert torch.isinf(lse[:, :, :2]).all() and (lse[:, :, :2] > 0).all()
    assert torch.isfinite(lse[:, :, 2:]).all()


def test_flash_attn_with_kvcache_writes_the_cache_and_attends(torch_kernels) -> None:
    from bidirlm.kernels.flash_attn_compat import flash_attn_func, flash_attn_with_kvcache

    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(2, 10, 2, 16), torch.randn(2, 10, 2, 16)
    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    old = k_cache.clone()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=4)
    assert torch.equal(k_cache[:, 4:7], k) and torch.equal(k_cache[:, :4], old[:, :4])
    ref = flash_attn_func(q, k_cache[:, :7], v_cache[:, :7])
    torch.testing.assert_close(out, ref)
    # per-sequence cache lengths as an int32 tensor [B], as flash-attn takes them
    lengths = torch.tensor([2, 5], dtype=torch.int32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths)
    for b, n in enumerate((5, 8)):
        ref = flash_attn_func(q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n])
        torch.testing.assert_close(out[b : b + 1], ref)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_with_kvcache(
            q, k_cache, v_cache, block_table=torch.zeros(2, 1, dtype=torch.int32)
        )


def _st_losses():  # noqa: ANN202
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:  # sentence-transformers before the sentence_transformer package
        from sentence_transformers import losses
    return losses


def test_sentence_transformers_fused_classes() -> None:
    losses = _st_losses()

    from bidirlm.integrations import sentence_transformers as ours

    symmetric = "CachedMultipleNegativesSymmetricRankingLoss"
    pairs = {
        f"Fused{symmetric}": symmetric,
        "FusedGISTEmbedLoss": "GISTEmbedLoss",
        "FusedCachedGISTEmbedLoss": "CachedGISTEmbedLoss",
        "FusedMultipleNegativesRankingLoss": "MultipleNegativesRankingLoss",
        "FusedCachedMultipleNegativesRankingLoss": "CachedMultipleNegativesRankingLoss",
    }
    for mine, theirs in pairs.items():
        assert issubclass(getattr(ours, mine), getattr(losses, theirs)), mine


@pytest.fixture(scope="module")
def st_model(bidirectional_tiny: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from sentence_transformers import SentenceTransformer

    out = tmp_path_factory.mktemp("st") / "st"
    assert main(["export", str(bidirectional_tiny), str(out), "--pooling", "mean"]) == 0
    return SentenceTransformer(str(out), device="cpu")


@pytest.mark.parametrize(
    "name",
    [
        "FusedGISTEmbedLoss",
        "FusedCachedGISTEmbedLoss",
        "FusedCachedMultipleNegativesSymmetricRankingLoss",
    ],
)
def test_fused_st_losses_equal_the_originals(st_model, name: str, torch_kernels) -> None:
    losses = _st_losses()

    from bidirlm.integrations import sentence_transformers as ours

    original = getattr(losses, name.removeprefix("Fused"))
    kwargs = {"guide": st_model} if "GIST" in name else {}
    if "Cached" in name:
        kwargs["mini_batch_size"] = 2
    texts = [["what is a list", "how to open a file", "sort numbers"]]
    texts += [["a list is a sequence", "open() returns a file", "sorted() sorts"]]
    values = []
    for cls in (getattr(ours, name), original):
        loss = cls(st_model, **kwargs)
        features = [st_model.tokenize(t) for t in texts]
        values.append(loss(features, None))
    torch.testing.assert_close(values[0], values[1], rtol=1e-4, atol=1e-4)


# --- wave 3: mergekit methods and ignored parameters ----------------------------------------------

NEW_METHODS = {
    "sce": {"select_topk": 0.5},
    "ram": {},
    "ramplus_tl": {"r": 0.05, "alpha": 1.0},
    "multislerp": {},
    "karcher": {"max_iter": 5},
    "arcee_fusion": {},
    "nearswap": {"t": 0.001},
}


@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from tests.merging.fixtures import qwen3

    root = tmp_path_factory.mktemp("three")
    return [qwen3(root / name, seed, shard=None) for seed, name in enumerate("abc")]


@pytest.mark.parametrize("method", sorted(NEW_METHODS))
def test_merge_has_the_new_mergekit_methods(three_models, tmp_path: Path, method: str) -> None:
    a, b, c = (str(p) for p in three_models)
    config = {
        "merge_method": method,
        "models": [  # mergekit's own test configs give every model a weight
            {"model": a, "parameters": {"weight": 0.6}},
            {"model": b, "parameters": {"weight": 0.4}},
        ],
        "dtype": "bfloat16",
        "base_model": a if method in ("arcee_fusion", "nearswap") else c,
    }
    if NEW_METHODS[method]:
        config["parameters"] = NEW_METHODS[method]
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), str(tmp_path / "out"), "--threads", "1", "--quiet"]) == 0
    merged = load_file(next((tmp_path / "out").glob("*.safetensors")))
    assert merged and all(torch.isfinite(t.float()).all() for t in merged.values())


def test_merge_of_a_hub_id_says_local_folders_only(tmp_path: Path, capsys) -> None:
    config = {
        "merge_method": "linear",
        "models": [{"model": "Qwen/Qwen3-0.6B"}],
        "dtype": "float32",
    }
    (tmp_path / "m.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "m.yml"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "local" in err and not (tmp_path / "out").exists()


def test_merge_accepts_parameters_mergekit_ignores_with_a_warning(
    three_models, tmp_path: Path
) -> None:
    a, b = (str(p) for p in three_models[:2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge(
            [a, b],
            [0.5, 0.5],
            tmp_path / "out",
            method="slerp",
            base=a,
            parameters={"t": 0.3, "density": 0.5},
        )
    lines = [str(w.message) for w in caught if "ignores" in str(w.message)]
    assert len(lines) == 1 and "density" in lines[0]
    assert (tmp_path / "out" / "config.json").is_file()


# --- wave 1/2: runtime API and CLI ----------------------------------------------------------------


def test_runtime_signatures() -> None:
    from bidirlm.runtime.models.encoder import Encoder

    assert list(_params(load_model))[:1] == ["path"]
    got = _keyword_defaults(load_model)
    assert {k: got[k] for k in ("dtype", "device", "bidirectional")} == {
        "dtype": None,
        "device": None,
        "bidirectional": True,
    }
    forward = _keyword_defaults(Encoder.forward)
    want = {"attention_mask": None, "cu_seqlens": None, "max_seqlen": None, "position_ids": None}
    assert {k: forward[k] for k in want} == want
    assert list(_params(merge))[:3] == ["models", "weights", "output"]
    got = _keyword_defaults(merge)
    assert got["method"] == "linear" and got["base"] is None
    assert list(_params(compose_omni))[:4] == ["text", "vision", "audio", "output"]
    assert _keyword_defaults(compose_omni)["rope_from"] is None  # None: the documented default


def test_text_encoder_contract(tmp_path: Path, torch_kernels) -> None:
    model = load_model(embedded_tiny_model())
    vocab, d = model.lm_head_weight.shape  # [V, d]
    config = json.loads((Path(embedded_tiny_model()) / "config.json").read_text())
    assert vocab == config["vocab_size"]
    assert tuple(model.encode([]).shape) == (0, d)
    ids = torch.randint(0, 100, (2, 5))
    hidden = model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert hidden.shape == (2, 5, d)
    packed = model(ids.reshape(-1), cu_seqlens=torch.tensor([0, 5, 10], dtype=torch.int32),
                   max_seqlen=5)  # fmt: skip
    assert packed.shape == (10, d)
    torch.testing.assert_close(packed.reshape(2, 5, d), hidden, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "bi")
    config = json.loads((tmp_path / "bi" / "config.json").read_text())
    assert config["is_causal"] is False


def test_released_remote_code_text_config_loads_bidirectional(tmp_path: Path) -> None:
    """A released BidirLM text checkpoint (remote code, its own model_type) loads with our
    modules, bidirectional, no remote code run."""
    import shutil

    remote = tmp_path / "BidirLM-0.6B"
    shutil.copytree(embedded_tiny_model(), remote)
    raw = json.loads((remote / "config.json").read_text())
    raw.update(
        model_type="bidirlm",
        architectures=["BidirLMQwen3Model"],
        auto_map={"AutoConfig": "configuration.BidirLMConfig", "AutoModel": "modeling.BidirLM"},
    )
    (remote / "config.json").write_text(json.dumps(raw))
    model = load_model(remote)
    texts = ["a released encoder", "reads as Qwen3"]
    ref = load_model(embedded_tiny_model(), bidirectional=True).encode(texts)
    torch.testing.assert_close(model.encode(texts), ref)


def test_gemma3_bidirectional_is_recorded_the_transformers_way(tmp_path: Path) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
    )  # fmt: skip
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "g")
    load_model(tmp_path / "g").save_pretrained(tmp_path / "bi")
    saved = json.loads((tmp_path / "bi" / "config.json").read_text())
    assert saved["use_bidirectional_attention"] is True


def test_every_documented_command_exists() -> None:
    documented = {"env", "train", "merge", "export", "encode", "eval", "bench", "demo"}
    documented |= {"compose", "pipeline", "predict", "finetune-sweep", "domain-transfer"}
    documented |= {"profile", "check"}
    assert documented <= set(COMMANDS)


def test_unknown_config_key_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid keys") as err:
        train_config_from_dict(
            {"model": "embedded:tiny", "phase": "mntp", "train": {"output": "x", "stepz": 3}}
        )
    assert "stepz" in str(err.value) and "steps" in str(err.value)


@pytest.mark.parametrize(
    ("example", "phase"),
    [("tiny-seqcls.toml", "sequence-classification"), ("tiny-tokcls.toml", "token-classification")],
)
def test_fine_tuning_examples_ship(example: str, phase: str) -> None:
    config = tomllib.loads((ROOT / "examples" / example).read_text())
    assert config["phase"] == phase
    assert load_train_config(ROOT / "examples" / example, []).phase == phase


def test_token_budget_presets_and_warmup_fraction() -> None:
    def config(budget: str):  # noqa: ANN202
        return train_config_from_dict(
            {
                "model": "embedded:tiny",
                "phase": "mntp",
                "train": {"output": "x", "tokens_per_step": 2359296, "token_budget": budget},
                "optim": {"warmup_fraction": 0.01},
                "data": {"tokens_per_batch": 8192, "sources": [{"path": "embedded:python-docs"}]},
            }
        )

    ablation, scaling = config("ablation"), config("scaling")
    assert ablation.train.steps == -(-10_000_000_000 // 2359296)
    assert scaling.train.steps == -(-30_000_000_000 // 2359296)
    assert ablation.optim.warmup_fraction == 0.01


def test_heldout_section_parses() -> None:
    config = train_config_from_dict(
        {
            "model": "embedded:tiny",
            "phase": "mntp",
            "train": {"output": "x", "steps": 2},
            "data": {"tokens_per_batch": 128, "sources": [{"path": "embedded:python-docs"}]},
            "heldout": {"every": 1, "tokens": 64, "sources": [{"path": "embedded:python-code"}]},
        }
    )
    assert config.heldout.every == 1 and config.heldout.sources[0].path == "embedded:python-code"


def test_one_json_lines_reader_names_file_and_line(tmp_path: Path) -> None:
    from bidirlm.runtime.jsonl import read_jsonl

    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2") as err:
        read_jsonl(path)
    assert "\n" not in str(err.value)


def test_flash_attn_varlen_keywords_and_infonce_gather_single_process(torch_kernels) -> None:
    from bidirlm.kernels import infonce_loss
    from bidirlm.kernels.flash_attn_compat import flash_attn_varlen_func

    q = torch.randn(7, 2, 16)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    a = flash_attn_varlen_func(
        q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4, max_seqlen_k=4, causal=True
    )
    b = flash_attn_varlen_func(q, q, q, cu_seqlens=cu, max_seqlen=4, window_size=(-1, 0))
    torch.testing.assert_close(a, b)
    h, d = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(
        infonce_loss(h, d, gather_across_devices=True), infonce_loss(h, d)
    )  # one process: gathering is the identity


def test_merge_cli_warns_once_about_an_ignored_parameter(
    three_models, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """mergekit's own slerp test config carries a `weight` that mergekit ignores: it merges,
    with one warning line naming the parameter."""
    a, b = (str(p) for p in three_models[:2])
    config = {
        "merge_method": "slerp",
        "base_model": a,
        "models": [
            {"model": a, "parameters": {"weight": 0.6}},
            {"model": b, "parameters": {"weight": 0.4}},
        ],
        "parameters": {"t": 0.35},
        "dtype": "bfloat16",
    }
    (tmp_path / "slerp.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "slerp.yml"), str(tmp_path / "out"), "--quiet"]) == 0
    captured = capsys.readouterr()
    notes = [x for x in (captured.out + captured.err).splitlines() if "ignores" in x]
    assert len(notes) == 1 and "weight" in notes[0]


def test_public_ops_run_in_named_profiler_ranges(torch_kernels) -> None:
    from torch.profiler import profile

    from bidirlm.kernels import flash_attn_func, infonce_loss, mntp_loss

    q = torch.randn(1, 4, 2, 8)
    h = torch.randn(4, 8)
    with profile() as prof:
        flash_attn_func(q, q.clone(), q.clone())
        mntp_loss(h, torch.randn(6, 8), torch.tensor([0, 1, -100, 5]))
        infonce_loss(h, h.clone())
    names = {e.name for e in prof.events()}
    assert {"bidirlm.flash_attn", "bidirlm.mntp_loss", "bidirlm.infonce_loss"} <= names


# --- issue 24: what a new user hit (cheap end-to-end checks of the promised behaviour) -----------


def test_encode_max_length_above_the_model_is_clamped_with_a_notice(
    tmp_path: Path, capsys: pytest.CaptureFixture, torch_kernels
) -> None:
    (tmp_path / "in.txt").write_text("hello world\nsecond line\n")
    argv = ["encode", str(embedded_tiny_model()), "--input", str(tmp_path / "in.txt")]
    argv += ["--output", str(tmp_path / "e.npy"), "--max-length", "1000000000", "--threads", "1"]
    assert main(argv) == 0
    assert "max_position_embeddings" in capsys.readouterr().err
    assert np.load(tmp_path / "e.npy").shape[0] == 2


def test_wrong_typed_config_field_is_one_line_naming_field_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(embedded_tiny_model(), model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = "1024"
    (model / "config.json").write_text(json.dumps(config))
    (tmp_path / "in.txt").write_text("hello\n")
    argv = ["encode", str(model), "--input", str(tmp_path / "in.txt")]
    assert main([*argv, "--output", str(tmp_path / "e.npy")]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "vocab_size" in err and "config.json" in err
    assert not (tmp_path / "e.npy").exists()


def test_explicit_kind_dicts_remove_the_doubt(omni: Path, torch_kernels) -> None:
    model = load_model(omni)
    with pytest.raises(ValueError, match="nope.png"):
        model.encode(["/x/nope.png"])  # a bare string that looks like a media path must exist
    as_text = model.encode([{"text": "/x/nope.png"}])  # stated as text: embedded as text
    assert as_text.shape[0] == 1 and torch.isfinite(as_text).all()
    torch.testing.assert_close(model.encode([{"text": "a caption"}]), model.encode(["a caption"]))
    pic = image(5)
    torch.testing.assert_close(model.encode([{"image": pic}]), model.encode([pic]))
