"""The README's callback example runs as written (on a slice of Fashion-MNIST) and reaches its target."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example() -> str:
    text = README.read_text()
    section = text[text.index("## Use it on your own LightningModule"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_callback_example_runs_and_reaches_the_target(tmp_path, monkeypatch):
    code = example()
    small = "FashionMNISTDataModule(batch_size=128, val_size=256, train_limit=1024, test_limit=512)"
    assert "FashionMNISTDataModule(batch_size=128)" in code
    code = code.replace("FashionMNISTDataModule(batch_size=128)", small)
    code = code.replace("L.Trainer(", "L.Trainer(enable_progress_bar=False, logger=False, enable_checkpointing=False, ")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    summary = namespace["bit_summary"](namespace["module"])
    assert summary.avg_bits <= 0.7
    assert namespace["alq"].network.avg_bits == summary.avg_bits
