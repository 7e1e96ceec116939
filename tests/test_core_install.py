"""The ops stand alone: `bidirlm.kernels` loads and runs without any extra's package, and CLI
commands that need an extra say which one, in one line.

Each case runs in a subprocess in which importing transformers, datasets, sentence_transformers,
scipy or PIL raises ModuleNotFoundError (a meta-path blocker installed first), the way a core-only
install (`pip install bidirlm`, no extras) behaves. CI also runs `.ci/core_check.py --core` in a
real core-only venv.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_CHECK = ROOT / ".ci" / "core_check.py"
BLOCKED = ("transformers", "datasets", "sentence_transformers", "scipy", "PIL")

BLOCKER = f"""
import importlib.abc, sys
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Blocker())
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_blocker_blocks() -> None:
    """The harness itself: with the blocker, importing transformers fails."""
    proc = _run("import transformers")
    assert proc.returncode != 0
    assert "No module named 'transformers'" in proc.stderr


def test_kernels_run_without_extras() -> None:
    """`import bidirlm.kernels` and a forward and backward of each op (checked against plain
    PyTorch) load none of the extras' packages (.ci/core_check.py asserts that too)."""
    run = f"runpy.run_path({str(CORE_CHECK)!r}, run_name='__main__')"
    proc = _run(f"import runpy; sys.argv = ['core_check']; {run}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "core check: bidirlm.kernels ran 4 ops" in proc.stdout


def test_core_check_script_in_this_env() -> None:
    """The CI script as CI runs it, unblocked: it also asserts nothing forbidden got imported."""
    proc = subprocess.run(
        [sys.executable, str(CORE_CHECK)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = subprocess.run(
        [sys.executable, str(CORE_CHECK), "--core"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0  # this venv has transformers: --core must say it is not core-only
    assert "not a core-only install" in bad.stderr + bad.stdout


def test_cli_names_the_extra_to_install() -> None:
    code = "from bidirlm.cli import main; sys.exit(main(sys.argv[1:]))"
    for argv, extra in (
        (["export", "model", "out"], "st"),
        (["train", "config.toml"], "train"),
        (["compose", "--help"], None),
        (["demo", "--quick"], "all"),
    ):
        proc = _run(code, *argv)
        if extra is None:  # help needs no optional package
            assert proc.returncode == 0, proc.stderr
            continue
        assert proc.returncode == 1, (argv, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (argv, proc.stderr)
        assert lines[0].startswith(f"bidirlm {argv[0]}: error: needs the optional package")
        assert f"pip install 'bidirlm[{extra}]'" in lines[0], lines[0]


def test_core_commands_run_without_extras() -> None:
    """`bidirlm env` and `bidirlm merge --help` work in a core install."""
    code = "from bidirlm.cli import main; sys.exit(main(sys.argv[1:]))"
    env = _run(code, "env")
    assert env.returncode == 0, env.stderr
    assert "kernels" in env.stdout and "torch" in env.stdout
    merge = _run(code, "merge", "--help")
    assert merge.returncode == 0, merge.stderr


def test_kernels_import_only_torch_triton_numpy() -> None:
    """Every import statement of bidirlm/kernels/ (in functions too) names the stdlib, torch,
    triton, numpy or bidirlm.kernels itself: the ops package needs no other install."""
    allowed = {"torch", "triton", "numpy", "__future__"} | set(sys.stdlib_module_names)
    bad = []
    for path in sorted((ROOT / "bidirlm" / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue  # relative: bidirlm.kernels itself
            for name in names:
                top = name.split(".")[0]
                if top not in allowed and not name.startswith("bidirlm.kernels"):
                    bad.append(f"{path.name}:{node.lineno} imports {name}")
    assert bad == [], bad
