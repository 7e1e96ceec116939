"""`bidirlm merge` safety: every bad input is a one-line error naming the model and tensor, the
output appears only when complete, nothing is left behind on failure or SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bidirlm import cli
from bidirlm.runtime.merging.merge import MergeError, merge, merge_from_config, parse_size
from tests.merging.fixtures import bits_equal, load_folder, write_raw

BIDIRLM = Path(sys.executable).with_name("bidirlm")


def toy(seed: int, *, vocab: int = 16, layers: int = 2, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(vocab, 8, generator=gen)}
    for i in range(layers):
        t[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(12, 8, generator=gen)
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(8, generator=gen)
    t["model.norm.weight"] = torch.randn(8, generator=gen)
    return {k: v.to(dtype) for k, v in t.items()}


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return write_raw(tmp_path / "a", toy(1)), write_raw(tmp_path / "b", toy(2))


def yaml_for(*models: Path, extra: str = "", method: str = "linear") -> str:
    lines = [f"merge_method: {method}", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters: {weight: 1.0}"]
    return "\n".join(lines) + "\n" + textwrap.dedent(extra)


def leftovers(parent: Path, name: str = "out") -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]


def run_cli(
    tmp_path: Path, text: str, *args: str, capsys=None, quiet: bool = True
) -> tuple[int, str, str]:
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    rc = cli.main(["merge", str(cfg), str(tmp_path / "out"), *args] + ["--quiet"] * quiet)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_merges_and_prints_report(pair, tmp_path, capsys):
    rc, out, err = run_cli(
        tmp_path, yaml_for(*pair), "--report", "--out-shard-size", "1KB", capsys=capsys
    )
    assert rc == 0, err
    assert "merged 2 models" in out and "cosine similarity to" in out and "overall" in out
    merged = load_folder(tmp_path / "out")
    a, b = load_folder(pair[0]), load_folder(pair[1])
    for n, t in merged.items():
        assert bits_equal(t, (a[n] + b[n]) / 2), n
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "out" / "merge_report.json").is_file()
    # an existing output is refused without --force, replaced with it
    rc, _, err = run_cli(tmp_path, yaml_for(*pair), capsys=capsys)
    assert rc == 1 and "already exists" in err and "--force" in err
    rc, _, err = run_cli(
        tmp_path, yaml_for(*pair), "--force", "--dtype", "bf16", capsys=capsys, quiet=False
    )
    assert rc == 0, err
    assert err.splitlines()[-1] == "merge: 6/6 tensors (100%)"  # log lines when not a terminal
    assert {t.dtype for t in load_folder(tmp_path / "out").values()} == {torch.bfloat16}
    assert not (tmp_path / "out" / "merge_report.json").exists()
    assert leftovers(tmp_path) == ["out"]


def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])


def _corrupt_header(folder: Path) -> None:
    f = folder / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:12] = b"\x00\x7f{["
    f.write_bytes(bytes(raw))


def _drop_tensor(folder: Path) -> None:
    t = toy(2)
    del t["model.layers.1.mlp.up_proj.weight"]
    shutil.rmtree(folder)
    write_raw(folder, t)


def _reshape(folder: Path) -> None:
    t = toy(2)
    t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(10, 8)
    shutil.rmtree(folder)
    write_raw(folder, t)


def _vocab(folder: Path) -> None:
    shutil.rmtree(folder)
    write_raw(folder, toy(2, vocab=20))


def _index_missing_shard(folder: Path) -> None:
    index = {
        "metadata": {},
        "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")


BAD_INPUTS = {
    "truncated": (_truncate, ["model.safetensors", "truncated", "/b"]),
    "corrupt-header": (_corrupt_header, ["corrupt", "/b"]),
    "missing-tensor": (_drop_tensor, ["model.layers.1.mlp.up_proj.weight", "missing", "/b"]),
    "shape": (_reshape, ["shape mismatch", "model.layers.0.mlp.up_proj.weight", "[10, 8]", "/b"]),
    "vocab": (_vocab, ["vocabulary size mismatch", "model.embed_tokens.weight", "20", "/b"]),
    "index": (_index_missing_shard, ["model-00002-of-00002.safetensors", "missing", "/b"]),
    "no-weights": (_no_weights, ["no .safetensors", ".bin", "/b"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_model_and_tensor(case, pair, tmp_path, capsys):
    damage, needles = BAD_INPUTS[case]
    damage(pair[1])
    rc, out, err = run_cli(tmp_path, yaml_for(*pair), capsys=capsys)
    assert rc == 1
    assert err.startswith("bidirlm merge: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err
    assert leftovers(tmp_path) == []


BAD_CONFIGS = {
    "unknown-key": ("mergekit_version: 1\n", "unknown key 'mergekit_version'"),
    "slices": ("slices: []\n", "give either `models:` or `slices:`"),
    "method": ("", "merge_method 'frankenmerge' is not supported"),
    "no-base": ("", "needs `base_model:`"),
    "dtype": ("dtype: int4\n", "dtype 'int4' is not supported"),
    "param": ("parameters: {densty: 0.5}\n", "unknown parameter 'densty'"),
    "take-nothing": ("", "take pattern 'vision.*'"),
    "exclude-nothing": ("exclude: ['nope.*']\n", "exclude pattern 'nope.*' matches no tensor"),
    "zero-sum": ("", "sum to 0"),
    "hub-id": ("", "Hub ids are not fetched"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_errors(case, pair, tmp_path, capsys):
    extra, needle = BAD_CONFIGS[case]
    text = yaml_for(*pair, extra=extra)
    if case == "method":
        text = text.replace("linear", "frankenmerge")
    elif case == "no-base":
        text = text.replace("linear", "task_arithmetic")
    elif case == "take-nothing":
        text = text.replace("weight: 1.0}", "weight: 1.0}\n    take: ['vision.*']", 1)
    elif case == "zero-sum":
        text = text.replace("weight: 1.0", "weight: -1.0", 1)
    elif case == "hub-id":
        text = text.replace(str(pair[1]), "Qwen/Qwen3-0.6B")
    rc, _, err = run_cli(tmp_path, text, capsys=capsys)
    assert rc == 1 and needle in err and err.count("\n") == 1, err
    assert leftovers(tmp_path) == []


def test_api_errors(pair, tmp_path):
    a, b = pair
    with pytest.raises(MergeError, match="2 weights for 1 models"):
        merge([a], [1, 1], tmp_path / "out")
    with pytest.raises(MergeError, match="task_arithmetic' only"):
        merge([a], [1], tmp_path / "out", base=b)
    with pytest.raises(MergeError, match="not in models/base"):
        merge([a, b], [1, 1], tmp_path / "out", take={tmp_path / "c": ["x"]})
    with pytest.raises(MergeError, match="taken from two models"):
        merge([a, b], [1, 1], tmp_path / "out", take={a: ["model.norm.*"], b: ["*.norm.weight"]})
    with pytest.raises(MergeError, match="rename maps both"):
        merge(
            [a, b],
            [1, 1],
            tmp_path / "out",
            rename={a: {"model.norm.": "model.layers.0.input_layernorm."}},
        )
    with pytest.raises(MergeError, match="listed twice"):
        merge([a, a], [1, 1], tmp_path / "out")
    with pytest.raises(MergeError, match="threads"):
        merge([a, b], [1, 1], tmp_path / "out", threads=-1)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    with pytest.raises(MergeError, match="not a size"):
        parse_size("5 parsecs")
    with pytest.raises(MergeError, match="ambiguous"):
        parse_size("5B")
    assert leftovers(tmp_path) == []


def test_take_exclude_rename_and_task_arithmetic(tmp_path):
    base = write_raw(tmp_path / "base", toy(0))
    ft = toy(1)
    ft = {k.replace("model.", "model.language_model.", 1): v for k, v in ft.items()}
    ft["model.visual.proj.weight"] = torch.randn(3, 4)
    ft["model.language_model.extra.weight"] = torch.ones(2)
    ft["steps"] = torch.tensor([3], dtype=torch.int64)
    vl = write_raw(tmp_path / "vl", ft)
    base_t = toy(0)
    base_t["steps"] = torch.tensor([3], dtype=torch.int64)
    shutil.rmtree(base)
    write_raw(base, base_t)
    kwargs = dict(
        method="task_arithmetic",
        base=base,
        rename={vl: {"model.language_model.": "model."}},
        take={vl: ["model.visual.*"]},
        exclude=["model.extra.*"],
    )
    merge([vl], [0.5], tmp_path / "out", **kwargs)
    out, b = load_folder(tmp_path / "out"), load_folder(base)
    assert "model.extra.weight" not in out and bits_equal(
        out["model.visual.proj.weight"], ft["model.visual.proj.weight"]
    )
    assert torch.equal(out["steps"], ft["steps"])  # equal integer buffers are copied
    for n in toy(0):
        src = ft[n.replace("model.", "model.language_model.", 1)]
        torch.testing.assert_close(out[n], b[n] + 0.5 * (src - b[n]))
    # integer buffers that differ between models are an error (mergekit's rule too)
    base_t["steps"] = torch.tensor([4], dtype=torch.int64)
    shutil.rmtree(base)
    write_raw(base, base_t)
    with pytest.raises(MergeError, match="steps is not floating point and differs"):
        merge([vl], [0.5], tmp_path / "out2", **kwargs)
    assert not (tmp_path / "out2").exists()


def test_failure_mid_write_leaves_nothing(pair, tmp_path):
    def boom(name: str, done: int, total: int) -> None:
        if done == 2:
            assert any(p.name.startswith(".out.tmp-") for p in (tmp_path / "sub").iterdir())
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        merge(list(pair), [1, 1], tmp_path / "sub" / "out", on_tensor=boom, threads=2)
    assert not (tmp_path / "sub").exists()  # the parent it created is gone too


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from bidirlm.runtime.merging.merge import merge_from_config

def pause(name, done, total):
    if done == 3:
        Path(sys.argv[3]).write_text("writing")
        time.sleep(600)

merge_from_config(sys.argv[1], sys.argv[2], on_tensor=pause, shard_size="1KB")
"""


