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


TOP_LEVEL = ("zo", "estimators", "tasks", "experiments", "tests", "requirements")
PATH = re.compile(rf"(?<![\w./-])(?:{'|'.join(TOP_LEVEL)})/[\w./<>*-]*")
FILE_NAME = re.compile(r"(?<![\w./-])[\w-]+\.(?:md|toml|py)\b")


def test_every_file_the_readme_names_is_in_the_repository():
    """Paths under the repository's folders (``<placeholder>`` matches any name) and bare
    file names (``RESULTS.md``: somewhere in the repository)."""
    missing = []
    for path in sorted(set(PATH.findall(README))):
        pattern = re.sub(r"<[^>]*>", "*", path.rstrip("./"))
        if not list(ROOT.glob(pattern)):
            missing.append(path)
    tracked = {p.name for p in ROOT.rglob("*") if ".venv" not in p.parts}
    missing += sorted(name for name in set(FILE_NAME.findall(README)) if name not in tracked)
    assert not missing, f"README.md names files that are not in the repository: {missing}"


def test_the_file_check_would_see_a_missing_file():
    assert PATH.findall("see `zo/nothing_here.py` and experiments/<f>/x.yaml") == [
        "zo/nothing_here.py",
        "experiments/<f>/x.yaml",
    ]
    assert FILE_NAME.findall("the `DESIGN.md` of the project, not torch.optim") == ["DESIGN.md"]
