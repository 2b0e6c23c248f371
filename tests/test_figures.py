"""utils/figures.py and the sweep's figures drawn with fixed margins: panels where the margins put them, nothing
cropped, and everything drawn inside the canvas (what bbox_inches="tight" guaranteed before)."""
from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from eval.biometrics import plot_det
from pipeline import report
from utils.figures import save_figure, set_margins


def test_panels_sit_at_the_margins_given_in_inches():
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    set_margins(fig, left=0.5, right=0.1, bottom=0.5, top=0.75, wspace=0.45, hspace=0.85)
    width, height = (10 - 0.5 - 0.1 - 0.45) / 2, (6.5 - 0.5 - 0.75 - 0.85) / 2   # worked by hand
    for (r, c), ax in np.ndenumerate(axes):
        box = ax.get_position()
        x0, y0 = 0.5 + c * (width + 0.45), 0.5 + (1 - r) * (height + 0.85)
        assert (box.x0 * 10, box.y0 * 6.5, box.width * 10, box.height * 6.5) == pytest.approx((x0, y0, width, height))
    plt.close(fig)


def test_a_saved_figure_has_the_canvas_size_and_leaves_no_other_file(tmp_path):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    path = save_figure(fig, tmp_path / "a.png", "a folder", dpi=50)
    assert cv2.imread(str(path)).shape[:2] == (150, 200) and [p.name for p in tmp_path.iterdir()] == ["a.png"]
    assert not plt.get_fignums()   # closed


def _extents(monkeypatch) -> list[tuple[str, tuple[float, float, float, float], tuple[float, float]]]:
    """Replace save_figure's writing: record each figure's drawn extent (the box bbox_inches="tight" crops to, in
    inches) beside its canvas size."""
    found = []

    def check(fig, path, what, dpi=110, tight=False, metadata=None):
        box = fig.get_tightbbox(fig.canvas.get_renderer())
        found.append((Path(path).name, (box.x0, box.y0, box.x1, box.y1), tuple(fig.get_size_inches())))
        plt.close(fig)
        return path
    monkeypatch.setattr(report, "save_figure", check)
    monkeypatch.setattr("eval.biometrics.save_figure", check)
    return found


def test_the_sweeps_figures_keep_every_text_inside_the_canvas(monkeypatch, tmp_path):
    found = _extents(monkeypatch)
    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{"Dataset": ds, "Step": s, "EER": rng.random(), "TAR@FAR=0.1%": rng.random(),
                          "BACC-Gender-AVG": rng.random(), "PIC": -100 * rng.random(), "Run": "20L1_1L2"}
                         for ds in ("lfw", "agedb_30", "vggface2_sample") for s in (1000, 20000, 140000)])
    ref = {ds: {"EER": 0.01, "TAR@FAR=0.1%": 0.9, "BACC-Gender-AVG": 0.95, "PIC": 0.0} for ds in rows["Dataset"]}
    report.plot_curves("20L1_1L2", rows, ref, tmp_path / "c.png")
    plot_det([(f"20L1_1L2 (step {s})", rng.random(400), rng.random(400) > 0.5) for s in (20000, 140000)],
             "DET on vggface2_sample", tmp_path / "d.png")

    class Ev:   # what plot_angles reads of an evaluation set
        num_pair_images = 0
        gender_labels = np.repeat([0, 1], 60)

        class templates:
            @staticmethod
            def normalized(rows, flip):
                return torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(120, 512))), dim=1)
    report.plot_angles(Ev(), torch.nn.Identity(), "20L1_1L2, step 140000, vggface2_sample: angles to the gender "
                       "centroids", tmp_path / "a.png")
    assert [name for name, *_ in found] == ["c.png", "d.png", "a.png"]
    for name, (x0, y0, x1, y1), (width, height) in found:   # nothing drawn beyond the canvas (1/100 inch slack)
        assert x0 >= -0.01 and y0 >= -0.01 and x1 <= width + 0.01 and y1 <= height + 0.01, (name, x0, y0, x1, y1)
