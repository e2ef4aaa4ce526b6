"""The README's offline Python snippets run as written, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_IDS = re.compile(r"\"[\w.-]+/[\w.-]+\"")  # "org/name": needs a model hub


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_quickstart_of_exactly_two_commands():
    text = README.read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quickstart.splitlines() if line.strip()]
    assert commands == ["./run.sh demo", "./run.sh test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "./run.sh test" in ci


def test_offline_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    offline = [b for b in _blocks() if not HUB_IDS.search(b)]
    assert len(offline) >= 3
    namespace: dict = {}
    for block in offline:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["logps"].shape == (3,)
    assert namespace["batch"]["input_ids"].shape[0] == 1
