"""The static GPU compile suite (bench/compile.py, bench/compile_check.py).

Parsers and rules run on fixed compiler output; real compiles for sm_90/gfx942/gfx90a run in a
subprocess without TRITON_INTERPRET (this process has @triton.jit kernels in the interpreter).
The full CI check (`-m compile_suite`) runs only with BIDIRLM_COMPILE_CHECK=1: `.ci/run` sets it,
once with the installed triton and once with triton 3.6.0 on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import compile_check as cc

ROOT = Path(__file__).resolve().parents[1]

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_attn_bwd_dkdv_kernel' for 'sm_90a'
ptxas info    : Function properties for _attn_bwd_dkdv_kernel
    352 bytes stack frame, 348 bytes spill stores, 360 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 352 bytes cumulative stack size
"""

RES_USAGE = """\
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _attn_bwd_dkdv_kernel:
  REG:239 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:744 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# A loop 0x0100..0x0200 (the BRA back at 0x0200) holding one GPU-scope fence, one CTA-scope
# (wgmma proxy) fence and a wgmma; a GPU fence after the loop does not count.
SASS_LOOP = """\
        /*0000*/                   LDC R1, c[0x0][0x28] ;                     /* 0x00000a00ff017b82 */
        /*0100*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ; /* 0x0 */
        /*0110*/                   MEMBAR.ALL.CTA ;                           /* 0x0000000000007992 */
        /*0120*/                   FENCE.VIEW.ASYNC.S ;                       /* 0x00000000000073c6 */
        /*0130*/                   MEMBAR.ALL.GPU ;                           /* 0x0000000000007992 */
        /*0140*/                   ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU PT, RZ, desc[UR8][R130.64], R124 ;
        /*0150*/                   CCTL.IVALL ;                               /* 0x00000000ff00798f */
        /*0160*/                   MUFU.EX2 R3, R2 ;                          /* 0x0 */
        /*0200*/              @!P0 BRA 0x100 ;                                /* 0x0 */
        /*0210*/                   MEMBAR.SC.GPU ;                            /* 0x0 */
        /*0220*/                   EXIT ;                                     /* 0x0 */
"""  # noqa: E501

SASS_MMA_SYNC = """\
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;      /* 0x0 */
        /*0010*/               @P0 BRA 0x40 ;                                 /* 0x0 */
        /*0040*/                   EXIT ;                                     /* 0x0 */
"""

AMDGCN = """\
_k:
	s_load_dwordx2 s[0:1], s[4:5], 0x0
.LBB0_1:                                ; =>This Inner Loop Header: Depth=1
	v_mfma_f32_32x32x8_bf16 v[0:15], v[16:17], v[18:19], v[0:15]
	buffer_wbl2 sc1
	global_atomic_add_f32 v0, v1, s[0:1]
	buffer_inv sc1
	s_cbranch_scc1 .LBB0_1
	buffer_wbl2 sc1
	s_endpgm
; NumVgprs: 128
; ScratchSize: 64
amdhsa.kernels:
  - .agpr_count:     0
    .group_segment_fixed_size: 0
    .sgpr_count:     40
    .sgpr_spill_count: 0
    .vgpr_count:     128
    .vgpr_spill_count: 16
"""

TTIR = """\
    %40 = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<128x64xbf16> * tensor<64x64xbf16> -> tensor<128x64xf32>
    %41 = tt.dot %d, %e, %f, inputPrecision = ieee : tensor<64x64xf32> * tensor<64x64xf32> -> tensor<64x64xf32>
    %42 = tt.dot %g, %h, %i : tensor<64x64xf16> * tensor<64x64xf16> -> tensor<64x64xf32>
"""  # noqa: E501
TTGIR = """\
    %40 = ttng.warp_group_dot %a, %b, %c {inputPrecision = 0 : i32} : !ttg.memdesc<128x64xbf16, #shared, #smem> * !ttg.memdesc<64x64xbf16, #shared1, #smem> -> tensor<128x64xf32, #mma>
    %41 = tt.dot %d, %e, %f, inputPrecision = ieee : tensor<64x64xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<64x64xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<64x64xf32, #blocked>
    %42 = tt.dot %g, %h, %i : tensor<64x64xf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 2}>> * tensor<64x64xf16, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 2}>> -> tensor<64x64xf32, #mma1>
    %43 = ttng.warp_group_dot_wait %40 {pendings = 0 : i32} : tensor<128x64xf32, #mma>
"""  # noqa: E501


def _env_without_interpreter(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # the compile tooling lives in the repo's bench/ (not in the installed package)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _run_tool(args: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """`python <args>` from the repository root, outside the interpreter, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env_without_interpreter(**env),
        timeout=timeout,
    )


# --- parsers --------------------------------------------------------------------------------------


def test_parse_ptxas_log() -> None:
    assert cc.parse_ptxas_log(PTXAS_LOG) == {
        "registers": 255,
        "stack_bytes": 352,
        "spill_store_bytes": 348,
        "spill_load_bytes": 360,
    }
    with pytest.raises(ValueError, match="not a ptxas -v log"):
        cc.parse_ptxas_log("ptxas info    : 0 bytes gmem\n")


