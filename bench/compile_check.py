"""Ahead-of-time compiles of every Triton kernel launch our ops make, for GPUs we do not have.

`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(...))` needs no GPU
(ptxas ships in the triton wheel), so a CPU machine can read what sm_90, gfx942 and gfx90a code
the kernels become: registers, spills, shared memory, the matrix instructions, TMA loads and
memory fences inside loops. This module:

1. enumerates launches by *running the public ops* (`flash_attn_func`, `flash_attn_varlen_func`,
   `mntp_loss`, `infonce_loss`, forward and backward) on small CPU tensors with the kernels'
   `JITFunction.run` replaced by a recorder, dispatch forced to Triton and the architecture
   reported as the target's (`nvidia-sm90`, `amd-gfx942`, ...). The launchers pick their own
   configs, grids and constexprs exactly as on that GPU, so this keeps working when kernels change;
2. specializes each recorded launch with Triton's own binder (the same signature, constexprs and
   divisibility attributes a real launch would compile with) and compiles it for the target;
3. reads the compiled artifacts (ptxas `-v` log, SASS from `cuobjdump`, TTIR/TTGIR, AMDGCN
   metadata) into one flat dict per launch, and checks the rules of `RULES` on those dicts.

Nothing here touches a GPU or runs at import time beyond importing triton.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

# name -> (backend, arch, warp size, what bidirlm.kernels.config.arch_key returns on that GPU)
TARGETS: dict[str, tuple[str, int | str, int, str]] = {
    "sm90": ("cuda", 90, 32, "nvidia-sm90"),
    "gfx942": ("hip", "gfx942", 64, "amd-gfx942"),
    "gfx90a": ("hip", "gfx90a", 64, "amd-gfx90a"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (64, 80, 128, 256)
ATTN_VARIANTS = (
    "dense", "kpm", "softcap", "window", "packed", "packed+window", "gqa", "mqa", "alibi",
    "cross", "deterministic", "deterministic+packed+window",
)  # fmt: skip
MNTP_VARIANTS = ("plain", "bias", "softcap", "bias-softcap")
INFONCE_VARIANTS = ("cosine", "dot", "cosine-symmetric")


def gpu_target(name: str) -> GPUTarget:
    if name not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {name!r}")
    backend, arch, warp, _ = TARGETS[name]
    return GPUTarget(backend, arch, warp)


# --- cases: calls of the public ops ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One call of a public op (forward + backward) whose kernel launches get compiled."""

    op: str  # "attention" | "mntp_loss" | "infonce"
    dtype: str  # "bf16" | "fp16" | "fp32"
    variant: str
    head_dim: int = 0  # attention only

    @property
    def label(self) -> str:
        hd = f" hd{self.head_dim}" if self.op == "attention" else ""
        return f"{self.op} {self.dtype}{hd} {self.variant}"

    def run(self, backward: bool = True) -> None:
        """Forward (and backward) of the op on small CPU tensors (launches are recorded)."""
        self.prepare(backward)()

    def prepare(self, backward: bool = True, tiny: bool = False) -> Callable[[], None]:
        """Make the inputs; return the call (forward, then backward when asked). `tiny` shapes
        make the CPU arithmetic negligible (host overhead timing); the default shapes give the
        launches the divisibility of real ones (compiles)."""
        gen = torch.Generator().manual_seed(0)
        dtype = DTYPES[self.dtype]

        def randn(*shape: int) -> torch.Tensor:
            t = torch.randn(*shape, generator=gen).to(dtype)
            return t.requires_grad_(True)

        if self.op == "attention":
            forward = _attention_call(self, randn, tiny)
        elif self.op == "mntp_loss":
            forward = _mntp_call(self, randn, gen, tiny)
        elif self.op == "infonce":
            forward = _infonce_call(self, randn, tiny)
        else:
            raise ValueError(f"unknown op {self.op!r}")

        def call() -> None:
            _PHASE[0] = "fwd"
            out = forward()
            if backward:
                _PHASE[0] = "bwd"
                # The recorded launches write nothing: outputs hold garbage, so never reduce them
                # to a loss value that a check could reject; feed a fixed upstream gradient.
                out.backward(torch.ones_like(out))

        return call


_PHASE = ["fwd"]  # the pass the recorder is in


ATTN_TOKENS = ("dense", "kpm", "softcap", "window", "packed", "gqa", "mqa", "alibi", "cross",
               "deterministic")  # fmt: skip


