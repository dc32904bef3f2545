from __future__ import annotations

import json

import pytest

from jaxgpt.core.errors import UserError
from jaxgpt.plot import plot, read_series


def test_curves_from_metrics(tmp_path):
    records = [{"step": s, "loss": 10 - s, "lr": 1e-3 * s, "mfu": None} for s in range(1, 6)]
    records[2]["val_loss"] = 7.5
    records[2]["val_bpb"] = 2.5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    series = read_series(tmp_path)
    assert series["loss"] == ([1, 2, 3, 4, 5], [9, 8, 7, 6, 5])
    assert series["val_loss"] == ([3], [7.5]) and series["val_bpb"] == ([3], [2.5])
    png = plot(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size == (1500, 400)  # three panels of 5 x 4 inches at 100 dpi: loss, lr, bits per byte


def test_missing_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="train first"):
        plot(tmp_path)
