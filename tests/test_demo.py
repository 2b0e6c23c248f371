import csv
import subprocess
import sys
from pathlib import Path

import pytest

import demo

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def test_quick_demo_shows_the_effect_and_never_wipes(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "demo.py"), "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SYNTHETIC DATA" in proc.stdout and "report.md" in proc.stdout
    results = out / "results" / "Synthetic" / "SynthFaces"
    with open(out / "results" / "reference_Demo.csv", newline="") as fh:
        ref = {r["Dataset"]: r for r in csv.DictReader(fh)}
    with open(results / "20L1_1L2_metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    last = max(int(r["Step"]) for r in rows)
    final = {r["Dataset"]: r for r in rows if int(r["Step"]) == last}
    assert set(final) == {"synth_a", "synth_b"}
    for ds, row in final.items():
        assert float(ref[ds]["BACC-Gender-AVG"]) >= 0.85, ds
        assert float(row["BACC-Gender-AVG"]) <= 0.65, ds
        assert float(row["EER"]) - float(ref[ds]["EER"]) <= 0.05, ds
    for png in ("tradeoff.png", "20L1_1L2_curves.png", "20L1_1L2_angles.png"):
        assert (results / png).stat().st_size > 10_000
    # a second demo never writes into the first one's folder
    assert demo.free_folder(out) == tmp_path / "demo_2"