def _attention_call(
    case: Case, randn: Callable[..., torch.Tensor], tiny: bool = False
) -> Callable[[], torch.Tensor]:
    """One attention call of a variant: tokens of ATTN_TOKENS joined by '+' ("packed+window").
    gqa: 8 query heads on 2 kv heads (4 per group); mqa: 8 on 1; cross: 192 keys for 128 queries
    (dense) or per-sequence key lengths that differ from the query ones (packed); alibi and cross
    go through the flash-attn call forms (`flash_attn_compat`), the rest through the native ops."""
    from bidirlm.kernels import flash_attn_compat as fa
    from bidirlm.kernels import flash_attn_func, flash_attn_varlen_func

    tokens = set(case.variant.split("+"))
    unknown = tokens - set(ATTN_TOKENS)
    if unknown:
        bad = ", ".join(sorted(unknown))
        raise ValueError(f"unknown attention variant {case.variant!r}: {bad}")
    d = case.head_dim
    hq = 8 if tokens & {"gqa", "mqa"} else 4
    hkv = 2 if "gqa" in tokens else 1 if "mqa" in tokens else hq
    window = (32, 32) if "window" in tokens else (-1, -1)
    softcap = 30.0 if "softcap" in tokens else 0.0
    det = "deterministic" in tokens
    compat = bool(tokens & {"alibi", "cross"})
    alibi = torch.linspace(0.05, 0.5, hq, dtype=torch.float32) if "alibi" in tokens else None
    if "packed" in tokens:
        if "kpm" in tokens:
            raise ValueError("a key padding mask is for dense calls, not packed ones")
        # 100 + 28 = 128 query tokens: the divisibility of the dense cases' strides
        kv_lens = [150, 42] if "cross" in tokens else [100, 28]
        cu = torch.tensor([0, 100, 128], dtype=torch.int32)
        cu_k = torch.tensor([0, kv_lens[0], sum(kv_lens)], dtype=torch.int32)
        q = randn(128, hq, d)
        k, v = randn(sum(kv_lens), hkv, d), randn(sum(kv_lens), hkv, d)
        if compat:
            return lambda: fa.flash_attn_varlen_func(
                q, k, v, cu, cu_k, 100, max(kv_lens), window_size=window, softcap=softcap,
                alibi_slopes=alibi, deterministic=det,
            )  # fmt: skip
        return lambda: flash_attn_varlen_func(
            q, k, v, cu, 100, window_size=window, softcap=softcap, deterministic=det
        )
    b, s = (1, 16) if tiny else (2, 128)
    sk = s + s // 2 if "cross" in tokens else s
    q, k, v = randn(b, s, hq, d), randn(b, sk, hkv, d), randn(b, sk, hkv, d)
    kpm = None
    if "kpm" in tokens:
        kpm = torch.ones(b, sk, dtype=torch.bool)
        kpm[-1, sk - 5 :] = False
    if compat:
        return lambda: fa.flash_attn_func(
            q, k, v, window_size=window, softcap=softcap, alibi_slopes=alibi,
            deterministic=det, key_padding_mask=kpm,
        )  # fmt: skip
    return lambda: flash_attn_func(
        q, k, v, window_size=window, softcap=softcap, deterministic=det, key_padding_mask=kpm
    )


def _mntp_call(
    case: Case, randn: Callable[..., torch.Tensor], gen: torch.Generator, tiny: bool = False
) -> Callable[[], torch.Tensor]:
    from bidirlm.kernels import mntp_loss

    n, d, vocab = (16, 64, 128) if tiny else (64, 256, 1024)
    h, w = randn(n, d), randn(vocab, d)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::3] = -100
    kw: dict[str, Any] = {}
    if "bias" in case.variant:
        kw["bias"] = randn(vocab)
    if "softcap" in case.variant:
        kw["softcap"] = 30.0
    return lambda: mntp_loss(h, w, labels, reduction="none", **kw)


def _infonce_call(
    case: Case, randn: Callable[..., torch.Tensor], tiny: bool = False
) -> Callable[[], torch.Tensor]:
    from bidirlm.kernels import infonce_loss

    queries, docs = (randn(16, 64), randn(32, 64)) if tiny else (randn(64, 256), randn(128, 256))
    normalize = case.variant.startswith("cosine")
    symmetric = case.variant.endswith("symmetric")
    return lambda: infonce_loss(queries, docs, normalize=normalize, symmetric=symmetric)


QUICK_ATTN_VARIANTS = (
    "dense", "packed", "gqa", "mqa", "window", "packed+window", "softcap", "alibi", "cross",
    "kpm", "deterministic", "deterministic+packed+window",
)  # fmt: skip


