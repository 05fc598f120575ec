"""The tree passes ``ruff check`` (the rules are in pyproject.toml, [tool.ruff]): what ``make lint`` runs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, "ruff check found problems (`make lint` shows them; " \
        "`.venv/bin/ruff check --fix .` fixes many):\n" + proc.stdout + proc.stderr
