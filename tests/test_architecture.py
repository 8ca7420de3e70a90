"""The architecture's one-way rules (docs/design.md section 2) and the code's lint, enforced.

The rules are import-linter contracts in `.importlinter`; a broken one fails this test and CI. The
second test breaks a rule on purpose in a copy of the package, to show the check would see it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _lint_imports(cwd: Path, package_root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(package_root))
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_hold():
    result = _lint_imports(REPO, REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "Contracts: " in result.stdout


def test_a_broken_contract_fails_the_check(tmp_path):
    """models/ importing the parallel layer (parallelism must be applied from outside) is caught."""
    shutil.copytree(REPO / "flip_scale", tmp_path / "flip_scale", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    flip = tmp_path / "flip_scale" / "models" / "flip.py"
    flip.write_text(flip.read_text() + "\n\ndef _layout():\n    from ..parallel import dims\n\n    return dims\n")
    result = _lint_imports(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "models/ knows nothing of how it is distributed" in result.stdout
    assert "BROKEN" in result.stdout and "flip_scale.models.flip -> flip_scale.parallel" in result.stdout


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "flip_scale", "tools", "tests"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ruff_reads_every_package_file():
    """The excludes (runs/, the synthetic data/) must not drop a package folder of the same name."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--show-files", "flip_scale", "tools", "tests"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    shown = {Path(line).resolve() for line in result.stdout.splitlines() if line.endswith(".py")}
    missing = [str(path.relative_to(REPO)) for path in sorted(Path(REPO, "flip_scale").rglob("*.py"))
               if path.resolve() not in shown]
    assert not missing, f"ruff skips {missing}"