def test_parse_res_usage() -> None:
    assert cc.parse_res_usage(RES_USAGE) == {
        "registers": 239,
        "stack_bytes": 16,
        "static_shared": 1024,
        "local_bytes": 0,
    }
    with pytest.raises(ValueError, match="res-usage"):
        cc.parse_res_usage("Function k:\n  REG:12\n")


def test_analyze_sass_counts_fences_inside_loops_only() -> None:
    facts = cc.analyze_sass(SASS_LOOP)
    assert facts["mma"] == "wgmma"
    assert facts["fences_main_loop"] == 1  # MEMBAR.ALL.GPU in the loop; MEMBAR.SC.GPU after it
    assert facts["cta_fences_main_loop"] == 1
    assert facts["loops"] == 1
    assert facts["mufu"] == 1
    assert facts["tma"] is False
    assert cc.loop_ranges(cc.sass_instructions(SASS_LOOP)) == [(0x100, 0x200)]
    other = cc.analyze_sass(SASS_MMA_SYNC)  # a forward branch is no loop
    assert other["mma"] == "mma.sync" and other["loops"] == 0 and other["fences_main_loop"] == 0
    with pytest.raises(ValueError, match="no SASS"):
        cc.analyze_sass("Fatbin elf code:\n")


def test_analyze_amdgcn() -> None:
    facts = cc.analyze_amdgcn(AMDGCN)
    assert facts["registers"] == 128 and facts["sgprs"] == 40
    assert facts["spill_bytes"] == 64 and facts["scratch_bytes"] == 64
    assert facts["mma"] == "mfma"
    assert facts["fences_main_loop"] == 2  # wbl2 + inv inside .LBB0_1; the one after is out
    with pytest.raises(ValueError, match="AMDGCN metadata"):
        cc.analyze_amdgcn("_k:\n\ts_endpgm\n")


def test_dot_counts() -> None:
    assert cc.dot_counts(TTIR, TTGIR) == {
        "dots": 3,
        "dots16": 2,
        "wgmma_dots": 1,
        "dots16_not_wgmma": 1,  # the f16 dot left as tt.dot (mma.sync); the fp32 one is not 16-bit
    }


# --- rules and the allow-list ---------------------------------------------------------------------


def _row(**kw: object) -> dict:
    row = {
        "target": "sm90",
        "triton": "3.6.0",
        "op": "attention",
        "kernel": "_attn_fwd_kernel",
        "case": "attention bf16 hd128 dense",
        "cases": ["attention bf16 hd128 dense"],
        "dtype": "bf16",
        "head_dim": 128,
        "compiled": True,
        "spill_bytes": 0,
        "dots16_not_wgmma": 0,
        "fences_main_loop": 0,
    }
    row.update(kw)
    return row


def test_violations() -> None:
    assert cc.violations(_row()) == []
    assert cc.violations(_row(compiled=False, error="x")) == ["compile"]
    assert cc.violations(_row(spill_bytes=24)) == ["spill"]
    # every 16-bit head dim up to 256 counts (the hd256 backward spilled kilobytes unnoticed);
    # spills are allowed in fp32 and off sm_90
    assert cc.violations(_row(spill_bytes=24, head_dim=256)) == ["spill"]
    assert cc.violations(_row(spill_bytes=24, dtype="fp32")) == []
    assert cc.violations(_row(spill_bytes=24, target="gfx942")) == []
    # the MNTP / InfoNCE kernels have no head dim: any spill counts
    assert cc.violations(_row(op="mntp_loss", head_dim=None, spill_bytes=8)) == ["spill"]
    assert cc.violations(_row(dots16_not_wgmma=1)) == ["wgmma"]
    assert cc.violations(_row(dots16_not_wgmma=1, target="gfx90a")) == []
    assert cc.violations(_row(fences_main_loop=8, target="gfx942")) == ["fence"]


def _known(tmp_path: Path, body: str) -> list[cc.KnownIssue]:
    path = tmp_path / "known.toml"
    path.write_text(textwrap.dedent(body))
    return cc.load_known_issues(path)


def test_check_against_allow_list(tmp_path: Path) -> None:
    known = _known(
        tmp_path,
        """
        [[known]]
        rule = "fence"
        target = "sm90"
        kernel = "_attn_bwd_dkdv_kernel"
        case = "attention bf16 hd* dense"
        reason = "acq_rel atomics for dQ; owner H14b"
        [[known]]
        rule = "spill"
        target = "sm90"
        kernel = "_mntp_*"
        case = "*"
        triton = "3.9.*"
        reason = "ptxas 13 allocates more registers"
        """,
    )
    dkdv = _row(kernel="_attn_bwd_dkdv_kernel", fences_main_loop=8)
    good = _row()
    report = cc.check([dkdv, good], known)
    assert report.ok and len(report.known) == 1 and not report.new
    assert [k.rule for k in report.unexercised] == ["spill"]  # no MNTP row in this run
    # a violation that is not listed fails, and the report names it
    bad = _row(kernel="_attn_fwd_kernel", spill_bytes=24, case="attention bf16 hd64 packed")
    report = cc.check([dkdv, bad], known)
    assert not report.ok and report.new == [("spill", bad)]
    assert "[spill]" in report.text() and "attention bf16 hd64 packed" in report.text()
    assert "FAILED" in report.text()
    # the listed launch compiles clean now: the entry must leave the list
    report = cc.check([_row(kernel="_attn_bwd_dkdv_kernel")], known)
    assert not report.ok and [k.kernel for k in report.fixed] == ["_attn_bwd_dkdv_kernel"]
    assert "remove them" in report.text()
    # the triton pattern scopes an entry
    mntp = _row(op="mntp_loss", kernel="_mntp_dw_kernel", spill_bytes=8, head_dim=None)
    assert cc.check([mntp], known).ok is False  # triton 3.6.0 is not 3.9.*
    assert cc.check([{**mntp, "triton": "3.9.0"}], known).ok


