import csv
import subprocess
import sys
from pathlib import Path

import pytest

import demo

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "demo_quick"
pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python demo.py --quick --out OUT` run once, as a user runs it (its folder and the finished process)."""
    out = tmp_path_factory.mktemp("quick") / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "demo.py"), "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_demo_shows_the_effect_and_never_wipes(quick_demo):
    out, proc = quick_demo
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
    assert demo.free_folder(out) == out.parent / "demo_2"


def test_bins_protocol_numbers_are_unchanged_byte_for_byte(quick_demo):
    """The quick demo under the default (bins) protocol writes exactly the metrics, diagnostics and reference CSVs
    of a run of the code before the protocol option existed (tests/data/demo_quick: `python demo.py --quick` at
    commit 42d73a5, on this project's CPU machine)."""
    results = quick_demo[0] / "results"
    assert (results / "reference_Demo.csv").read_bytes() == (DATA / "reference_Demo.csv").read_bytes()
    for name in ("20L1_1L2_metrics.csv", "20L1_1L2_diagnostics.csv", "bare_backbone_diagnostics.csv"):
        assert (results / "Synthetic" / "SynthFaces" / name).read_bytes() == (DATA / name).read_bytes(), name
    assert "synth_a,bins," in (results / "Synthetic" / "SynthFaces" / "protocol.csv").read_text()
