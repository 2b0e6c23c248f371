"""The paper plan's grid under the released code's protocol (the authors' repository after its May 2024 refactor, the
one reference-notes and this suite's default follow): the gender test is the gender part of each 5-item .bin in
data/eval, a few hundred images per set, instead of every image of a folder (README "Gender-test protocols").

A different evaluation folder (rec) makes its trainings separate from the paper plan's: rec also feeds validation
during training, which is part of a training's settings.
"""
INCLUDE = "paper"

SET = {"gender_protocol": "bins", "gender_folders": {}, "rec": "data/eval"}
