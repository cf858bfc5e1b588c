"""The README's promises: its first two commands, CI calling the test one, its example."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_demo_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(example)
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path, timeout=600)


@pytest.mark.slow
def test_demo_beats_zero_shot(tmp_path):
    from zo.cli import main

    out = tmp_path / "demo"
    config = ROOT / "experiments" / "smollm2" / "sentiment_zo_sgd.yaml"
    assert main(["train", "--config", str(config), f"train.out={out}", "train.progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] > summary["zero_shot_accuracy"]
