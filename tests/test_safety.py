"""File safety of every command (issue 13): atomic outputs, output locks, outputs that never swallow
their inputs or the working directory, one-line errors for corrupt checkpoints, NaN/Inf weights,
read-only or full output folders, and the cleanup of temporaries left by killed processes.

Read-only and full folders are simulated by making the write calls raise OSError(EROFS/ENOSPC):
the tests run as root, where chmod does not stop writes (the chmod variant runs for other users).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bidirlm.cli import main
from bidirlm.runtime import outputs
from bidirlm.runtime.models import CheckpointError, load_model
from bidirlm.runtime.outputs import AtomicFolder, OutputError, OutputLock, check_output
from tests.models.test_models import CORPUS, build_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
IS_ROOT = os.geteuid() == 0


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    monkeypatch.delenv("BIDIRLM_ALLOW_NON_FINITE", raising=False)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    """transformers' warnings go to a handler bound to the stderr of the test that first logged
    (closed by pytest since): silence them so that stderr holds only our output."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("qwen3-gqa", tmp_path_factory.mktemp("safety") / "model")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The error: one line, the last on stderr (train logs progress lines before it,
    transformers a progress bar)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1] if err else ""
    assert last.startswith(f"bidirlm {command}: error:"), err
    assert err.count("error:") == 1, err
    return last


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------ outputs vs inputs and cwd


def test_check_output_refuses_cwd_its_parents_home_and_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for bad in (".", "..", str(tmp_path / "a"), str(tmp_path)):
        with pytest.raises(OutputError, match="working directory"):
            check_output(bad)
    with pytest.raises(OutputError, match="home folder"):
        check_output(Path.home())
    run = tmp_path / "run"
    with pytest.raises(OutputError, match=r"contains the input .*final"):
        check_output(run, inputs=[run / "final"])
    with pytest.raises(OutputError, match="is the input"):
        check_output(run / "final", inputs=[run / "final"])
    assert check_output(run / "st", inputs=[run / "final"]) == run / "st"  # a sibling is fine
    assert check_output("c") == Path("c")  # a new folder inside the working directory


