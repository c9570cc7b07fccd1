"""Every example of docs/integrations.md runs, in order, in one namespace (the page's set-up block
first), with wandb offline and no network; then a few checks of what the examples produced."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"

for package in ("tensorboard", "wandb", "pytorch_lightning", "transformers", "polars", "pyarrow", "matplotlib"):
    pytest.importorskip(package)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_example_of_the_integrations_page_runs(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    torch.manual_seed(0)
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 7  # set-up, TensorBoard, wandb, Lightning, Hugging Face, live, dataframes
    namespace: dict = {"__name__": "docs_integrations"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i}", "exec"), namespace)
    assert list((tmp_path / "runs" / "digits").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (tmp_path / "hf-out" / "neural_mechanics.nmrun").is_file()
    assert list((tmp_path / "hf-out" / "runs" / "neural_mechanics").glob("events.out.tfevents.*"))
    assert (tmp_path / "run.parquet").is_file()
    assert not namespace["view"].active  # pytest is not a Jupyter kernel