def all_cases(quick: bool = False) -> list[Case]:
    """Every case of the full suite, or the `--quick` subset (the CI check)."""
    if quick:
        # Every public attention variant (atomic dQ is the default, non-deterministic backward
        # at head dim 64) at head dims 64, 128 and 256 in both 16-bit types: register allocation
        # differs between them and between triton versions. fp32 is the slow compile: full suite.
        out = [
            Case("attention", dt, v, hd)
            for dt in ("bf16", "fp16")
            for hd in (64, 128, 256)
            for v in QUICK_ATTN_VARIANTS
        ]
        out += [Case("mntp_loss", "bf16", v) for v in ("plain", "bias-softcap")]
        out += [Case("infonce", "bf16", "cosine")]
        return out
    out = [Case("attention", dt, v, hd) for dt in DTYPES for hd in HEAD_DIMS for v in ATTN_VARIANTS]
    out += [Case("mntp_loss", dt, v) for dt in DTYPES for v in MNTP_VARIANTS]
    out += [Case("infonce", dt, v) for dt in DTYPES for v in INFONCE_VARIANTS]
    return out


def select_cases(cases: list[Case], patterns: str | None) -> list[Case]:
    """The cases whose label matches one of the comma-separated fnmatch `patterns` (all when
    empty); a pattern that matches nothing is an error naming it."""
    if not patterns:
        return cases
    out = []
    for pat in (p.strip() for p in patterns.split(",") if p.strip()):
        hits = [c for c in cases if fnmatch.fnmatchcase(c.label, pat)]
        if not hits:
            raise ValueError(f"--cases pattern {pat!r} matches no case")
        out += [c for c in hits if c not in out]
    return out


# --- recording launches ---------------------------------------------------------------------------


@dataclass
class Launch:
    """One `kernel[grid](*args, **kwargs)` call recorded while a case ran."""

    case: Case
    fn: Any  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict[str, Any]
    grid: Any
    phase: str = "fwd"  # "fwd" or "bwd": the pass that launched it

    @property
    def kernel(self) -> str:
        return self.fn.fn.__name__


@contextlib.contextmanager
def recording(arch_key: str) -> Iterator[list[tuple[Any, tuple, dict, Any, str]]]:
    """Within the block, Triton launches are recorded instead of run, the ops dispatch to Triton
    and `bidirlm.kernels.config` reports `arch_key` (e.g. 'nvidia-sm90') for any device."""
    from triton.runtime.jit import JITFunction

    from bidirlm.kernels import config, dispatch

    calls: list[tuple[Any, tuple, dict, Any, str]] = []
    _PHASE[0] = "fwd"

    def record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        calls.append((self, args, dict(kwargs), grid, _PHASE[0]))

    saved = (JITFunction.run, dispatch.decide, config.arch_key, config.is_hip)
    JITFunction.run = record
    dispatch.decide = lambda device=None: dispatch.Decision("triton", "compile check")
    config.arch_key = lambda device: arch_key
    config.is_hip = lambda: arch_key.startswith("amd")
    autotune = os.environ.pop("BIDIRLM_AUTOTUNE", None)  # the fixed default configs only
    try:
        yield calls
    finally:
        JITFunction.run, dispatch.decide, config.arch_key, config.is_hip = saved
        if autotune is not None:
            os.environ["BIDIRLM_AUTOTUNE"] = autotune


def record_launches(case: Case, target: str) -> list[Launch]:
    """The Triton launches one case makes on `target` (forward and backward)."""
    with recording(TARGETS[target][3]) as calls:
        case.run()
    return [Launch(case, fn, args, kwargs, grid, phase) for fn, args, kwargs, grid, phase in calls]


# --- specialization and compilation ---------------------------------------------------------------


@dataclass
class Spec:
    """A launch specialized for one target: what `triton.compile` gets."""

    target: str
    kernel: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[Any, Any]
    attrs: dict[Any, Any]
    options: dict[str, Any]
    config: dict[str, Any]  # named constexprs + num_warps/num_stages/waves_per_eu
    phase: str = "fwd"
    cases: list[Case] = field(default_factory=list)

    @property
    def key(self) -> str:
        parts = (self.constexprs, self.attrs, self.options)
        return repr((self.target, self.fn.fn.__module__, self.kernel, self.signature,
                     *(sorted(p.items(), key=str) for p in parts)))  # fmt: skip


def _backend(target: str) -> Any:
    from triton.compiler import make_backend

    return make_backend(gpu_target(target))


