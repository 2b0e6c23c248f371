"""The authors' released privacy layers, evaluated as downloaded under this suite's protocol:

    python reproduce.py released --released DIR [--mapping CSV]

DIR is their download as unpacked (surfdrive link in the README). Every privacy layer in it ({step}ftn_layers.pth,
or any .pth holding a privacy layer's weights) is placed by its folder names (a backbone family and a dataset name,
'cross' for the cross-dataset setting); a layer that cannot be placed is listed in a mapping file the command writes
for you to fill in. The layers are linked (never copied or changed) into
checkpoint_root/<family>/Released/<setting>-<dataset>/ and swept like our runs. `python reproduce.py paper
--released DIR` puts their rows beside ours in the paper plan's tables. The code is pipeline/released.py.
"""
from pipeline.released import released_experiments as experiments  # noqa: F401 (the plan's experiments)

INCLUDE = "paper"
