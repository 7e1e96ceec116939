"""The public contract, checked from the outside: every promised name and behaviour called exactly
as the design and the issues write it (names, argument names, defaults, return shapes, exit codes,
one-line errors). One small test per item; the deep numerical checks live in the topic files.

Models are the embedded tiny Qwen3 and tiny specialists of its shape; kernels run the torch
reference (`BIDIRLM_KERNELS=torch`) except a few tiny cases in Triton's interpreter.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

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
    """A tiny case through the Triton kernel (interpreter on CPU): GQA, window, a padded key."""
    monkeypatch.setenv("BIDIRLM_KERNELS", "auto")
    from bidirlm.kernels.attention import flash_attn_func

    torch.manual_seed(1)
    q = torch.randn(1, 5, 4, 16)
    k, v = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
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
    assert "BIDIRLM_KERNELS" in out or "kernel" in out.lower()


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
    assert any(name(r) == "tensorboard" for r in extras["tensorboard"])


def test_compile_check_tooling_is_not_in_the_ops_package() -> None:
    names = [p.name for p in (PACKAGE / "kernels").rglob("*.py")]
    assert not [n for n in names if "compile" in n], names
    for path in (PACKAGE / "kernels").rglob("*.py"):
        assert "ptxas" not in path.read_text(encoding="utf-8"), path
    assert "compile" in _subparser("bench").format_help() or main(["bench"]) == 0


def test_phases_are_one_module_each_in_one_registry() -> None:
    from bidirlm.runtime.training import PHASES

    folder = PACKAGE / "runtime" / "training" / "phases"
    want = {
        "causal": "causal",
        "mntp": "mntp",
        "contrastive": "contrastive",
        "multimodal-contrastive": "multimodal_contrastive",
        "sequence-classification": "sequence_classification",
        "token-classification": "token_classification",
    }
    for phase, module in want.items():
        assert (folder / f"{module}.py").is_file(), module
        assert phase in PHASES, phase
        cls = PHASES[phase] if isinstance(PHASES[phase], type) else type(PHASES[phase])
        assert cls.__module__ == f"bidirlm.runtime.training.phases.{module}", (phase, cls)
    trainer = (PACKAGE / "runtime" / "training" / "trainer.py").read_text()
    assert len(trainer.splitlines()) < 500
    for phase in want:
        assert f'"{phase}"' not in trainer, phase


def _module_imports(path: Path, name: str, modules: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)]
            target = ".".join(base + [node.module or ""]).strip(".") if node.level else node.module
            targets = [f"{target}.{a.name}" for a in node.names]
            found.update(t for t in targets if t in modules)
            if not any(t in modules for t in targets) and target in modules:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    found.discard(name)
    return found


def test_no_import_circle_between_modules() -> None:
    """Module-to-module imports (direct targets only) form no cycle (Tarjan's SCCs)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {n: _module_imports(p, n, set(files)) for n, p in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == [], cycles