def specialize(launch: Launch, target: str, backend: Any = None) -> Spec:
    """Bind a recorded launch exactly as `JITFunction.run` would on `target`'s device."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = backend or _backend(target)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", bool(getattr(fn, "debug", False)))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    names = [p.name for p in fn.params]
    config = {names[path[0]]: _plain(value) for path, value in constexprs.items() if len(path) == 1}
    config = {k: v for k, v in config.items() if names.index(k) in _constexpr_params(fn)}
    for key in ("num_warps", "num_stages", "waves_per_eu"):
        if key in launch.kwargs:
            config[key] = launch.kwargs[key]
    options_dict = dict(opts.__dict__)
    return Spec(
        target, launch.kernel, fn, signature, constexprs, attrs, options_dict, config, launch.phase
    )


def _constexpr_params(fn: Any) -> set[int]:
    return {i for i, p in enumerate(fn.params) if p.is_constexpr}


def _plain(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def unique_specs(cases: list[Case], target: str) -> tuple[list[Spec], list[dict[str, Any]]]:
    """Specs of every distinct launch of `cases` on `target`, and the cases that failed to run
    (their error as a row-like dict: the launcher raised before launching)."""
    backend = _backend(target)
    specs: dict[str, Spec] = {}
    failures = []
    for case in cases:
        try:
            launches = record_launches(case, target)
            for launch in launches:
                spec = specialize(launch, target, backend)
                spec = specs.setdefault(spec.key, spec)
                if case not in spec.cases:
                    spec.cases.append(case)
        except Exception as exc:  # noqa: BLE001 - reported as a failed launch row
            failures.append({"target": target, "case": case.label, "error": _error(exc)})
    return list(specs.values()), failures


def _error(exc: BaseException) -> str:
    """One line: where it failed and the innermost message. Triton's CompilationError starts with
    a location and a source excerpt and chains the real message through `__cause__` (its
    `error_message`); ptxas errors end with a repro command."""
    inner = exc
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Repro command")]
    message = getattr(inner, "error_message", None)
    if not message:
        inner_lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
        inner_lines = [ln for ln in inner_lines if not ln.startswith("Repro command")] or lines
        message = next(
            (ln for ln in reversed(inner_lines) if "error" in ln.lower()),
            inner_lines[-1] if inner_lines else "",
        )
    head = lines[0] if lines else ""
    msg = str(message) if head == str(message) or not head else f"{head} {message}"
    return f"{type(inner).__name__}: {msg[:400]}"


def compile_spec(spec: Spec) -> dict[str, Any]:
    """Compile one spec and return its facts (see `analyze`); `compiled=False` and `error`
    when the compiler rejects it."""
    from triton import knobs
    from triton.compiler import ASTSource

    target = gpu_target(spec.target)
    src = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with (
            _ptxas_log(knobs),
            _maybe_recording(spec.target) as rec,
            contextlib.redirect_stdout(log),
        ):
            compiled = triton.compile(src, target=target, options=spec.options)
    except Exception as exc:  # noqa: BLE001 - a compile error is a result
        return {"compiled": False, "error": _error(exc), "compile_s": time.perf_counter() - t0}
    facts: dict[str, Any] = {"compiled": True, "error": None}
    facts["compile_s"] = time.perf_counter() - t0
    text = log.getvalue()
    cmds = [c for c in (rec.commands if rec else []) if "ptxas" in Path(c[0]).name]
    if cmds:  # triton ran ptxas in this compile: its own log, its own flags
        text += "\n# ptxas flags: " + " ".join(ptxas_flags(cmds[-1])) + "\n"
    facts.update(analyze(compiled.asm, compiled.metadata, spec.target, text))
    return facts


@contextlib.contextmanager
def _maybe_recording(target: str) -> Iterator[_RecordingSubprocess | None]:
    if TARGETS[target][0] != "cuda":
        yield None
        return
    with recording_ptxas() as rec:
        yield rec


@contextlib.contextmanager
def _ptxas_log(knobs: Any) -> Iterator[None]:
    """Make triton print the ptxas `-v` log (it deletes it otherwise); cache hits print none."""
    nvidia = getattr(knobs, "nvidia", None)
    if nvidia is None or not hasattr(nvidia, "dump_ptxas_log"):
        yield
        return
    old = nvidia.dump_ptxas_log
    nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        nvidia.dump_ptxas_log = old


# --- reading compiled artifacts -------------------------------------------------------------------


def nvidia_tool(name: str) -> Path:
    """A CUDA tool shipped in the triton wheel (ptxas, cuobjdump, nvdisasm)."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the triton wheel at {path}")
    return path


class _RecordingSubprocess:
    """Stands in for the `subprocess` module inside triton's NVIDIA backend: runs every command
    unchanged and keeps its argv (the exact ptxas invocation triton made)."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def run(self, cmd: Any, *args: Any, **kwargs: Any) -> Any:
        self.commands.append([str(c) for c in cmd])
        return subprocess.run(cmd, *args, **kwargs)


@contextlib.contextmanager
def recording_ptxas() -> Iterator[_RecordingSubprocess]:
    """Within the block, every command triton's NVIDIA backend runs is recorded (`.commands`)."""
    from triton.backends.nvidia import compiler as nv

    rec = _RecordingSubprocess()
    saved = nv.subprocess
    nv.subprocess = rec
    try:
        yield rec
    finally:
        nv.subprocess = saved


def ptxas_flags(command: list[str]) -> list[str]:
    """The options of a ptxas command line (no program, no input/output file names)."""
    out, skip = [], False
    for arg in command[1:]:
        if skip:
            skip = False
            continue
        if arg == "-o":
            skip = True
            continue
        if arg.endswith(".ptx"):
            continue
        out.append(arg)
    return out