def test_load_known_issues_rejects_bad_entries(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reason"):
        _known(tmp_path, '[[known]]\nrule = "spill"\ntarget = "sm90"\nkernel = "k"\ncase = "*"\n')
    body = '[[known]]\nrule = "slow"\ntarget = "sm90"\nkernel = "k"\ncase = "*"\nreason = "r"\n'
    with pytest.raises(ValueError, match="rule must be one of"):
        _known(tmp_path, body)
    assert cc.load_known_issues(tmp_path / "missing.toml") == []


# Recorded quick-suite runs (bf16, sm_90) of the kernels as they were before the configs of
# 2026-12-07 (commit df50f39): the expanded check must fail on them, with exactly the spills the
# narrower suite missed (GQA/packed/window at head dim 64, every hd256 backward).
BEFORE_RUNS = {"3.6.0": "20261207T175648Z-6873efdf", "3.9.0": "20261207T175828Z-0f38a70f"}


def _recorded_rows(version: str, run_id: str) -> list[dict]:
    path = ROOT / "bench" / "results" / f"compile-{version}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["extra"] for r in rows if r["run_id"] == run_id and r.get("pass") != "host"]


def test_expanded_check_fails_on_the_recorded_old_kernels() -> None:
    old = _recorded_rows("3.6.0", BEFORE_RUNS["3.6.0"])
    assert len(old) > 50
    report = cc.check(old, cc.load_known_issues(ROOT / "bench" / "compile_known_issues.toml"))
    assert not report.ok
    spilled = {(row["kernel"], row["case"]): row["spill_bytes"] for rule, row in report.new}
    assert all(rule == "spill" for rule, _ in report.new)
    # the hd64 dK/dV launches the old quick suite never compiled (issue 26: 84-220 B)
    assert spilled[("_attn_bwd_dkdv_kernel", "attention bf16 hd64 gqa")] == 84
    assert spilled[("_attn_bwd_dkdv_kernel", "attention bf16 hd64 packed")] == 136
    assert spilled[("_attn_bwd_dkdv_kernel", "attention bf16 hd64 packed+window")] == 220
    det = ("_attn_bwd_dkdv_kernel", "attention bf16 hd64 deterministic+packed+window")
    assert spilled[det] == 60
    # head dim 256: the dQ kernel (292-636 B) and kilobytes in dK/dV, once outside the rule
    dq = [b for (k, c), b in spilled.items() if k == "_attn_bwd_dq_kernel" and "hd256" in c]
    dkdv = [b for (k, c), b in spilled.items() if k == "_attn_bwd_dkdv_kernel" and "hd256" in c]
    assert min(dq) == 292 and max(dq) == 636 and min(dkdv) > 3000
    # triton 3.9 (register report read with its --regAllocOptLevel=2): the hd256 forward too
    old39 = _recorded_rows("3.9.0", BEFORE_RUNS["3.9.0"])
    report39 = cc.check(old39, [])
    fwd = [row for _, row in report39.new if row["kernel"] == "_attn_fwd_kernel"]
    assert fwd and all(row["head_dim"] == 256 for row in fwd)
    assert all(
        row["ptxas_flags"].find("--regAllocOptLevel=2") >= 0
        for row in old39
        if "ptxas_flags" in row
    )


def test_repository_allow_list_is_valid() -> None:
    for entry in cc.load_known_issues(ROOT / "bench" / "compile_known_issues.toml"):
        assert entry.rule in cc.RULES and entry.reason.strip()


# --- real compiles (subprocess: no interpreter) ---------------------------------------------------

SMALL_KERNELS = """
import json, sys
import triton, triton.language as tl
from triton.compiler import ASTSource
from bench import compile_check as cc

@triton.jit
def matmul_loop(A, B, C, DQ, n, BLOCK: tl.constexpr, RELAXED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for k in range(0, n, BLOCK):
        a = tl.load(A + offs[:, None] * n + k + offs[None, :])
        b = tl.load(B + (k + offs[:, None]) * BLOCK + offs[None, :])
        acc = tl.dot(a, b, acc)
        if RELAXED:
            tl.atomic_add(DQ + offs[:, None] * BLOCK + offs[None, :], acc, sem="relaxed")
        else:
            tl.atomic_add(DQ + offs[:, None] * BLOCK + offs[None, :], acc)
    tl.store(C + offs[:, None] * BLOCK + offs[None, :], acc.to(tl.bfloat16))

sig = {"A": "*bf16", "B": "*bf16", "C": "*bf16", "DQ": "*fp32", "n": "i32",
       "BLOCK": "constexpr", "RELAXED": "constexpr"}
out = {}
# the flags triton itself passes to ptxas (fresh cache dir: ptxas runs) vs the re-run's
with cc.recording_ptxas() as rec:
    c = triton.compile(ASTSource(matmul_loop, sig, {"BLOCK": 64, "RELAXED": True}),
                       target=cc.gpu_target("sm90"), options={"num_warps": 4, "num_stages": 2})
ran = [cc.ptxas_flags(cmd) for cmd in rec.commands if "ptxas" in cmd[0]]
rerun = cc.rerun_ptxas(c.asm["ptx"], 90, c.metadata._asdict())
out["flags"] = {"triton": ran[-1], "rerun": rerun.rsplit("# ptxas flags: ", 1)[1].split(),
                "version": triton.__version__}
for target in ("sm90", "gfx942", "gfx90a"):
    for relaxed in (True, False):
        if target != "sm90" and not relaxed:
            continue
        src = ASTSource(matmul_loop, sig, {"BLOCK": 64, "RELAXED": relaxed})
        c = triton.compile(src, target=cc.gpu_target(target),
                           options={"num_warps": 4, "num_stages": 2})
        log = cc.rerun_ptxas(c.asm["ptx"], 90, c.metadata._asdict()) if target == "sm90" else ""
        out[f"{target}-{relaxed}"] = cc.analyze(c.asm, c.metadata, target, log)
json.dump(out, sys.stdout)
"""


def test_small_kernel_compiles_for_every_target(tmp_path: Path) -> None:
    script = tmp_path / "small_kernels.py"  # @triton.jit needs its source in a file
    script.write_text(SMALL_KERNELS)
    proc = _run_tool([str(script)], TRITON_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout)
    # the register report is read with exactly the options triton assembled the kernel with
    flags = facts.pop("flags")
    assert flags["rerun"] == flags["triton"] and "-v" in flags["triton"]
    major_minor = tuple(int(x) for x in flags["version"].split(".")[:2])
    if major_minor >= (3, 9):  # triton 3.9 works around a ptxas 13 bug with this option
        assert "--regAllocOptLevel=2" in flags["triton"], flags
    if major_minor <= (3, 6):
        assert "--regAllocOptLevel=2" not in flags["triton"], flags
    assert facts["sm90-True"]["ptxas_flags"] == " ".join(flags["triton"])
    sm90 = facts["sm90-True"]
    assert 0 < sm90["registers"] <= 255 and sm90["spill_bytes"] == 0
    assert sm90["mma"] == "wgmma" and sm90["dots16"] == 1 and sm90["dots16_not_wgmma"] == 0
    assert sm90["fences_main_loop"] == 0 and sm90["loops"] >= 1 and sm90["shared_bytes"] > 0
    # tl.atomic_add defaults to acq_rel: GPU-scope fences inside the loop
    assert facts["sm90-False"]["fences_main_loop"] > 0
    for amd in ("gfx942", "gfx90a"):
        assert facts[f"{amd}-True"]["mma"] == "mfma"
        assert 0 < facts[f"{amd}-True"]["registers"] <= 512
        assert facts[f"{amd}-True"]["fences_main_loop"] == 0


def test_suite_rows_from_the_real_launchers(tmp_path: Path) -> None:
    """bench.compile on the InfoNCE op for sm_90: launches found through the public op, one row
    each with the documented schema."""
    proc = _run_tool(
        ["-m", "bench.compile", "--quick", "--ops", "infonce", "--targets", "sm90", "--no-host",
         "--jobs", "1"],
        BIDIRLM_BENCH_RESULTS=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(tmp_path.glob("compile-*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert {r["impl"] for r in rows} >= {"_infonce_fwd_kernel", "_infonce_grad_kernel"}
    for row in rows:
        assert row["suite"] == "compile" and row["run_id"] == rows[0]["run_id"]
        extra = row["extra"]
        for key in ("target", "triton", "kernel", "config", "compiled", "error", "registers",
                    "spill_bytes", "shared_bytes", "mma", "tma", "fences_main_loop",
                    "violations"):  # fmt: skip
            assert key in extra, key
        assert extra["target"] == "sm90" and extra["compiled"] is True
        assert extra["config"]["num_warps"] >= 1
        assert any(k.startswith("BLOCK_") for k in extra["config"]), extra["config"]
        assert isinstance(extra["registers"], int) and isinstance(extra["violations"], list)
        if extra["dots16"]:  # the similarity kernels' bf16 dots
            assert extra["mma"] == "wgmma" and extra["dots16_not_wgmma"] == 0
    assert any(r["extra"]["dots16"] for r in rows)
    assert "| target | kernel |" in proc.stdout


@pytest.mark.compile_suite
@pytest.mark.skipif(
    os.environ.get("BIDIRLM_COMPILE_CHECK") != "1",
    reason="the full compile check takes minutes: set BIDIRLM_COMPILE_CHECK=1 (.ci/run does)",
)
def test_compile_check(tmp_path: Path) -> None:
    """Every quick-suite launch compiles for sm_90, gfx942 and gfx90a (BIDIRLM_COMPILE_TARGETS
    narrows them) with the triton on the path, and the rules hold except for the violations
    listed in bench/compile_known_issues.toml."""
    targets = os.environ.get("BIDIRLM_COMPILE_TARGETS", ",".join(cc.TARGETS))
    proc = _run_tool(
        ["-m", "bench.compile", "--quick", "--check", "--no-host", "--targets", targets],
        timeout=1800,
        BIDIRLM_BENCH_RESULTS=str(tmp_path),
    )
    report = proc.stdout[proc.stdout.find("compile check:") :]
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, f"compile check failed:\n{report}\n{proc.stderr[-3000:]}"


# --- the static performance model (bench/perf_model.py) ------------------------------------------


def _facts_row(kernel: str, pass_: str, **kw: object) -> dict:
    row = {
        "target": "sm90",
        "kernel": kernel,
        "pass": pass_,
        "compiled": True,
        "cases": ["attention bf16 hd128 dense"],
        "dots": 2,
        "mma": "wgmma",
        "spill_bytes": 0,
        "fences_main_loop": 0,
        "registers": 255,
        "shared_bytes": 160 * 1024,
        "config": {"num_warps": 8, "BLOCK_M": 64, "BLOCK_N": 64},
    }
    row.update(kw)
    return row


def test_perf_model_attention() -> None:
    from bench import perf_model as pm

    b, s, h, d = 4, 4096, 16, 128
    shape = {"pairs": b * s * s, "tokens": b * s, "heads": h, "kv_heads": h, "head_dim": d}
    clean = (_facts_row("_fwd", "fwd"), _facts_row("_dkdv", "bwd"))
    fwd = pm.predict_attention(**shape, pass_="fwd", rows=clean)
    assert fwd.flops == 4.0 * b * s * s * h * d
    assert fwd.bytes == 4 * b * s * h * d * 2 + b * s * h * 4  # q, k, v, o once + lse
    assert fwd.bound == "compute" and 100 < fwd.tflops < 989  # under the bf16 peak
    # the same call on an H200: same compute ceiling
    assert pm.predict_attention(**shape, pass_="fwd", gpu="h200", rows=clean).ms == fwd.ms
    # mma.sync, spills, a softcap and fences each cost time
    slow = (_facts_row("_fwd", "fwd", mma="mma.sync"),)
    assert pm.predict_attention(**shape, pass_="fwd", rows=slow).ms > 1.3 * fwd.ms
    spill = (_facts_row("_fwd", "fwd", spill_bytes=512),)
    assert pm.predict_attention(**shape, pass_="fwd", rows=spill).ms > 1.2 * fwd.ms
    assert pm.predict_attention(**shape, pass_="fwd", softcap=True, rows=clean).ms > fwd.ms
    bwd = pm.predict_attention(**shape, pass_="bwd", rows=clean)
    fenced = (_facts_row("_fwd", "fwd"), _facts_row("_dkdv", "bwd", fences_main_loop=8))
    bad = pm.predict_attention(**shape, pass_="bwd", rows=fenced)
    assert bad.bound == "fences" and bad.ms > 2 * bwd.ms
    both = pm.predict_attention(**shape, pass_="fwd+bwd", rows=clean)
    assert both.ms == pytest.approx(fwd.ms + bwd.ms) and both.flops == 3.5 * fwd.flops
    with pytest.raises(ValueError, match="pass_"):
        pm.predict_attention(**shape, pass_="both", rows=clean)


def test_perf_model_memory_bound_and_losses() -> None:
    from bench import perf_model as pm

    # d = 16 attention at short length moves more bytes than it computes: HBM decides
    p100 = pm.predict_attention(pairs=64 * 64 * 64, tokens=64 * 64, heads=1, kv_heads=1,
                                head_dim=16, pass_="fwd", rows=())  # fmt: skip
    p200 = pm.predict_attention(pairs=64 * 64 * 64, tokens=64 * 64, heads=1, kv_heads=1,
                                head_dim=16, pass_="fwd", gpu="h200", rows=())  # fmt: skip
    assert p100.parts["memory_ms"] == pytest.approx(p200.parts["memory_ms"] * 4.8 / 3.35)
    mntp = pm.predict_mntp(rows_labelled=9830, tokens=32768, d=1024, vocab=151936, rows=())
    assert mntp.flops == 2.0 * 9830 * 1024 * 151936 and mntp.bound == "compute"
    both = pm.predict_mntp(rows_labelled=9830, tokens=32768, d=1024, vocab=151936,
                           pass_="fwd+bwd", rows=())  # fmt: skip
    assert both.flops == 8.0 * 9830 * 1024 * 151936
    info = pm.predict_infonce(queries=512, docs=4096, d=1024, pass_="fwd", rows=())
    assert info.flops == 2.0 * 512 * 4096 * 1024
    fp32 = pm.predict_infonce(queries=512, docs=4096, d=1024, dtype="fp32", rows=())
    assert fp32.ms > 5 * info.ms  # FMA, not the tensor cores
    assert pm.gpu_of("nvidia-h200") == "h200" and pm.gpu_of("cpu-x86_64") is None


def test_perf_model_merges_kernel_facts() -> None:
    from bench import perf_model as pm

    rows = (
        _facts_row("_pre", "bwd", dots=0, mma="none", registers=40),
        _facts_row("_dkdv", "bwd", fences_main_loop=8, spill_bytes=64),
        _facts_row("_dq", "bwd", mma="wgmma+mma.sync", registers=200),
        _facts_row("_fwd", "fwd", cases=["attention bf16 hd64 dense"]),
    )
    facts = pm.kernel_facts("attention bf16 hd128 dense", "bwd", rows)
    assert facts["mma"] == "mma.sync" and facts["fences"] == 8 and facts["spill_bytes"] == 64
    assert facts["kernels"] == ["_dkdv", "_dq", "_pre"]
    assert pm.kernel_facts("attention bf16 hd128 dense", "fwd", rows) == {}
    assert pm.occupancy(pm.GPUS["h100"], 255, 256, 160 * 1024) == 1
    assert pm.occupancy(pm.GPUS["h100"], 64, 128, 32 * 1024) == 7  # 228 KiB / 32 KiB


def test_error_line_names_the_innermost_message() -> None:
    class CompilationError(Exception):  # the shape of triton's: location + source, real cause
        pass

    inner = AssertionError("input_precision must be one of ('ieee', 'bf16x3'). Got tf32")
    try:
        try:
            raise inner
        except AssertionError as exc:
            raise CompilationError("at 48:14:\n    acc = tl.dot(x, y)\n          ^") from exc
    except CompilationError as outer:
        line = cc._error(outer)
    assert line.startswith("AssertionError: at 48:14:") and "Got tf32" in line
    assert "\n" not in line
    ptxas = RuntimeError("`ptxas` failed\nptxas error : bad\nRepro command: ptxas -v x.ptx")
    assert cc._error(ptxas) == "RuntimeError: `ptxas` failed ptxas error : bad"


def test_recording_restores_what_it_patches() -> None:
    from triton.runtime.jit import JITFunction

    from bidirlm.kernels import config, dispatch

    before = (JITFunction.run, dispatch.decide, config.arch_key, config.is_hip)
    with pytest.raises(RuntimeError, match="boom"), cc.recording("amd-gfx942"):
        assert config.arch_family(__import__("torch").device("cpu")) == "cdna"
        assert dispatch.decide("cpu").impl == "triton"
        raise RuntimeError("boom")
    assert (JITFunction.run, dispatch.decide, config.arch_key, config.is_hip) == before
    with pytest.raises(ValueError, match="target must be one of"):
        cc.gpu_target("sm80")


# --- the SASS-level model ---------------------------------------------------------------------


def _loop(n_ss: int, n_rs: int, n: int = 128, **kw: int) -> dict:
    hgmma = [[64, n, 16, False]] * n_ss + [[64, n, 16, True]] * n_rs
    return {"hgmma": hgmma, "instructions": 400, "mufu": 64, "lds_bytes": 0, "sts_bytes": 0,
            "hmma": 0, "local": 0, **kw}  # fmt: skip


def test_loop_cycles_terms() -> None:
    from bench import perf_model as pm

    c = pm.loop_cycles(_loop(8, 8), num_warps=8, num_stages=3, eta=0.5)
    assert c["mma"] == 2 * 16 * 128 / 2 / 0.5  # two warpgroups, m64n128k16 = 64 cycles at peak
    # A (2 KiB) only for the 8 shared-memory-A wgmma, B (4 KiB) for all 16, per warpgroup
    assert c["smem"] == 2 * (8 * 2048 + 16 * 4096) / 128
    assert c["issue"] == 8 * 400 / 4 and c["mufu"] == 8 * 32 * 64 / 16
    assert c["load"] == 0 and c["serial"] == c["mma"] + c["mufu"]
    one_stage = pm.loop_cycles(_loop(8, 8), num_warps=8, num_stages=1, eta=0.5)
    assert one_stage["serial"] == c["serial"] + pm.LOAD_LATENCY  # nothing prefetched
    spilled = pm.loop_cycles(_loop(8, 8, local=40), num_warps=8, num_stages=3, eta=0.5)
    assert spilled["smem"] > c["smem"]


def test_predict_kernel_occupancy_and_waves() -> None:
    from bench import perf_model as pm

    calib = pm.Calibration(0.5, pm.LOAD_LATENCY, "test")
    row = {"kernel": "k", "registers": 128, "shared_bytes": 50 * 1024, "main_loop": _loop(4, 4),
           "config": {"num_warps": 4, "num_stages": 2}}  # fmt: skip
    assert pm.row_occupancy(pm.GPUS["h100"], row) == 4  # 128 regs x 128 threads; 51 KiB smem
    k = pm.predict_kernel(row, programs=132 * 4 * 3, trips=10, calib=calib)
    assert k.occupancy == 4 and k.waves == 3
    assert k.executed_flops == 2 * (8 * 64 * 128 * 16) * 10 * 132 * 4 * 3
    # four resident programs do not hide one another's non-MMA work: four serial chains per trip
    assert not pm.CO_RESIDENT_OVERLAP
    assert k.bound == "mma" and k.cycles["per_trip"] == 4 * k.cycles["serial"]
    assert k.cycles["serial"] == k.cycles["mma"] + max(k.cycles["issue"], k.cycles["mufu"])
    # the alternative (perfect overlap): the tensor cores (4 x mma) bound the trip
    ov = pm.predict_kernel(row, programs=132 * 4 * 3, trips=10, calib=calib, overlap=True)
    assert (
        ov.bound == "mma" and ov.cycles["per_trip"] == 4 * ov.cycles["mma"] < k.cycles["per_trip"]
    )
    lone = pm.predict_kernel({**row, "registers": 255}, programs=132, trips=10, calib=calib)
    assert lone.occupancy == 1 and lone.cycles["per_trip"] == lone.cycles["serial"]
    one_stage = {**row, "registers": 255, "config": {"num_warps": 4, "num_stages": 1}}
    lat = pm.predict_kernel(
        {**one_stage, "main_loop": _loop(1, 1, n=16)}, programs=132, trips=10, calib=calib
    )
    assert lat.bound == "latency" and lat.cycles["load"] == pm.LOAD_LATENCY


SASS_TWO_LOOPS = """\
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ; /* 0x0 */
        /*0010*/                   FMNMX R3, R2, R3, !PT ;                    /* 0x0 */
        /*0020*/                   MUFU.EX2 R3, R2 ;                          /* 0x0 */
        /*0030*/              @!P0 BRA 0x0 ;                                  /* 0x0 */
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ; /* 0x0 */
        /*0050*/              @!P0 BRA 0x40 ;                                 /* 0x0 */
        /*0060*/                   EXIT ;                                     /* 0x0 */
"""  # noqa: E501


def test_main_loop_shortest_and_longest_body() -> None:
    """Two loops with one wgmma each: the main loop is the shorter (the unmasked interior, or the
    fixed-maxima loop), `longest_loop` the longer (an online-softmax block)."""
    facts = cc.analyze_sass(SASS_TWO_LOOPS)
    assert facts["main_loop"]["instructions"] == 2 and facts["main_loop"]["mufu"] == 0
    assert facts["longest_loop"]["instructions"] == 4 and facts["longest_loop"]["mufu"] == 1


def test_fixed_max_forward_charges_one_trip_at_the_longest_loop() -> None:
    """A FIXED_MAX forward: one trip at `longest_loop`, the rest at `main_loop`, one launch;
    without the flag (or the facts) every trip at the main loop."""
    from bench import perf_model as pm

    calib = pm.Calibration(0.5, pm.LOAD_LATENCY, "test")
    fast, slow = _loop(4, 4, instructions=2000), _loop(4, 4, instructions=3000)
    row = {"kernel": "_attn_fwd_kernel", "registers": 255, "shared_bytes": 100 * 1024,
           "main_loop": fast, "longest_loop": slow,
           "config": {"num_warps": 8, "num_stages": 2, "FIXED_MAX": True}}  # fmt: skip
    k = pm.fixed_max_forward(row, programs=132, trips=16, calib=calib)
    all_fast = pm.predict_kernel(row, programs=132, trips=16, calib=calib)
    all_slow = pm.predict_kernel({**row, "main_loop": slow}, programs=132, trips=16, calib=calib)
    launch = pm.GPUS["h100"].launch_us * 1e-3
    per_trip_fast, per_trip_slow = (all_fast.ms - launch) / 16, (all_slow.ms - launch) / 16
    assert k.ms == pytest.approx(launch + 15 * per_trip_fast + per_trip_slow)
    assert k.executed_flops == all_fast.executed_flops
    online = {**row, "config": {**row["config"], "FIXED_MAX": False}}
    assert pm.fixed_max_forward(online, programs=132, trips=16, calib=calib).ms == all_fast.ms
    old = {k_: v for k_, v in row.items() if k_ != "longest_loop"}
    assert pm.fixed_max_forward(old, programs=132, trips=16, calib=calib).ms == all_fast.ms


def test_shared_memory_fed_wgmma_runs_at_the_feed_rate() -> None:
    """m64n32k16 with both operands in shared memory needs 3 KiB per 16 cycles (192 B/clk at the
    nominal rate, 128 B/clk available): the feed sets its time, and eta applies to that."""
    from bench import perf_model as pm

    loop = {"hgmma": [[64, 32, 16, False]] * 16, "instructions": 0, "mufu": 0}
    c = pm.loop_cycles(loop, num_warps=4, num_stages=2, eta=0.5)
    assert c["smem"] == 16 * 3072 / 128 and c["mma"] == c["smem"] / 0.5
    off = pm.loop_cycles(loop, num_warps=4, num_stages=2, eta=0.5, feed_limited=False)
    assert off["mma"] == 16 * 16 / 0.5 < c["mma"]  # the nominal rate only
    wide = {"hgmma": [[64, 128, 16, True]] * 4, "instructions": 0, "mufu": 0}
    w = pm.loop_cycles(wide, num_warps=4, num_stages=2, eta=0.5)
    assert w["mma"] == 4 * 64 / 0.5  # B only from shared memory: 64 B/clk, tensor-bound


def test_calibration_row_and_report() -> None:
    """The committed calibration (the tutorial-equivalent kernels compiled with this triton):
    eta is fitted on the published forward; the a-priori eta already predicts it within 15%."""
    from bench import perf_model as pm

    calib = pm.calibration()
    fwd = calib.tutorial["fwd"]
    assert 0.3 < calib.eta < 1.0 and abs(fwd["error"]) < 0.01
    assert abs(fwd["prior_error"]) < 0.15 and fwd["published_tflops"] == pytest.approx(459.6)
    line = pm.calibration_line(calib)
    assert "published" in line and "PR #205" in line
    # the backward at the shape of its one published H100 figure, with its error printed as is
    bwd = calib.tutorial["bwd_published"]
    assert bwd["published_tflops"] == pytest.approx(264.718)
    assert bwd["error"] == pytest.approx(bwd["predicted_tflops"] / 264.718 - 1, abs=1e-3)
    fwd_line, bwd_line = line.splitlines()
    assert fwd_line.startswith("calibration (H100") and "PR #83" in bwd_line
    # the model as chosen, and each alternative of its two switches, on that figure
    assert len(bwd["variants"]) == 4 and "co-resident overlap on" in bwd_line
    assert "causal B4 H32 D64 N16384" in bwd_line and f"{100 * bwd['error']:+.1f}%" in bwd_line
    rows = (
        {"kernel": "_attn_fwd_kernel", "compiled": True, "pass": "fwd", "registers": 200,
         "shared_bytes": 96 * 1024, "cases": ["attention bf16 hd128 dense"],
         "config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
         "main_loop": _loop(4, 4, n=64)},
    )  # fmt: skip
    report = pm.attention_report(rows, head_dims=(128,))
    assert report.splitlines()[:2] == line.splitlines()
    fwd_row = next(r for r in report.splitlines() if r.startswith("| fwd | 128 |"))
    assert "| 368 | 638 |" in fwd_row  # FA2 / FA3 published figures beside the prediction
    (k,) = pm.attention_kernels(4, 4096, 16, 128, "fwd", rows)  # the kernel's own TFLOP/s
    assert fwd_row.endswith(f" {k.executed_flops / (k.ms * 1e-3) / 1e12:.0f} |")
    assert "(no compile rows)" in next(r for r in report.splitlines() if r.startswith("| bwd"))


def test_compile_rows_take_each_case_from_its_newest_run(tmp_path: Path) -> None:
    """A later run of one op's suite replaces that op's rows only: the model keeps the attention
    rows of the earlier run (and never reads AMD or host rows)."""
    from bench import perf_model as pm

    def row(run: str, case: str, regs: int, target: str = "sm90") -> str:
        extra = {"target": target, "cases": [case], "kernel": "k", "registers": regs}
        return json.dumps({"suite": "compile", "pass": "fwd", "run_id": run, "extra": extra})

    path = tmp_path / "compile-x.jsonl"
    lines = [
        row("a", "attention bf16 hd128 dense", 100),
        row("a", "mntp_loss bf16 plain", 101),
        row("b", "mntp_loss bf16 plain", 201),
        row("b", "mntp_loss bf16 plain", 202, "gfx942"),
    ]
    path.write_text("\n".join(lines) + "\n")
    pm.compile_rows.cache_clear()
    try:
        got = {(r["cases"][0], r["registers"]) for r in pm.compile_rows(str(path))}
    finally:
        pm.compile_rows.cache_clear()
    assert got == {("attention bf16 hd128 dense", 100), ("mntp_loss bf16 plain", 201)}


def test_warp_specialization_probe(tmp_path: Path) -> None:
    """bench/ws_probe.py reads the MMA loop of each variant it compiles (8 warps, K/V on host
    descriptors: 16 HGMMA and 66 MUFU per warp at 128 x 128, hd128, no spill) and turns a
    compiler rejection into a one-line reason instead of an exception."""
    code = (
        "import json; from bench import ws_probe as w; "
        "print(json.dumps([w.probe('kv-descriptors', 8, False), w.probe('pointers', 4, True)]))"
    )
    proc = _run_tool(["-c", code], TRITON_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, specialized = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain["compiled"] and plain["warps"] == 8 and plain["setmaxnreg"] == 0
    assert (plain["hgmma"], plain["mufu"], plain["local"]) == (16, 66, 0), plain
    assert plain["loop_instructions"] > 16 + 66
    if specialized["compiled"]:  # a triton that takes this loop adds a producer warpgroup
        assert specialized["warps"] > 4 and specialized["setmaxnreg"] > 0, specialized
    else:
        assert specialized["error"] and "\n" not in specialized["error"], specialized
