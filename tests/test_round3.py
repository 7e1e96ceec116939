"""Round-three fixes (issue 24): publishing races, media-path strings, shard paths leaving the
model folder, absurd lengths, wrong-typed config fields, the causes named for bad inputs and
`--threads` on every command that computes."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image
from safetensors import safe_open

from bidirlm.cli import build_parser, main
from bidirlm.recipe.demo_report import format_report
from bidirlm.runtime import outputs
from bidirlm.runtime.merging.compose import compose_omni
from bidirlm.runtime.models import CheckpointError, load_model, media
from bidirlm.runtime.outputs import AtomicFolder, OutputError, OutputLock
from bidirlm.runtime.training.config import dumps_toml
from tests.models.test_models import build_checkpoint
from tests.omni.helpers import image, specialists

ROOT = Path(__file__).resolve().parents[1]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------ 1. publish races


def test_target_appearing_mid_run_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "out"
    folder = AtomicFolder(target)
    with pytest.raises(OutputError, match=r"appeared while this run was writing it") as info:
        with folder as tmp:
            (tmp / "ours.txt").write_text("ours")
            target.mkdir()  # the user (or another program) creates the output meanwhile
            (target / "theirs.txt").write_text("theirs")
            folder.commit()
    assert "\n" not in str(info.value) and str(target) in str(info.value)
    assert _names(tmp_path) == ["out"] and _names(target) == ["theirs.txt"]  # theirs kept, no temp


def test_target_appearing_empty_mid_run_is_refused_too(tmp_path: Path) -> None:
    target = tmp_path / "out"
    folder = AtomicFolder(target)
    with pytest.raises(OutputError, match="appeared"):
        with folder:
            target.mkdir()
            folder.commit()
    assert _names(tmp_path) == ["out"]


def test_target_appearing_mid_run_is_replaced_with_force(tmp_path: Path) -> None:
    target = tmp_path / "out"
    folder = AtomicFolder(target, force=True)
    with folder as tmp:
        (tmp / "ours.txt").write_text("ours")
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")
        folder.commit()
    assert _names(tmp_path) == ["out"] and _names(target) == ["ours.txt"]


def test_replace_empty_only_while_the_folder_stays_empty(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    folder = AtomicFolder(target, replace_empty=True)
    with pytest.raises(OutputError, match="appeared"):
        with folder as tmp:
            (tmp / "ours.txt").write_text("ours")
            (target / "theirs.txt").write_text("theirs")  # the user fills it meanwhile
            folder.commit()
    assert _names(target) == ["theirs.txt"]
    (target / "theirs.txt").unlink()
    folder = AtomicFolder(target, replace_empty=True)
    with folder as tmp:
        (tmp / "ours.txt").write_text("ours")
        folder.commit()
    assert _names(tmp_path) == ["out"] and _names(target) == ["ours.txt"]


def test_rename_racing_the_check_is_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target is created in the instant between the re-check and the rename."""
    target = tmp_path / "out"
    folder = AtomicFolder(target)
    real = os.rename

    def late(src, dst, *a, **k):
        if Path(dst) == target and not target.exists():
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", late)
    with pytest.raises(OutputError, match="appeared"):
        with folder as tmp:
            (tmp / "ours.txt").write_text("ours")
            folder.commit()
    assert _names(tmp_path) == ["out"] and _names(target) == ["theirs.txt"]


PUBLISH = """
import sys, time
from pathlib import Path
from bidirlm.runtime.outputs import AtomicFolder
folder = AtomicFolder(sys.argv[1], force=len(sys.argv) > 2)
with folder as tmp:
    (tmp / "first.txt").write_text("first")
    print("writing", flush=True)
    sys.stdin.readline()
    folder.commit()
print("published", flush=True)
"""