def rerun_ptxas(ptx: str, arch: int = 90, options: dict[str, Any] | None = None) -> str:
    """The ptxas `-v` log of `ptx`, assembled by triton's own `make_cubin` with the compile
    options of the kernel (`options`: the compiled kernel's metadata or a spec's options), so the
    flags are exactly those triton passes in the installed version (triton 3.9 adds
    `--regAllocOptLevel=2`, 3.6 does not). The log ends with a `# ptxas flags:` line."""
    from triton import knobs

    backend = _backend_for_arch(arch)
    opts = {k: v for k, v in (options or {}).items() if k in backend.parse_options({}).__dict__}
    opt = backend.parse_options(opts)
    log = io.StringIO()
    try:
        with _ptxas_log(knobs), recording_ptxas() as rec, contextlib.redirect_stdout(log):
            backend.make_cubin(ptx, {}, opt, arch)
    except Exception as exc:  # noqa: BLE001 - re-raised as one line
        raise RuntimeError(f"ptxas failed: {_error(exc)}") from exc
    flags = next((ptxas_flags(c) for c in rec.commands if "ptxas" in Path(c[0]).name), [])
    return log.getvalue() + "\n# ptxas flags: " + " ".join(flags) + "\n"


def _backend_for_arch(arch: int) -> Any:
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


_FLAGS_LINE = re.compile(r"^# ptxas flags: (.*)$", re.M)


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


def parse_ptxas_log(log: str) -> dict[str, int]:
    """`registers`, `stack_bytes`, `spill_store_bytes`, `spill_load_bytes` from a ptxas -v log
    (the last function reported: triton compiles one kernel per module)."""
    regs = _PTXAS_REGS.findall(log)
    spill = _PTXAS_SPILL.findall(log)
    if not regs or not spill:
        raise ValueError("not a ptxas -v log: no 'Used N registers' / 'bytes spill stores' line")
    stack, stores, loads = (int(x) for x in spill[-1])
    return {
        "registers": int(regs[-1]),
        "stack_bytes": stack,
        "spill_store_bytes": stores,
        "spill_load_bytes": loads,
    }