def test_atomic_folder_replaces_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        with AtomicFolder(target):
            pass
    with pytest.raises(RuntimeError, match="disk on fire"):
        with AtomicFolder(target, force=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("disk on fire")
    assert _names(tmp_path) == ["out"] and _names(target) == ["old.txt"]  # old kept, no temp
    folder = AtomicFolder(target, force=True)
    with folder as tmp:
        (tmp / "new.txt").write_text("new")
        folder.commit()
    assert _names(tmp_path) == ["out"] and _names(target) == ["new.txt"]


def test_stale_temporaries_removed_only_when_ours_and_dead_on_this_host(tmp_path: Path) -> None:
    host, dead = outputs.host_tag(), _dead_pid()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    names = {
        f".x.tmp-{dead}-{host}-0123abcd": False,  # killed run of ours: removed
        f".y.tmp-{dead}-{host}-0123abcd": False,  # another output's leftover, same parent
        f".x.tmp-{os.getpid()}-{host}-0123abcd": True,  # alive (this process)
        f".x.tmp-{dead}-{other_host}-0123abcd": True,  # another host's (pid means nothing here)
        f".x.tmp-{dead}-0123abcd": True,  # not our naming
        f"x.tmp-{dead}-{host}-0123abcd": True,  # not hidden: not ours
        f".z.old-{dead}-{host}-0123abcd": True,  # killed mid-swap, z missing: the only copy
        f".x.old-{dead}-{host}-0123abcd": False,  # swap completed (x exists): removed
        "x": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("data")
    files = {  # temporary files of atomic_write (encode's .npy, eval's JSON)
        f".e.npy.tmp-{dead}-{host}-0123abcd": False,
        f".e.npy.tmp-{os.getpid()}-{host}-0123abcd": True,
    }
    for name in files:
        (tmp_path / name).write_text("half")
    outputs.remove_stale_temporaries(tmp_path)
    kept = [n for n, keep in {**names, **files}.items() if keep]
    assert _names(tmp_path) == sorted(kept)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_atomic_write_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("old")
    real = os.replace

    def failing(src, dst, *a, **k):
        if Path(dst) == path:
            raise OSError(code, os.strerror(code), str(src))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OutputError, match=rf"cannot write {path}: {os.strerror(code)}"):
        outputs.atomic_write_text(path, "new")
    assert path.read_text() == "old" and _names(tmp_path) == ["metrics.json"]
    monkeypatch.setattr(os, "replace", real)
    outputs.atomic_write_text(tmp_path / "sub" / "m.json", "new")
    assert (tmp_path / "sub" / "m.json").read_text() == "new"


# ------------------------------------------------------------------ output locks

HOLD = """
import sys, time
from bidirlm.runtime.outputs import OutputLock
lock = OutputLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_is_exclusive_names_the_holder_and_is_taken_over_when_dead(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError) as info:
            OutputLock(folder).acquire()
        message = str(info.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message
        assert str(folder) in message and "\n" not in message
    finally:
        proc.kill()
        proc.wait()
    # kill -9 left the lock file: the dead process's lock is taken over
    assert json.loads((folder / outputs.LOCK_NAME).read_text())["pid"] == proc.pid
    with OutputLock(folder) as lock:
        assert lock.took_over is not None and lock.took_over["pid"] == proc.pid
        held = json.loads((folder / outputs.LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
            OutputLock(folder).acquire()  # a second run in this very process too
    assert not (folder / outputs.LOCK_NAME).exists()


def test_lock_respects_other_hosts_and_cleans_up_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    record = {"pid": _dead_pid(), "host": "another-host.example", "started": "earlier"}
    (folder / outputs.LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(OutputError, match="another-host.example"):
        OutputLock(folder).acquire()
    fresh = tmp_path / "new"
    with OutputLock(fresh):
        assert fresh.is_dir()
    assert not fresh.exists()  # created for the lock only, empty: removed


def test_lock_without_flock_support_uses_the_pid_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)  # some network filesystems
    folder = tmp_path / "run"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": sleeper.pid, "host": socket.gethostname()}
        (folder / outputs.LOCK_NAME).write_text(json.dumps(record))
        with pytest.raises(OutputError, match=f"pid {sleeper.pid}"):
            OutputLock(folder).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputLock(folder) as lock:  # its process is gone now: taken over
        assert lock.took_over is not None and lock.took_over["pid"] == sleeper.pid


def _train_argv(output: Path, *extra: str) -> list[str]:
    small = ["data.tokens_per_batch=256", "data.max_seq_len=64", "train.progress_bar=false"]
    sets = [f"train.output={output}", "train.steps=1", "train.checkpoint_every=0", *small]
    argv = ["train", str(EXAMPLES / "tiny-mntp.toml")]
    for item in [*sets, *extra]:
        argv += ["--set", item]
    return argv


def test_second_train_on_the_same_output_is_refused(tmp_path: Path, capsys) -> None:
    output = tmp_path / "run"
    with OutputLock(output):
        assert main(_train_argv(output)) == 1
        err = _one_line_error(capsys, "train")
        assert f"pid {os.getpid()}" in err and "in use" in err
        assert _names(output) == [outputs.LOCK_NAME]  # the other run's folder is untouched


def test_second_pipeline_on_the_same_output_is_refused(tmp_path: Path, capsys) -> None:
    output = tmp_path / "deep" / "run"
    with OutputLock(output):
        assert main(["pipeline", str(_small_recipe(tmp_path, output))]) == 1
        err = _one_line_error(capsys, "pipeline")
        assert f"pid {os.getpid()}" in err and str(output) in err
        assert _names(output) == [outputs.LOCK_NAME]
    assert not (tmp_path / "deep").exists()  # the lock removes the folders it made, once empty


def test_train_refuses_an_output_whose_final_is_its_model(tmp_path: Path, model, capsys) -> None:
    run = tmp_path / "run"
    final = _copy(model, run / "final")
    assert main(_train_argv(run, f"model={final}")) == 1
    assert "is the input" in _one_line_error(capsys, "train")
    assert load_model(final) is not None  # untouched


# ------------------------------------------------------------------ corrupt safetensors


def _truncated(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:4])


def _offsets_past_end(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _huge_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])


CORRUPTIONS = {
    "truncated": (_truncated, "is truncated (4 bytes)"),
    "offsets": (_offsets_past_end, "is truncated: tensor"),
    "huge-header": (_huge_header, "is truncated or not a safetensors file"),
}


@pytest.fixture(scope="module")
def corrupt(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corrupt")
    out = {}
    for name, (damage, _) in CORRUPTIONS.items():
        out[name] = _copy(model, root / name)
        damage(out[name])
    return out


def _command_argv(command: str, model: Path, tmp_path: Path) -> list[str]:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(CORPUS[:3]) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"query": q, "positive": d}) + "\n" for q, d in zip(CORPUS, CORPUS[1:]))
    )
    return {
        "encode": [
            "encode",
            str(model),
            "--input",
            str(texts),
            "--output",
            str(tmp_path / "e.npy"),
        ],
        "eval": ["eval", str(model), "--task", str(pairs), "--max-length", "16"],
        "export": ["export", str(model), str(tmp_path / "st")],
        "train": _train_argv(tmp_path / "run", f"model={model}"),
    }[command]


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_safetensors_is_a_checkpoint_error_naming_the_file(corrupt, case: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_model(corrupt[case])
    assert str(corrupt[case] / "model.safetensors") in str(info.value)
    assert CORRUPTIONS[case][1] in str(info.value)


@pytest.mark.parametrize("command", ["encode", "eval", "export", "train"])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_safetensors_is_one_line_in_every_command(
    corrupt, tmp_path: Path, capsys, command: str, case: str
) -> None:
    assert main(_command_argv(command, corrupt[case], tmp_path)) == 1
    err = _one_line_error(capsys, command)
    assert str(corrupt[case] / "model.safetensors") in err and CORRUPTIONS[case][1] in err
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / "st").exists()


# ------------------------------------------------------------------ non-finite weights


@pytest.fixture(scope="module")
def nan_model(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = _copy(model, tmp_path_factory.mktemp("nan") / "model")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_load_refuses_non_finite_weights_naming_the_tensor(
    nan_model: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has 1 non"):
        load_model(nan_model)
    loaded = load_model(nan_model, allow_non_finite=True)  # the experts' opt-out
    assert int(torch.isnan(loaded.layers[1].mlp.w_up.weight).sum()) == 1
    monkeypatch.setenv("BIDIRLM_ALLOW_NON_FINITE", "1")  # the same opt-out, from the environment
    load_model(nan_model)
    monkeypatch.delenv("BIDIRLM_ALLOW_NON_FINITE")
    # finite in float32, infinite once cast to float16: named as such
    big = _copy(model, tmp_path / "big")
    tensors = load_file(big / "model.safetensors")
    tensors["model.norm.weight"][0] = 1e6
    save_file(tensors, big / "model.safetensors", metadata={"format": "pt"})
    load_model(big)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight .*after the cast to torch\.f"):
        load_model(big, dtype=torch.float16)


def test_encode_and_eval_never_output_non_finite_results(
    nan_model: Path, tmp_path: Path, capsys
) -> None:
    argv = _command_argv("encode", nan_model, tmp_path)
    assert main(argv) == 1
    assert "up_proj.weight" in _one_line_error(capsys, "encode")
    assert main([*argv, "--allow-non-finite"]) == 1  # loaded on request, NaN embeddings refused
    err = _one_line_error(capsys, "encode")
    assert "not finite" in err and "line(s) [1, 2, 3]" in err
    assert _names(tmp_path) == ["pairs.jsonl", "texts.txt"]  # no .npy, no temporary
    argv = _command_argv("eval", nan_model, tmp_path)
    assert main(argv) == 1
    assert "up_proj.weight" in _one_line_error(capsys, "eval")
    assert main([*argv, "--allow-non-finite", "--output", str(tmp_path / "m.json")]) == 1
    out = capsys.readouterr()
    assert "not finite" in out.err and "ndcg" not in out.out and not (tmp_path / "m.json").exists()
    assert main(["export", str(nan_model), str(tmp_path / "st")]) == 1
    assert "up_proj.weight" in _one_line_error(capsys, "export")


# ------------------------------------------------------------------ read-only / full outputs


def _fail_writes_under(monkeypatch: pytest.MonkeyPatch, root: Path, code: int) -> None:
    """Writes under `root` fail with `code`: EROFS fails every open-for-writing, mkdir, rename
    and replace there (a read-only folder); ENOSPC fails only the file writes (a full disk:
    folders can still be made, so any half-written output would be visible)."""
    import builtins
    import io
    import pathlib

    root = root.resolve()
    read_only = code == errno.EROFS

    def under(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(root)
        except TypeError:
            return False

    def err(path) -> OSError:
        return OSError(code, os.strerror(code), os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, pathlib.Path.mkdir
    real_rename, real_replace = os.rename, os.replace

    def fake_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and under(file):
            raise err(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            raise err(path)
        return real_os_open(path, flags, *a, **k)

    def fake_mkdir(self, *a, **k):
        if under(self):
            raise err(self)
        return real_mkdir(self, *a, **k)

    def fake_rename(src, dst, *a, **k):
        if under(dst):
            raise err(dst)
        return real_rename(src, dst, *a, **k)

    def fake_replace(src, dst, *a, **k):
        if under(dst):
            raise err(dst)
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    if read_only:
        monkeypatch.setattr(pathlib.Path, "mkdir", fake_mkdir)
        monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: fake_mkdir(Path(p)))
        monkeypatch.setattr(os, "rename", fake_rename)
        monkeypatch.setattr(os, "replace", fake_replace)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def _small_recipe(tmp_path: Path, output: Path) -> Path:
    from bidirlm.runtime.training.config import dumps_toml

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    recipe = {
        "recipe": {"name": "t", "base": "embedded:tiny", "output": str(output), "phases": ["m"]},
        "m": {
            "model": "@base",
            "phase": "mntp",
            "train": {"steps": 1, "progress_bar": False},
            "data": {"tokens_per_batch": 128, "max_seq_len": 32, "sources": [{"path": str(docs)}]},
        },
    }
    path = tmp_path / "recipe.toml"
    path.write_text(dumps_toml(recipe))
    return path


UNWRITABLE = [
    (command, code)
    for command in ("encode", "eval", "export", "train", "pipeline", "demo")
    for code in (errno.EROFS, errno.ENOSPC)
    if (command, code) != ("demo", errno.ENOSPC)  # (the demo builds its corpus first: 20 s)
]


@pytest.mark.parametrize("command, code", UNWRITABLE)
def test_unwritable_output_is_one_line_and_leaves_nothing(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, command: str, code: int
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if command == "encode":
        argv = _command_argv("encode", model, tmp_path)
        argv[-1] = str(out_dir / "e.npy")
    elif command == "eval":
        argv = [*_command_argv("eval", model, tmp_path), "--output", str(out_dir / "m.json")]
    elif command == "export":
        argv = ["export", str(model), str(out_dir / "st")]
    elif command == "train":
        argv = _train_argv(out_dir / "run", f"model={model}")
    elif command == "pipeline":
        argv = ["pipeline", str(_small_recipe(tmp_path, out_dir / "run"))]
    else:
        argv = ["demo", "--tiny", "--cpu", "--out", str(out_dir / "demo")]
    _fail_writes_under(monkeypatch, out_dir, code)
    assert main(argv) == 1
    err = _one_line_error(capsys, command)
    assert str(out_dir) in err and os.strerror(code) in err, err
    monkeypatch.undo()
    assert _files(out_dir) == []  # no partial output, no temporary
    if command != "demo":  # (the demo may leave its empty output folder)
        assert _names(out_dir) == []


@pytest.mark.skipif(IS_ROOT, reason="root writes through chmod; the simulated test covers it")
@pytest.mark.parametrize("command", ["encode", "eval", "export"])
def test_chmod_read_only_output_folder(model: Path, tmp_path: Path, capsys, command: str) -> None:
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    argv = {
        "encode": [*_command_argv("encode", model, tmp_path)[:-1], str(out_dir / "e.npy")],
        "eval": [*_command_argv("eval", model, tmp_path), "--output", str(out_dir / "m.json")],
        "export": ["export", str(model), str(out_dir / "st")],
    }[command]
    out_dir.chmod(0o555)
    try:
        assert main(argv) == 1
        assert str(out_dir) in _one_line_error(capsys, command)
        assert _names(out_dir) == []
    finally:
        out_dir.chmod(0o755)


# ------------------------------------------------------------------ encode inputs and devices


def test_encode_input_and_device_errors(model: Path, tmp_path: Path, capsys) -> None:
    argv = _command_argv("encode", model, tmp_path)
    at = argv.index("--input") + 1
    assert main([*argv[:at], str(tmp_path), *argv[at + 1 :]]) == 1
    assert "is a directory" in _one_line_error(capsys, "encode")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first line\nsecond line\ncaf\xe9 au lait\n".encode("latin-1"))
    assert main([*argv[:at], str(bad), *argv[at + 1 :]]) == 1
    assert f"{bad}:3: not UTF-8" in _one_line_error(capsys, "encode")
    assert main([*argv, "--device", "potato"]) == 1
    assert "potato" in _one_line_error(capsys, "encode")
    if not torch.cuda.is_available():
        assert main([*argv, "--device", "cuda"]) == 1
        assert "no CUDA GPU" in _one_line_error(capsys, "encode")
        assert main([*_command_argv("eval", model, tmp_path), "--device", "cuda:0"]) == 1
        assert "no CUDA GPU" in _one_line_error(capsys, "eval")
    assert not (tmp_path / "e.npy").exists()
    assert main(argv) == 0  # and the same command with good inputs works
    assert np.isfinite(np.load(tmp_path / "e.npy")).all()


def test_encode_empty_list_is_empty_float_matrix(model: Path) -> None:
    encoder = load_model(model)
    for empty in ([], ()):
        emb = encoder.encode(empty)
        assert emb.shape == (0, encoder.hidden_size) and emb.dtype == torch.float32
    encoder.tokenizer = None  # nothing to tokenize: no tokenizer needed either
    assert encoder.encode([]).shape == (0, encoder.hidden_size)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        encoder.encode(["text"])


# ------------------------------------------------------------------ other rmtree sites


def test_build_atomic_removes_only_its_own_temporary(tmp_path: Path) -> None:
    from bidirlm.runtime.embedded import _build_atomic

    (tmp_path / "neighbour").mkdir()

    def boom(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        _build_atomic(tmp_path / "cache", boom)
    assert _names(tmp_path) == ["neighbour"]
    assert _build_atomic(tmp_path / "cache", lambda t: (t / "ok").write_text("y")).is_dir()
    assert _names(tmp_path) == ["cache", "neighbour"]


def test_training_checkpoint_rotation_removes_only_its_checkpoints(tmp_path: Path) -> None:
    from bidirlm.runtime.training import checkpoints as cio

    root = cio.checkpoint_dir(tmp_path)
    for step in (1, 2):
        tmp = cio.prepare_temp(tmp_path, step)
        (tmp / cio.STATE_FILE).write_text("{}")
        cio.publish(tmp_path, step, keep=1)
    (root / "notes").mkdir()  # the user's, or not a checkpoint: never removed
    (root / "step-3").mkdir()  # not our naming
    tmp = cio.prepare_temp(tmp_path, 3)
    (tmp / cio.STATE_FILE).write_text("{}")
    cio.publish(tmp_path, 3, keep=1)
    assert _names(root) == ["notes", "step-00000003", "step-3"]


def test_sigterm_during_atomic_folder_removes_the_temporary(tmp_path: Path) -> None:
    script = (
        "import sys, time\nfrom bidirlm.runtime.outputs import AtomicFolder\n"
        "with AtomicFolder(sys.argv[1]) as tmp:\n"
        "    (tmp / 'part').write_text('x')\n    print('ready', flush=True)\n    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    assert len(_names(tmp_path)) == 2  # the temporary and the publish lock
    proc.terminate()
    assert proc.wait(timeout=60) == 143
    assert _names(tmp_path) == []