def _publisher(target: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISH, str(target), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    return proc


def test_second_run_to_the_same_target_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    target = tmp_path / "out"
    first = _publisher(target)
    try:
        for force in (False, True):  # --force does not let two runs write one output
            with pytest.raises(OutputError, match=rf"pid {first.pid}") as info:
                with AtomicFolder(target, force=force):
                    pass
            assert str(target) in str(info.value) and "in use" in str(info.value)
        assert first.stdin is not None
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.stdout is not None and first.stdout.readline().strip() == "published"
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()
        first.wait()
    assert _names(tmp_path) == ["out"] and _names(target) == ["first.txt"]  # lock file removed
    with pytest.raises(OutputError, match="already exists"):  # and now it exists: as before
        with AtomicFolder(target):
            pass


def test_killed_publisher_lock_is_taken_over_and_cleaned(tmp_path: Path) -> None:
    target = tmp_path / "out"
    first = _publisher(target)
    first.kill()
    first.wait()
    left = _names(tmp_path)
    assert f".out{outputs.PUBLISH_LOCK_SUFFIX}" in left and len(left) == 2  # lock + temporary
    folder = AtomicFolder(target)
    with folder as tmp:
        (tmp / "second.txt").write_text("second")
        folder.commit()
    assert _names(tmp_path) == ["out"] and _names(target) == ["second.txt"]
    # a leftover lock of a dead run beside another output is removed too; a live one is not
    other = tmp_path / f".other{outputs.PUBLISH_LOCK_SUFFIX}"
    other.write_text(json.dumps({"pid": first.pid, "host": socket.gethostname()}))
    with OutputLock(tmp_path, name=f".held{outputs.PUBLISH_LOCK_SUFFIX}"):
        outputs.remove_stale_temporaries(tmp_path)
        assert _names(tmp_path) == [f".held{outputs.PUBLISH_LOCK_SUFFIX}", "out"]


def test_force_never_replaces_a_folder_a_live_run_holds(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with OutputLock(target):  # a training run writing into it
        with pytest.raises(
            OutputError, match=rf"in use by a running bidirlm process \(pid {os.getpid()}"
        ):
            with AtomicFolder(target, force=True):
                pass
        assert _names(target) == [outputs.LOCK_NAME]
    folder = AtomicFolder(target, force=True)  # not in use when this run starts ...
    with pytest.raises(OutputError, match="in use by a running bidirlm process"):
        with folder as tmp:
            (tmp / "ours.txt").write_text("ours")
            with OutputLock(target):  # ... but a run takes it before the commit
                (target / "theirs.txt").write_text("theirs")
                folder.commit()
    assert _names(tmp_path) == ["run"] and _names(target) == ["theirs.txt"]


# ------------------------------------------------------------------ 17. --threads everywhere

THREADED = {  # command -> (argv after the command, the function it computes with)
    "predict": (["m", "--input", "{input}", "--output", "{tmp}/p.jsonl"],
                "bidirlm.runtime.evaluation.classify.predict_records"),
    "finetune-sweep": (["{examples}/tiny-seqcls.toml", "--lrs", "1e-4"],
                       "bidirlm.recipe.finetune.finetune_sweep"),
    "domain-transfer": (["{examples}/tiny-seqcls.toml", "--encoder", "e", "--specialist", "s"],
                        "bidirlm.recipe.finetune.domain_transfer"),
    "export": (["{tmp}/model", "{tmp}/st"],
               "bidirlm.integrations.sentence_transformers.export_sentence_transformers"),
    "compose": (["--text", "{tmp}/model", "{tmp}/omni"],
                "bidirlm.runtime.merging.compose.compose_omni"),
    "demo": (["--tiny", "--cpu", "--out", "{tmp}/demo"], "bidirlm.recipe.demo.run_demo"),
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(THREADED))
def test_every_computing_command_takes_threads(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    template, target = THREADED[command]
    argv = [
        a.format(tmp=tmp_path, input=tmp_path / "in.jsonl", examples=ROOT / "examples")
        for a in template
    ]
    # the same option and default as train/encode/eval
    reference = build_parser(["encode"])._subparsers._group_actions[0].choices["encode"]
    ours = build_parser([command])._subparsers._group_actions[0].choices[command]
    ref = next(a for a in reference._actions if a.dest == "threads")
    act = next(a for a in ours._actions if a.dest == "threads")
    assert (act.option_strings, act.default, act.type, act.help) == (
        ref.option_strings, ref.default, ref.type, ref.help,
    )  # fmt: skip
    seen: list[int] = []

    def fake(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise FileNotFoundError("stopped by the test")

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, fake)
    before = torch.get_num_threads()
    assert main([command, *argv, "--threads", "3"]) == 1
    assert seen == [3] and torch.get_num_threads() == before  # set for the run, then restored
    assert "stopped by the test" in capsys.readouterr().err
    assert main([command, *argv, "--threads", "0"]) == 1
    assert "--threads must be an integer >= 1" in capsys.readouterr().err and seen == [3]


# ------------------------------------------------------------------ 3, 14. omni items


@pytest.fixture(scope="module")
def omni(tmp_path_factory: pytest.TempPathFactory):

    root = tmp_path_factory.mktemp("omni")
    parts = specialists(root)
    out = compose_omni(parts["text"], parts["vision"], parts["audio"], root / "omni").output
    return load_model(out)


@pytest.fixture()
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


@pytest.mark.usefixtures("_torch_kernels")
def test_missing_media_path_is_an_error_and_text_stays_text(omni, tmp_path: Path) -> None:

    for missing in ("/x/nope.png", "nope.wav", "./a b.jpg", "~/gone.flac"):
        with pytest.raises(ValueError, match=r"items\[1\]: no such file") as info:
            omni.encode(["text first", missing])
        assert "\n" not in str(info.value) and "{'text': ...}" in str(info.value)
    with pytest.raises(ValueError, match=r"items\[0\]: no such file"):
        omni.encode([{"image": "/x/nope.png"}])
    with pytest.raises(ValueError, match=r"items\[0\]: no such file"):
        omni.encode([{"audio": "/x/nope.wav"}])
    with pytest.raises(ValueError, match=r"items\[0\]: a folder"):
        (tmp_path / "dir.png").mkdir()
        omni.encode([str(tmp_path / "dir.png")])
    # text that mentions a file among other words is text; {"text": ...} is text outright
    sentence = "the chart in fig.png shows it"
    text_only = omni.text_encoder().encode([sentence, "/x/nope.png"])
    got = omni.encode([sentence, {"text": "/x/nope.png"}])
    torch.testing.assert_close(got, text_only, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"items\[0\]: 'text' must be a string"):
        omni.encode([{"text": 3}])
    image(1).save(tmp_path / "real.png")  # an existing path is still an image
    by_path = omni.encode([str(tmp_path / "real.png")])
    torch.testing.assert_close(by_path, omni.encode([{"image": tmp_path / "real.png"}]))


@pytest.mark.usefixtures("_torch_kernels")
def test_absurd_media_names_the_item(omni, tmp_path: Path) -> None:

    loud = {"array": np.full(1600, 1e30, np.float32), "sampling_rate": 16000}
    with pytest.raises(ValueError, match=r"items\[1\]: audio peaks at amplitude 1e\+30"):
        omni.encode(["a", loud])
    int16_scale = {"array": np.full(1600, 20000.0, np.float32), "sampling_rate": 16000}
    assert omni.encode([int16_scale]).isfinite().all()  # unscaled PCM is still accepted
    long = Image.new("RGB", (32 * 2500, 32))
    with pytest.raises(
        ValueError, match=r"items\[2\]: image of 80000x32 pixels has aspect ratio 2500"
    ):
        omni.encode(["a", "b", long])
    for side in (12000, 15000):  # 144 MP (PIL warns), 225 MP (PIL's DecompressionBombError)
        big = tmp_path / f"big{side}.png"
        Image.new("1", (side, side)).save(big)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ValueError, match=rf"items\[0\]: image '{big}'"):
                omni.encode([str(big)])
        assert not [w for w in caught if "DecompressionBomb" in type(w.message).__name__]
    assert media.MAX_IMAGE_PIXELS == 100_000_000
    with pytest.raises(ValueError, match=r"items\[0\]: 12000x12000 = 144.0 megapixels"):
        omni.encode([Image.new("1", (12000, 12000))])


# ------------------------------------------------------------------ 8, 13, 14. checkpoint files


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:

    return build_checkpoint("qwen3-gqa", tmp_path_factory.mktemp("r3") / "model")


def _variant(model: Path, dst: Path, edit) -> Path:

    shutil.copytree(model, dst)
    edit(dst)
    return dst


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1] if err else ""
    assert last.startswith(f"bidirlm {command}: error:") and err.count("error:") == 1, err
    return last


def _sharded_outside(shard: str):
    def edit(folder: Path) -> None:

        single = folder / "model.safetensors"
        with safe_open(str(single), "pt") as fh:
            names = list(fh.keys())
        outside = folder.parent / "elsewhere.safetensors"
        single.rename(outside)  # the weights live outside the model folder
        target = str(outside) if shard == "absolute" else "../elsewhere.safetensors"
        index = {"metadata": {}, "weight_map": {n: target for n in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    return edit


@pytest.mark.usefixtures("_torch_kernels")
@pytest.mark.parametrize("shard", ["relative", "absolute"])
def test_index_shard_paths_outside_the_folder_are_refused(
    model: Path, tmp_path: Path, capsys, shard: str
) -> None:

    bad = _variant(model, tmp_path / "m" / "bad", _sharded_outside(shard))
    with pytest.raises(CheckpointError, match="leaves the model folder") as info:
        load_model(bad)
    assert "\n" not in str(info.value) and "model.safetensors.index.json" in str(info.value)
    (tmp_path / "in.txt").write_text("hello\nworld\n")
    argv = [
        "encode",
        str(bad),
        "--input",
        str(tmp_path / "in.txt"),
        "--output",
        str(tmp_path / "x.npy"),
    ]
    assert main(argv) == 1
    assert "leaves the model folder" in _one_line_error(capsys, "encode")
    assert main(["export", str(bad), str(tmp_path / "st")]) == 1
    assert "leaves the model folder" in _one_line_error(capsys, "export")
    assert not (tmp_path / "st").exists() and not (tmp_path / "x.npy").exists()


CONFIG_FAULTS = [
    ("vocab_size", "1024", r"vocab_size must be an integer, got '1024' \(a str\)"),
    ("hidden_size", 64.5, r"hidden_size must be an integer, got 64.5"),
    ("num_hidden_layers", True, r"num_hidden_layers must be an integer, got True \(a boolean\)"),
    ("rms_norm_eps", "1e-6", r"rms_norm_eps must be a number, got '1e-6'"),
    ("tie_word_embeddings", "false", r"tie_word_embeddings must be true or false"),
    ("eos_token_id", "</s>", r"eos_token_id must be a token id"),
    ("rope_parameters", {"rope_theta": float("nan")}, r"rope_parameters.rope_theta is nan"),
    ("rope_theta", float("inf"), r"rope_theta is inf"),
    ("max_position_embeddings", 0, r"max_position_embeddings must be >= 1"),
]


@pytest.mark.usefixtures("_torch_kernels")
@pytest.mark.parametrize("field, value, message", CONFIG_FAULTS, ids=[c[0] for c in CONFIG_FAULTS])
def test_wrong_config_field_is_one_line_naming_field_and_file(
    model: Path, tmp_path: Path, capsys, field: str, value, message: str
) -> None:

    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config[field] = value
        (folder / "config.json").write_text(json.dumps(config))  # (NaN/Infinity as Python writes)

    bad = _variant(model, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(bad)
    assert str(bad / "config.json") in str(info.value)
    (tmp_path / "in.txt").write_text("hello\n")
    argv = [
        "encode",
        str(bad),
        "--input",
        str(tmp_path / "in.txt"),
        "--output",
        str(tmp_path / "x.npy"),
    ]
    assert main(argv) == 1
    assert str(bad / "config.json") in _one_line_error(capsys, "encode")


# ------------------------------------------------------------------ 12. lengths, 14. devices


@pytest.mark.usefixtures("_torch_kernels")
def test_huge_max_length_is_clamped_with_a_notice(model: Path, tmp_path: Path, capsys) -> None:

    (tmp_path / "in.txt").write_text("hello\nworld\n")
    base = ["encode", str(model), "--input", str(tmp_path / "in.txt")]
    limit = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    assert main([*base, "--output", str(tmp_path / "a.npy"), "--max-length", "1000000000"]) == 0
    err = capsys.readouterr().err
    notice = f"--max-length 1000000000 is above the model's max_position_embeddings ({limit})"
    assert notice in err and f"using {limit}" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--output", str(tmp_path / "b.npy"), "--max-length", str(limit)]) == 0
    assert "above" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


@pytest.mark.usefixtures("_torch_kernels")
def test_training_max_seq_len_above_the_model_is_refused(
    model: Path, tmp_path: Path, capsys
) -> None:

    limit = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    sets = [f"model={model}", f"train.output={tmp_path / 'run'}", "data.max_seq_len=1000000000"]
    argv = ["train", str(ROOT / "examples" / "tiny-mntp.toml")]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 1
    err = _one_line_error(capsys, "train")
    assert (
        f"data.max_seq_len = 1000000000 is above the model's max_position_embeddings ({limit}"
        in err
    )
    assert not (tmp_path / "run").exists()
    sweep = ["finetune-sweep", str(ROOT / "examples" / "tiny-seqcls.toml"), "--lrs", "1e-4"]
    sweep += ["--models", f"m={model}", "--set", "data.max_seq_len=1000000000"]
    sweep += ["--output", str(tmp_path / "sweep")]
    assert main(sweep) == 1
    assert "data.max_seq_len = 1000000000" in _one_line_error(capsys, "finetune-sweep")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_named_as_such(model: Path, tmp_path: Path, capsys) -> None:

    with pytest.raises(ValueError, match="device cuda: no CUDA device is available here"):
        load_model(model, device="cuda")
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    argv = ["predict", str(model), "--input", str(tmp_path / "in.jsonl"), "--device", "cuda"]
    assert main([*argv, "--output", str(tmp_path / "p.jsonl")]) == 1
    err = _one_line_error(capsys, "predict")
    assert "no CUDA GPU is available" in err and "safetensors" not in err


# ------------------------------------------------------------------ 19. docs match the code


def test_readme_recipe_table_matches_the_recipe_files() -> None:

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| `([\w.-]+\.toml)` \| ([\d.]+) \| ([\d.e-]+) \| ([\d.e-]+) \| (\d+) \|$", readme, re.M
    )
    recipes = sorted((ROOT / "bidirlm" / "recipe").glob("*.toml"))
    assert sorted(r[0] for r in rows) == sorted(p.name for p in recipes)
    for name, mask, mntp_lr, con_lr, mini in rows:
        recipe = tomllib.loads((ROOT / "bidirlm" / "recipe" / name).read_text())
        assert float(mask) == recipe["mntp"]["mntp"]["mask_ratio"], name
        assert float(mntp_lr) == recipe["mntp"]["optim"]["lr"], name
        assert float(con_lr) == recipe["contrastive"]["optim"]["lr"], name
        assert int(mini) == recipe["contrastive"]["contrastive"]["mini_batch_size"], name
        assert recipe["contrastive"]["contrastive"]["temperature"] == 0.05
        assert recipe["contrastive"]["data"]["batch_size"] == 512
    assert "lr 5e-5,\nwarmup" not in readme and "mini-batch 16, max length 512" not in readme


CLUTTER = ("Loading weights", "Writing model shards", "\x1b[", "it/s]")


@pytest.mark.usefixtures("_torch_kernels")
def test_commands_print_no_library_progress_bars_or_load_reports(
    model: Path, tmp_path: Path, capsys
) -> None:
    from transformers.utils import logging as hf_logging

    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY",)}
    env.update(BIDIRLM_KERNELS="torch", OMP_NUM_THREADS="1")
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    argv = [sys.executable, "-m", "bidirlm.cli", "export", str(model), str(tmp_path / "a")]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not [c for c in CLUTTER if c in done.stderr + done.stdout], done.stderr
    # in-process (transformers already imported, bars on): quiet during, restored after
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    assert main(["export", str(model), str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert not [c for c in CLUTTER if c in captured.err + captured.out], captured.err
    assert hf_logging.is_progress_bar_enabled()
    assert hf_logging.get_verbosity() == hf_logging.WARNING
    hf_logging.set_verbosity_error()


def test_readme_omni_demo_table_is_the_committed_run() -> None:
    """The README's omni demo numbers are those of docs/omni-demo/results.json (regenerated by
    `bidirlm demo --omni --quick` with the current code)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = json.loads((ROOT / "docs" / "omni-demo" / "results.json").read_text())
    assert results["size"] == "quick"
    for direction in results["aligned"]:
        u, a = results["unaligned"][direction], results["aligned"][direction]
        row = (
            f"| {direction} | {u['recall@1']:.3f} | {a['recall@1']:.3f} | {u['ndcg@10']:.3f} | "
            f"{a['ndcg@10']:.3f} |"
        )
        assert row in readme, row
    assert f"{results['seconds']:.0f} s" in readme


def _table_widths(markdown: str) -> list[tuple[int, int, str]]:
    """(header cells, row cells, row) of every table row that differs from its header."""
    bad, header = [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = line.strip().replace("\\|", "").strip("|").count("|") + 1  # (\| is text)
        if header is None:
            header = cells
        elif cells != header:
            bad.append((header, cells, line))
    return bad


def test_demo_report_rows_have_as_many_cells_as_their_header() -> None:
    for folder in (ROOT / "docs" / "demo", ROOT / "docs" / "demo" / "seed-1"):
        results = json.loads((folder / "results.json").read_text())
        assert _table_widths(format_report(results)) == []
        assert (folder / "report.md").read_text() == format_report(results)  # docs regenerated
    assert _table_widths((ROOT / "README.md").read_text()) == []


@pytest.mark.usefixtures("_torch_kernels")
def test_pipeline_max_seq_len_above_the_base_is_refused(
    model: Path, tmp_path: Path, capsys
) -> None:
    limit = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "def f(): return 1"}\n')
    recipe = {
        "recipe": {
            "name": "t",
            "base": str(model),
            "output": str(tmp_path / "run"),
            "phases": ["m"],
        },
        "m": {
            "model": "@base",
            "phase": "mntp",
            "train": {"steps": 1, "progress_bar": False},
            "data": {"max_seq_len": limit * 4, "sources": [{"path": str(docs)}]},
        },
    }
    path = tmp_path / "recipe.toml"
    path.write_text(dumps_toml(recipe))
    for extra in ([], ["--check"]):
        assert main(["pipeline", str(path), *extra]) == 1
        err = _one_line_error(capsys, "pipeline")
        assert f"[m] data.max_seq_len = {limit * 4} is above the model's" in err
    assert not (tmp_path / "run").exists()