_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_res_usage(text: str) -> dict[str, int]:
    """`cuobjdump -res-usage` -> registers, stack bytes, static shared and local bytes."""
    m = _RES_USAGE.search(text)
    if not m:
        raise ValueError("not a cuobjdump -res-usage report: no 'REG:n STACK:n SHARED:n LOCAL:n'")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return {"registers": reg, "stack_bytes": stack, "static_shared": shared, "local_bytes": local}


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text) of every SASS instruction in a `cuobjdump -sass` listing."""
    return [(int(a, 16), ins) for a, ins in _SASS_LINE.findall(sass)]


def loop_ranges(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """Address ranges [target, branch] of every backward branch: the bodies of the loops."""
    ranges = []
    for addr, ins in instructions:
        m = re.search(r"\bBRA(?:\.\w+)*\s+0x([0-9a-f]+)", ins)
        if m:
            target = int(m.group(1), 16)
            if target <= addr:
                ranges.append((target, addr))
    return ranges


def _in_loops(addr: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= addr <= hi for lo, hi in ranges)


# HGMMA.64x128x16.F32[.BF16] Rd, A, B, C: A is `gdesc[URn]` (shared memory) or `Rn` (registers)
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)\S*\s+(\S+?),\s*(\S+?)[,\s;]")
# bytes one warp moves per shared-memory instruction (32 lanes x the access width; LDSM.x4 loads
# four 8x8 16-bit matrices = 512 B, .x2 256 B, .x1 128 B; STSM the same)
_SMEM_BYTES = {".128": 512, ".64": 256, ".U16": 64, ".16": 64, ".U8": 32, ".8": 32}


def _smem_bytes(op: str) -> int:
    if op.startswith(("LDSM", "STSM")):
        return 512 if ".X4" in op.upper() else 256 if ".X2" in op.upper() else 128
    for suffix, nbytes in _SMEM_BYTES.items():
        if suffix in op:
            return nbytes
    return 128  # 32-bit accesses


def main_loop(
    ins: list[tuple[int, str]], ranges: list[tuple[int, int]], longest: bool = False
) -> dict[str, Any]:
    """Per-iteration instruction facts of the kernel's main loop, the innermost loop with the most
    matrix instructions (ties: the shortest body, i.e. the unmasked interior loop; `longest`: the
    longest body instead, e.g. the online-softmax blocks of a forward whose main loop runs against
    fixed row maxima), as one warp executes them: `hgmma` [[M, N, K, a_from_registers], ...],
    `instructions`, `mufu`, shared memory bytes read/written by LDS/LDSM/STS/STSM (`lds_bytes`,
    `sts_bytes`), global loads (`ldg`: LDG + LDGSTS), TMA loads (`utmaldg`), `bar` (CTA barriers),
    `hmma` (mma.sync) and `local` (LDL/STL: spilled registers moved inside the loop).
    Empty when the kernel has no loop."""
    inner = [r for r in ranges if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    best: dict[str, Any] = {}
    for lo, hi in inner:
        body = [t for a, t in ins if lo <= a <= hi]
        ops = [t.split()[1] if t.startswith("@") else t.split()[0] for t in body]
        hgmma = []
        for text in body:
            m = _HGMMA.search(text)
            if m:
                a_regs = bool(re.fullmatch(r"R\d+", m.group(5)))
                hgmma.append([int(m.group(1)), int(m.group(2)), int(m.group(3)), a_regs])
        facts = {
            "hgmma": hgmma,
            "instructions": len(body),
            "mufu": sum(op.startswith("MUFU") for op in ops),
            "lds_bytes": sum(_smem_bytes(op) for op in ops if op.startswith(("LDS", "LDSM"))),
            "sts_bytes": sum(_smem_bytes(op) for op in ops if op.startswith(("STS", "STSM"))),
            "ldg": sum(op.startswith(("LDG", "LDGSTS")) for op in ops),
            "utmaldg": sum(op.startswith("UTMALDG") for op in ops),
            "bar": sum(op.startswith("BAR") for op in ops),
            "hmma": sum(op.startswith("HMMA") for op in ops),
            "local": sum(op.startswith(("LDL", "STL")) for op in ops),
        }
        sign = 1 if longest else -1
        key = (len(hgmma) + facts["hmma"], sign * len(body))
        if not best or key > (len(best["hgmma"]) + best["hmma"], sign * best["instructions"]):
            best = facts
    return best


def analyze_sass(sass: str) -> dict[str, Any]:
    """MMA kind, TMA loads and memory fences (GPU/system scope MEMBAR) inside loops."""
    ins = sass_instructions(sass)
    if not ins:
        raise ValueError("no SASS instructions found (expected `cuobjdump -sass` output)")
    ops = [text.split()[0] if not text.startswith("@") else text.split()[1] for _, text in ins]
    kinds = []
    if any(op.startswith("HGMMA") for op in ops):
        kinds.append("wgmma")
    if any(op.startswith("HMMA") for op in ops):
        kinds.append("mma.sync")
    ranges = loop_ranges(ins)
    fences = cta = 0
    for (addr, _), op in zip(ins, ops):
        if op.startswith("MEMBAR") and _in_loops(addr, ranges):
            if ".CTA" in op:
                cta += 1  # fence.proxy.async (wgmma operands written by threads): CTA-local
            else:
                fences += 1
    return {
        "main_loop": main_loop(ins, ranges),
        "longest_loop": main_loop(ins, ranges, longest=True),
        "mma": "+".join(kinds) or "none",
        "tma": any(op.startswith("UTMALDG") for op in ops),
        "fences_main_loop": fences,
        "cta_fences_main_loop": cta,
        "loops": len(ranges),
        "sass_instructions": len(ins),
        "mufu": sum(op.startswith("MUFU") for op in ops),
    }


_AMD_FENCE = re.compile(
    r"^\s*(buffer_wbl2|buffer_inv\b|buffer_invl2|buffer_wbinvl1\w*|buffer_gl\w*)"
)


def analyze_amdgcn(asm: str) -> dict[str, Any]:
    """Registers, spills, MFMA use and fences inside loops from AMDGCN assembly + metadata."""

    def meta(name: str) -> int:
        m = re.search(rf"^\s*\.{name}:\s+(\d+)", asm, re.M)
        if m is None:
            raise ValueError(f"no .{name} in the AMDGCN metadata")
        return int(m.group(1))

    scratch = re.search(r"; ScratchSize: (\d+)", asm)
    lines = asm.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^(\.LBB\d+_\d+):", line)
        if m:
            labels[m.group(1)] = i
    ranges = []
    for i, line in enumerate(lines):
        m = re.match(r"^\s*s_(?:c)?branch\w*\s+(\.LBB\d+_\d+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            ranges.append((labels[m.group(1)], i))
    fences = sum(
        1 for i, line in enumerate(lines) if _AMD_FENCE.match(line) and _in_loops(i, ranges)
    )
    vgpr_spill = meta("vgpr_spill_count")
    return {
        "registers": meta("vgpr_count"),
        "sgprs": meta("sgpr_count"),
        "spill_bytes": 4 * vgpr_spill,
        "sgpr_spills": meta("sgpr_spill_count"),
        "scratch_bytes": int(scratch.group(1)) if scratch else 0,
        "mma": "mfma" if re.search(r"^\s*v_mfma", asm, re.M) else "none",
        "tma": False,
        "fences_main_loop": fences,
        "loops": len(ranges),
    }


def _dot_is_16bit(line: str) -> bool:
    """Both operands of a `tt.dot` line are bf16/fp16 (types follow the last ' : ')."""
    types = line.rsplit(" : ", 1)[-1]
    elems = re.findall(r"(?:tensor|memdesc)<(?:\d+x)+(\w+)", types)
    return len(elems) >= 2 and elems[0] in ("bf16", "f16") and elems[1] in ("bf16", "f16")


def dot_counts(ttir: str, ttgir: str) -> dict[str, int]:
    """Dots in the kernel: `dots` (all), `dots16` (bf16/fp16 operands), and in the GPU IR
    `wgmma_dots` (`ttng.warp_group_dot`) and `dots16_not_wgmma` (16-bit dots left as `tt.dot`,
    i.e. mma.sync or FMA on sm_90)."""
    ir_dots = [ln for ln in ttir.splitlines() if re.search(r"=\s*tt\.dot\b", ln)]
    gpu_plain = [ln for ln in ttgir.splitlines() if re.search(r"=\s*tt\.dot\b", ln)]
    gpu_wg = [ln for ln in ttgir.splitlines() if re.search(r"=\s*ttng\.warp_group_dot\b", ln)]
    return {
        "dots": len(ir_dots),
        "dots16": sum(map(_dot_is_16bit, ir_dots)),
        "wgmma_dots": len(gpu_wg),
        "dots16_not_wgmma": sum(map(_dot_is_16bit, gpu_plain)),
    }


def analyze(asm: dict[str, Any], metadata: Any, target: str, log: str = "") -> dict[str, Any]:
    """Flat facts of one compiled kernel (see the row schema in bench/compile.py)."""
    facts: dict[str, Any] = {"shared_bytes": int(getattr(metadata, "shared", 0) or 0)}
    facts.update(dot_counts(asm.get("ttir", ""), asm.get("ttgir", "")))
    if TARGETS[target][0] == "cuda":
        try:
            usage = parse_ptxas_log(log)
            if not _FLAGS_LINE.search(log):
                raise ValueError("no flags")
        except ValueError:  # compiled earlier (the cubin came from triton's cache): re-assemble
            log = rerun_ptxas(asm["ptx"], int(TARGETS[target][1]), _metadata_options(metadata))
            usage = parse_ptxas_log(log)
        facts.update(usage)
        flags = _FLAGS_LINE.findall(log)
        facts["ptxas_flags"] = flags[-1].strip() if flags else None
        facts["spill_bytes"] = usage["spill_store_bytes"]
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(asm["cubin"])
            sass = _run([nvidia_tool("cuobjdump"), "-sass", cubin])
        facts.update(analyze_sass(sass))
        facts["tma"] = facts["tma"] or "cp.async.bulk.tensor" in asm.get("ptx", "")
    else:
        facts.update(analyze_amdgcn(asm["amdgcn"]))
    return facts


def _metadata_options(metadata: Any) -> dict[str, Any]:
    """The compile options a compiled kernel's metadata records (a namedtuple or a dict)."""
    if metadata is None:
        return {}
    if hasattr(metadata, "_asdict"):
        return dict(metadata._asdict())
    if isinstance(metadata, dict):
        return dict(metadata)
    return dict(getattr(metadata, "__dict__", {}))