def test_sigkill_mid_merge_leaves_no_output(pair, tmp_path):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml_for(*pair))
    marker = tmp_path / "marker"
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(cfg), str(out), str(marker)],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "merge exited before reaching the pause"
            assert time.monotonic() < deadline, "merge never started writing"
            time.sleep(0.05)
        tmp = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        assert len(tmp) == 1 and any(tmp[0].glob("model-*.safetensors"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    # the next run removes the dead run's temporary folder and completes
    merge_from_config(cfg, out)
    assert leftovers(tmp_path) == ["out"]


def test_console_script_error_has_no_traceback(pair, tmp_path):
    if not BIDIRLM.exists():
        pytest.skip(f"console script not installed at {BIDIRLM}")
    _vocab(pair[1])
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml_for(*pair))
    proc = subprocess.run(
        [str(BIDIRLM), "merge", str(cfg), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("bidirlm merge: error: vocabulary size mismatch")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert leftovers(tmp_path) == []


def test_empty_and_scalar_tensors(tmp_path):
    a = write_raw(
        tmp_path / "a", {"e": torch.zeros(0, 4), "s": torch.tensor(2.0), "z": -torch.zeros(3)}
    )
    b = write_raw(
        tmp_path / "b", {"e": torch.zeros(0, 4), "s": torch.tensor(4.0), "z": -torch.zeros(3)}
    )
    merge([a, b], [1, 1], tmp_path / "out")
    out = load_folder(tmp_path / "out")
    assert out["e"].shape == (0, 4) and out["s"].item() == 3.0
    assert bits_equal(out["z"], torch.zeros(3))  # +0, as mergekit's 0 + (-0) accumulation gives


# ------------------------------------------------------------------ issue 13: safety


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_yaml_parameters_are_rejected_naming_the_key(pair, tmp_path, capsys, value):
    text = yaml_for(*pair).replace("weight: 1.0", f"weight: {value}", 1)
    rc, _, err = run_cli(tmp_path, text, capsys=capsys)
    assert rc == 1 and f"weight of model {pair[0]} must be a finite number" in err, err
    assert err.count("\n") == 1 and leftovers(tmp_path) == []
    text = yaml_for(pair[1], extra=f"base_model: {pair[0]}\nparameters: {{lambda: {value}}}\n")
    rc, _, err = run_cli(tmp_path, text.replace("linear", "task_arithmetic"), capsys=capsys)
    assert rc == 1 and "lambda must be a finite number" in err, err
    assert leftovers(tmp_path) == []


def test_non_finite_merge_output_is_never_published(tmp_path, capsys):
    # finite float16 inputs whose sum overflows (normalize off), and an input holding an Inf
    big = {k: torch.full_like(v, 60000.0) for k, v in toy(1, dtype=torch.float16).items()}
    a, b = write_raw(tmp_path / "a", big), write_raw(tmp_path / "b", big)
    with pytest.raises(MergeError, match=r"tensor model\.\S+ of the merge has non-finite values"):
        merge([a, b], [1, 1], tmp_path / "out", normalize=False)
    assert leftovers(tmp_path) == []
    inf = toy(2)
    inf["model.norm.weight"][3] = float("inf")
    c = write_raw(tmp_path / "c", inf)
    rc, _, err = run_cli(tmp_path, yaml_for(write_raw(tmp_path / "d", toy(3)), c), capsys=capsys)
    assert rc == 1 and "tensor model.norm.weight of the merge has non-finite" in err, err
    assert leftovers(tmp_path) == []
    # the explicit opt-out writes it (inputs that hold Inf on purpose)
    rc, _, _ = run_cli(tmp_path, yaml_for(tmp_path / "d", c), "--allow-non-finite", capsys=capsys)
    assert rc == 0 and torch.isinf(load_folder(tmp_path / "out")["model.norm.weight"][3])


def test_force_never_replaces_an_input_or_the_working_directory(pair, tmp_path, monkeypatch):
    a, b = pair
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out in (tmp_path, a, b):
        with pytest.raises(MergeError, match="is the input|contains the input"):
            merge([a, b], [1, 1], out, force=True)
    work = tmp_path / "x" / "y"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (".", ".."):
        with pytest.raises(MergeError, match="working directory"):
            merge([a, b], [1, 1], out, force=True)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "x"]


def test_sigterm_mid_merge_removes_the_temporary_folder(pair, tmp_path):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml_for(*pair))
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(cfg), str(tmp_path / "out"), str(marker)],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
        proc.wait()
    assert leftovers(tmp_path) == []


def test_later_merge_removes_stale_temporaries_of_dead_processes(pair, tmp_path):
    from bidirlm.runtime.outputs import host_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = host_tag()
    stale = tmp_path / f".other.tmp-{dead.pid}-{host}-0badc0de"  # kill -9 of a merge to "other"
    alive = tmp_path / f".other.tmp-{os.getpid()}-{host}-0badc0de"  # a merge still running
    for folder in (stale, alive):
        folder.mkdir()
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
    merge(list(pair), [1, 1], tmp_path / "out")
    assert not stale.exists() and alive.exists() and (tmp_path / "out").is_dir()