def _run(cmd: list[Any]) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed: {proc.stderr.strip()[:400]}")
    return proc.stdout


# --- rules ----------------------------------------------------------------------------------------

RULES = {
    "compile": "every launch compiles for every target",
    "spill": "no register spills on sm_90 in a default 16-bit config (attention: every head dim "
    "up to 256)",
    "wgmma": "every 16-bit tl.dot compiles to wgmma on sm_90",
    "fence": "no GPU/system-scope memory fence inside a loop",
}


def is_16bit(row: dict[str, Any]) -> bool:
    return row.get("dtype") in ("bf16", "fp16")


def violations(row: dict[str, Any]) -> list[str]:
    """The rules of `RULES` that one compile row breaks."""
    if not row.get("compiled"):
        return ["compile"]
    out = []
    sm90 = row["target"] == "sm90"
    hd_ok = row.get("op") != "attention" or (row.get("head_dim") or 0) <= 256
    if sm90 and is_16bit(row) and hd_ok and (row.get("spill_bytes") or 0) > 0:
        out.append("spill")
    if sm90 and (row.get("dots16_not_wgmma") or 0) > 0:
        out.append("wgmma")
    if (row.get("fences_main_loop") or 0) > 0:
        out.append("fence")
    return out


@dataclass(frozen=True)
class KnownIssue:
    rule: str
    target: str
    kernel: str
    case: str  # fnmatch pattern on a row's case labels
    reason: str
    triton: str = "*"

    def matches(self, rule: str, row: dict[str, Any]) -> bool:
        return (
            rule == self.rule
            and fnmatch.fnmatchcase(row["target"], self.target)
            and fnmatch.fnmatchcase(row["kernel"], self.kernel)
            and fnmatch.fnmatchcase(str(row.get("triton", "")), self.triton)
            and any(fnmatch.fnmatchcase(c, self.case) for c in row.get("cases", [row["case"]]))
        )

    def applies(self, row: dict[str, Any]) -> bool:
        """The entry is about this launch (whether or not it still breaks the rule)."""
        return self.matches(self.rule, row)


def load_known_issues(path: Path | str) -> list[KnownIssue]:
    """`[[known]]` entries of an allow-list TOML file (bench/compile_known_issues.toml)."""
    path = Path(path)
    if not path.exists():
        return []
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    out = []
    for i, entry in enumerate(data.get("known", [])):
        missing = {"rule", "target", "kernel", "case", "reason"} - set(entry)
        if missing:
            raise ValueError(f"{path}: known[{i}] lacks {', '.join(sorted(missing))}")
        if entry["rule"] not in RULES:
            raise ValueError(f"{path}: known[{i}].rule must be one of {', '.join(RULES)}")
        if not str(entry["reason"]).strip():
            raise ValueError(f"{path}: known[{i}].reason must say why the violation remains")
        unknown = set(entry) - {"rule", "target", "kernel", "case", "reason", "triton"}
        if unknown:
            raise ValueError(f"{path}: known[{i}] has unknown key(s) {', '.join(sorted(unknown))}")
        out.append(KnownIssue(**{k: str(v) for k, v in entry.items()}))
    return out


@dataclass
class CheckReport:
    new: list[tuple[str, dict[str, Any]]]  # (rule, row) not in the allow-list
    known: list[tuple[str, dict[str, Any], KnownIssue]]
    fixed: list[KnownIssue]  # listed, exercised by this run, and no longer violated
    unexercised: list[KnownIssue]  # listed but no launch of this run is about it

    @property
    def ok(self) -> bool:
        return not self.new and not self.fixed

    def text(self) -> str:
        lines = []

        def describe(row: dict[str, Any]) -> str:
            facts = (
                f"regs={row.get('registers')} spill={row.get('spill_bytes')} "
                f"mma={row.get('mma')} dots16_not_wgmma={row.get('dots16_not_wgmma')} "
                f"fences={row.get('fences_main_loop')}"
            )
            if not row.get("compiled"):
                facts = f"error: {row.get('error')}"
            return f"{row['target']:<7} {row['kernel']:<30} {row['case']:<40} {facts}"

        if self.new:
            lines.append(f"compile check: {len(self.new)} violation(s) not in the allow-list:")
            lines += [f"  [{rule}] {describe(row)}" for rule, row in self.new]
        if self.fixed:
            lines.append(
                f"compile check: {len(self.fixed)} allow-listed violation(s) are fixed: remove "
                "them from the allow-list:"
            )
            lines += [f"  [{k.rule}] {k.target} {k.kernel} {k.case}" for k in self.fixed]
        if self.known:
            lines.append(f"compile check: {len(self.known)} known violation(s) (allow-listed):")
            lines += [f"  [{rule}] {describe(row)}" for rule, row, _ in self.known]
        if self.unexercised:
            lines.append(f"compile check: {len(self.unexercised)} allow-list entries not exercised")
        lines.append("compile check: " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


def check(rows: list[dict[str, Any]], known: list[KnownIssue]) -> CheckReport:
    """Rule violations of compile rows against the allow-list."""
    new, listed = [], []
    used: set[int] = set()
    for row in rows:
        for rule in violations(row):
            hit = next((i for i, k in enumerate(known) if k.matches(rule, row)), None)
            if hit is None:
                new.append((rule, row))
            else:
                used.add(hit)
                listed.append((rule, row, known[hit]))
    fixed, unexercised = [], []
    for i, k in enumerate(known):
        if i in used:
            continue
        if any(k.applies(row) for row in rows):
            fixed.append(k)
        else:
            unexercised.append(k)
    return CheckReport(new, listed, fixed, unexercised)


__all__ = [
    "TARGETS",
    "RULES",
    "Case",
    "Launch",
    "Spec",
    "KnownIssue",
    "CheckReport",
    "all_cases",
    "select_cases",
    "ptxas_flags",
    "recording_ptxas",
    "record_launches",
    "recording",
    "specialize",
    "unique_specs",
    "compile_spec",
    "analyze",
    "analyze_sass",
    "main_loop",
    "analyze_amdgcn",
    "dot_counts",
    "parse_ptxas_log",
    "parse_res_usage",
    "rerun_ptxas",
    "violations",
    "check",
    "load_known_issues",
    "gpu_target",
]
