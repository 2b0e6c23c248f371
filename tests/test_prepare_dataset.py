"""tools/prepare_dataset.py (facedata/prepare.py) and facedata/recordio.py on miniatures of each dataset as downloaded
(nothing downloaded)."""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from facedata.prepare import LOG_NAME, REPORT_NAME, main, prepare
from facedata.binfile import load_bin
from facedata.dataset import scan_dataset
from utils.errors import UserError
from facedata.recordio import MAGIC, RecordFile, RecordWriter, write_identity_records


def jpeg(seed: int) -> bytes:
    """A small random 112x112 face stand-in, JPEG-encoded."""
    img = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        img = np.random.default_rng(seed * 1000 + i).integers(0, 256, (112, 112, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / name), img)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): kind, mtime and content or link target."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            content = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
            state[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, content)
    state["."] = (root.stat().st_mtime_ns,)
    return state


def report_rows(out: Path) -> dict[str, tuple[str, str]]:
    rows = [line.split("\t") for line in (out / REPORT_NAME).read_text().splitlines() if not line.startswith("#")]
    return {name: (reason, details) for reason, name, _, details in rows}


def check_links(out: Path, expected: dict[str, list[Path]]) -> None:
    """``out`` holds exactly the folders of ``expected``, each of symlinks to exactly those source images."""
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(expected)
    for folder, sources in expected.items():
        links = sorted((out / folder).iterdir())
        assert all(p.is_symlink() for p in links)
        assert sorted(os.readlink(p) for p in links) == sorted(str(s.resolve()) for s in sources)


# ------------------------------------------------------------------------------------------------ LFW

@pytest.fixture
def lfw(tmp_path: Path) -> dict:
    root = tmp_path / "lfw"
    people = {"Alice_Smith": 2, "Bob_Jones": 3, "Carol_White": 1, "Dan_Brown": 2, "Eve_Unlisted": 2,
              "Frank_Both": 2}
    for seed, (name, n) in enumerate(people.items()):
        write_images(root / name, [f"{name}_{i:04d}.jpg" for i in range(1, n + 1)], seed)
    female = tmp_path / "female_names.txt"
    male = tmp_path / "male_names.txt"
    # Windows line endings and blank lines in one list, as the file may come
    female.write_bytes(b"Alice_Smith_0001.jpg\r\nAlice_Smith_0002.jpg\r\n\r\nCarol_White_0001.jpg\r\n"
                       b"Frank_Both_0001.jpg\r\nGhost_Person_0001.jpg\r\n")
    male.write_text("Bob_Jones_0001.jpg\nBob_Jones_0003.jpg\nDan_Brown_0002.jpg\nFrank_Both_0002.jpg\n\n")
    return {"root": root, "labels": [female, male], "tmp": tmp_path}


def test_lfw_prepared_links_report_bin_and_idempotence(lfw):
    root, tmp = lfw["root"], lfw["tmp"]
    source_before = snapshot(root)
    out, bin_path = tmp / "prepared", tmp / "eval" / "lfw_prep.bin"
    result = prepare("lfw", root, lfw["labels"], out, bin_path=bin_path, n_pairs=20, n_gender=6)

    check_links(out, {f"{n}_{g}": sorted((root / n).iterdir())
                      for n, g in [("Alice_Smith", 1), ("Bob_Jones", 0), ("Carol_White", 1), ("Dan_Brown", 0)]})
    # every image of a labelled identity is kept, listed or not (Bob_Jones_0002 is in no list)
    assert len(list((out / "Bob_Jones_0").iterdir())) == 3
    left = report_rows(out)
    assert left["Eve_Unlisted"][0] == "no label"
    assert left["Frank_Both"][0] == "conflicting labels"
    assert "female_names.txt" in left["Frank_Both"][1] and "male_names.txt" in left["Frank_Both"][1]
    log = (out / LOG_NAME).read_text()
    assert "female_names.txt (listed images) -> 1" in log and "male_names.txt (listed images) -> 0" in log
    assert "1 identities listed in female_names.txt have no folder" in log

    index = scan_dataset(out)
    assert index.folders == ["Alice_Smith_1", "Bob_Jones_0", "Carol_White_1", "Dan_Brown_0"]
    assert index.identity_gender.tolist() == [1, 0, 1, 0]
    evalset = load_bin(bin_path)
    assert len(evalset.issame) == 20 and evalset.has_gender
    assert sorted(evalset.gender_labels.tolist()) == [0, 0, 0, 1, 1, 1]   # --n-gender 6: 3 of each gender
    assert result.created == 8 and result.kept == dict(zip(index.folders, [1, 0, 1, 0]))

    before = snapshot(out)
    bin_before = (bin_path.stat().st_mtime_ns, bin_path.read_bytes())
    again = prepare("lfw", root, lfw["labels"], out, bin_path=bin_path, n_pairs=20, n_gender=6)
    assert again.created == 0
    assert snapshot(out) == before
    assert (bin_path.stat().st_mtime_ns, bin_path.read_bytes()) == bin_before
    assert snapshot(root) == source_before, "the source must never change"


def test_lfw_min_images_hard_links_and_cli(lfw, capsys):
    out = lfw["tmp"] / "hard"
    labels = [str(p) for p in lfw["labels"]]
    assert main(["--format", "lfw", "--images", str(lfw["root"]), "--labels", *labels, "--out", str(out),
                 "--min-images", "2", "--link", "hard"]) == 0
    printed = capsys.readouterr().out
    assert "gender mapping" in printed and REPORT_NAME in printed
    assert report_rows(out)["Carol_White"][0] == "too few images"
    assert not (out / "Carol_White_1").exists()
    link = out / "Alice_Smith_1" / "Alice_Smith_0001.jpg"
    assert not link.is_symlink() and os.path.samefile(link, lfw["root"] / "Alice_Smith" / "Alice_Smith_0001.jpg")


def test_existing_different_out_is_refused_and_left_alone(lfw):
    out = lfw["tmp"] / "taken"
    (out / "Alice_Smith_1").mkdir(parents=True)
    (out / "Alice_Smith_1" / "Alice_Smith_0001.jpg").write_bytes(b"not the source")
    (out / "Someone_0").mkdir()
    before = snapshot(out)
    with pytest.raises(UserError, match="never overwritten") as err:
        prepare("lfw", lfw["root"], lfw["labels"], out)
    assert "Someone_0" in str(err.value) and "Alice_Smith_0001.jpg" in str(err.value)
    assert snapshot(out) == before
    # a run interrupted half-way (some links made) is completed
    done = lfw["tmp"] / "partial"
    prepare("lfw", lfw["root"], lfw["labels"], done)
    for p in (done / "Dan_Brown_0").iterdir():
        p.unlink()
    assert prepare("lfw", lfw["root"], lfw["labels"], done).created == 2


def test_clear_errors_for_missing_and_garbled_inputs(lfw, capsys):
    tmp = lfw["tmp"]
    assert main(["--format", "lfw", "--images", str(tmp / "nowhere"), "--labels", *map(str, lfw["labels"]),
                 "--out", str(tmp / "o")]) == 2
    assert "images folder" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not exist"):
        prepare("lfw", lfw["root"], [tmp / "female_names.txt", tmp / "missing_male_names.txt"], tmp / "o")
    garbled = tmp / "male_names_bad.txt"
    garbled.write_text("Bob_Jones_0001.jpg\nthis is not a file name\n")
    with pytest.raises(UserError, match="line 2"):
        prepare("lfw", lfw["root"], [lfw["labels"][0], garbled], tmp / "o")
    unnamed = tmp / "list.txt"
    unnamed.write_text("Bob_Jones_0001.jpg\n")
    with pytest.raises(UserError, match="'female' or 'male'"):
        prepare("lfw", lfw["root"], [lfw["labels"][0], unnamed], tmp / "o")
    with pytest.raises(UserError, match="inside the source"):
        prepare("lfw", lfw["root"], [tmp / "list.txt"], lfw["root"] / "out")
    assert not (tmp / "o").exists() and not (lfw["root"] / "out").exists()


# ------------------------------------------------------------------------------------------------ AgeDB

def test_agedb_flat_folder(tmp_path):
    root = tmp_path / "AgeDB"
    write_images(root, ["0_MariaCallas_35_f.jpg", "1_MariaCallas_40_f.jpg", "2_ElvisPresley_30_m.jpg",
                        "3_ElvisPresley_35_m.jpg", "4_Pat_Morgan_20_f.jpg", "5_Pat_Morgan_25_m.jpg",
                        "6_José Ferrer_50_m.jpg", "no_gender_here.jpg", "7_Ann Lee_30_f.jpg", "8_Ann_Lee_31_m.jpg"])
    (root / "readme.txt").write_text("not an image")
    out = tmp_path / "prepared"
    prepare("agedb", root, [], out)
    # two identities whose cleaned names coincide stay apart, told by a hash of the original name
    twins = {p.name[-1]: p.name for p in out.glob("Ann_Lee-*")}
    assert len(twins) == 2 and twins["0"] != twins["1"]
    check_links(out, {"MariaCallas_1": [root / "0_MariaCallas_35_f.jpg", root / "1_MariaCallas_40_f.jpg"],
                      "ElvisPresley_0": [root / "2_ElvisPresley_30_m.jpg", root / "3_ElvisPresley_35_m.jpg"],
                      "Jos__Ferrer_0": [root / "6_José Ferrer_50_m.jpg"],
                      twins["1"]: [root / "7_Ann Lee_30_f.jpg"], twins["0"]: [root / "8_Ann_Lee_31_m.jpg"]})
    left = report_rows(out)
    assert left["Pat_Morgan"][0] == "conflicting labels"
    assert left["no_gender_here.jpg"][0] == "not in the format's layout"
    assert "skipped 1 files without an image extension" in (out / LOG_NAME).read_text()
    scan_dataset(out)
    with pytest.raises(UserError, match="takes no --labels"):
        prepare("agedb", root, [tmp_path / "x.txt"], tmp_path / "o2")


# ------------------------------------------------------------------------------------------------ ColorFERET

SUBJECTS_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Subjects xmlns="http://www.nist.gov/humanid/colorferet">
  <Subject id="cfrS00001"><Gender value="Female"/><YOB value="1950"/></Subject>
  <Subject id="cfrS00002"><Gender value="Male"/></Subject>
  <Subject id="cfrS00003"><Gender value="Male"/></Subject>
  <Subject id="cfrS00005"><Gender value="Female"/></Subject>
  <Subject id="cfrS00006"><Gender value="Male"/></Subject>
  <Subject id="cfrS00006"><Gender value="Female"/></Subject>
  <Subject id="cfrS00999"><Gender value="Male"/></Subject>
</Subjects>
"""


def test_colorferet_subjects_xml(tmp_path):
    root = tmp_path / "images"
    for s in ("00001", "00002", "00003", "00004", "00006"):
        write_images(root / s, [f"{s}_930831_fa.ppm", f"{s}_930831_fb.ppm"], int(s))
    (root / "00005").mkdir()
    (root / "00005" / "00005_930831_fa.ppm.bz2").write_bytes(b"BZh9 compressed")
    xml = tmp_path / "subjects.xml"
    xml.write_text(SUBJECTS_XML)
    out = tmp_path / "prepared"
    prepare("colorferet", root, [xml], out)
    check_links(out, {f"{s}_{g}": sorted((root / s).iterdir()) for s, g in [("00001", 1), ("00002", 0),
                                                                             ("00003", 0)]})
    left = report_rows(out)
    assert left["00004"][0] == "no label"
    assert left["00005"][0] == "too few images"
    assert left["00006"][0] == "conflicting labels"
    log = (out / LOG_NAME).read_text()
    assert "compressed .bz2" in log and "1 subjects of the XML have no folder" in log
    assert scan_dataset(out).identity_gender.tolist() == [1, 0, 0]

    evil = tmp_path / "evil.xml"
    evil.write_text('<?xml version="1.0"?><!DOCTYPE s [<!ENTITY a "aaaa">]><Subjects>&a;</Subjects>')
    with pytest.raises(UserError, match="DTD"):
        prepare("colorferet", root, [evil], tmp_path / "o2")
    broken = tmp_path / "broken.xml"
    broken.write_text("<Subjects><Subject id='cfrS00001'>")
    with pytest.raises(UserError, match="XML error"):
        prepare("colorferet", root, [broken], tmp_path / "o3")


# ------------------------------------------------------------------------------------------------ VGGFace2

def vggface2_images(root: Path) -> None:
    for i in range(1, 6):
        write_images(root / f"n{i:06d}", ["0001_01.jpg", "0002_01.jpg"], i)


def test_vggface2_identity_meta(tmp_path):
    root = tmp_path / "train"
    vggface2_images(root)
    meta = tmp_path / "identity_meta.csv"
    meta.write_text('Class_ID, Name, Sample_Num, Flag, Gender\n'
                    'n000001, "Ann, Lee", 2, 1, f\n'
                    'n000002, "Bo_Kim", 2, 1, m\n'
                    'n000003, "Cy", 2, 1, m\n'
                    'n000005, "Ed", 2, 1, f\n'
                    'n000005, "Ed", 2, 1, m\n'
                    'n009999, "Not_Here", 300, 0, f\n')
    out = tmp_path / "prepared"
    prepare("vggface2", root, [meta], out)
    check_links(out, {f"n{i:06d}_{g}": sorted((root / f"n{i:06d}").iterdir()) for i, g in [(1, 1), (2, 0), (3, 0)]})
    left = report_rows(out)
    assert left["n000004"][0] == "no label" and left["n000005"][0] == "conflicting labels"
    assert "Gender f -> 1, m -> 0" in (out / LOG_NAME).read_text()


def test_vggface2_per_image_annotations(tmp_path):
    root = tmp_path / "train"
    vggface2_images(root)
    attrs = tmp_path / "attributes.csv"
    attrs.write_text("Filename,Identity,Male,Young\n"
                     "n000001/0001_01.jpg,1,-1,1\n"
                     "n000001/0002_01.jpg,1,0,1\n"       # undetermined: not used, counted
                     "n000002/0001_01.jpg,2,1,0\n"
                     "n000003/0001_01.jpg,3,1,0\n"
                     "n000003/0002_01.jpg,3,-1,0\n"      # conflicting with the row above
                     "n000004/0001_01.jpg,4,0,0\n"
                     "n000004/0002_01.jpg,4,0,0\n")      # only undetermined rows: no label
    out = tmp_path / "prepared"
    prepare("vggface2", root, [attrs], out)
    check_links(out, {"n000001_1": sorted((root / "n000001").iterdir()),
                      "n000002_0": sorted((root / "n000002").iterdir())})
    left = report_rows(out)
    assert left["n000003"][0] == "conflicting labels"
    assert left["n000004"] == ("no label", "2 undetermined row(s) (Male 0) in attributes.csv")
    assert left["n000005"][0] == "no label"
    log = (out / LOG_NAME).read_text()
    assert "3 rows of attributes.csv with Male = 0 (undetermined) skipped" in log
    assert "Male -1 -> 1, Male 1 -> 0" in log

    garbled = tmp_path / "garbled.csv"
    garbled.write_text("Filename,Male\nn000001/0001_01.jpg,yes\n")
    with pytest.raises(UserError, match="line 2"):
        prepare("vggface2", root, [garbled], tmp_path / "o2")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="no column"):
        prepare("vggface2", root, [wrong], tmp_path / "o3")


# ------------------------------------------------------------------------------------------------ record files

def test_record_file_round_trip_and_layout(tmp_path):
    magic = struct.pack("<I", MAGIC)
    identities = [[jpeg(1), jpeg(2)], [jpeg(3)], [b"\xff\xd8\xff\xe0" + magic * 2 + b"tail"]]
    rec = tmp_path / "train.rec"
    write_identity_records(rec, identities)
    with RecordFile(rec) as records:
        assert len(records) == 1 + 4 + 3
        assert records.header() == (5, 8)
        assert records.identity_ranges() == [(0, [1, 2]), (1, [3]), (2, [4])]
        flat = [img for images in identities for img in images]
        for key, (label, image) in enumerate([(k, img) for k, imgs in enumerate(identities) for img in imgs], 1):
            assert records.read(key) == ((float(label),), image)
        assert records.read(4)[1] == flat[3]          # a payload holding the magic number, split and rejoined
        assert records.read(5) == ((1.0, 3.0), b"")   # identity record 0: images 1..2
        copy = pickle.loads(pickle.dumps(records))     # as DataLoader workers receive it: no descriptor inside
        assert copy.read(3) == records.read(3)
    # the split record is stored in parts as dmlc writes it (cflag 1, 2, 3)
    data = rec.read_bytes()
    flags = [struct.unpack_from("<I", data, i + 4)[0] >> 29 for i in range(0, len(data) - 7, 4)
             if data[i:i + 4] == magic and struct.unpack_from("<I", data, i + 4)[0] >> 29 in (1, 2, 3)]
    assert flags == [1, 2, 3]

    # without a header record the identities come from the image labels
    flat_rec = tmp_path / "flat.rec"
    with RecordWriter(flat_rec) as writer:
        for key, label in enumerate([3, 3, 7]):
            writer.write(key, float(label), jpeg(key))
    assert RecordFile(flat_rec).identity_ranges() == [(3, [0, 1]), (7, [2])]


def test_record_file_errors_name_the_file(tmp_path):
    rec = tmp_path / "train.rec"
    write_identity_records(rec, [[jpeg(1)], [jpeg(2)]])
    with pytest.raises(UserError, match=r"index file .*nothere\.idx.* does not exist"):
        RecordFile(rec, tmp_path / "nothere.idx")
    data = bytearray(rec.read_bytes())
    second = int(rec.with_suffix(".idx").read_text().splitlines()[2].split("\t")[1])
    data[second] ^= 0xFF
    bad = tmp_path / "bad.rec"
    bad.write_bytes(bytes(data))
    (tmp_path / "bad.idx").write_bytes(rec.with_suffix(".idx").read_bytes())
    with pytest.raises(UserError, match=r"bad\.rec.*magic number"):
        RecordFile(bad).read(2)
    cut = tmp_path / "cut.rec"
    cut.write_bytes(rec.read_bytes()[:second + 40])
    (tmp_path / "cut.idx").write_text("\n".join(rec.with_suffix(".idx").read_text().splitlines()[:3]) + "\n")
    with pytest.raises(UserError, match=r"cut\.rec.*truncated"):
        RecordFile(cut).read(2)
    (tmp_path / "cut.idx").write_bytes(rec.with_suffix(".idx").read_bytes())
    with pytest.raises(UserError, match=r"cut\.idx.*outside record file.*truncated"):
        RecordFile(cut)


def test_rec_format_writes_the_record_images(tmp_path):
    src = tmp_path / "faces_small"
    src.mkdir()
    identities = [[jpeg(10 * i + j) for j in range(2)] for i in range(12)]
    write_identity_records(src / "train.rec", identities)
    genders = tmp_path / "gender.csv"
    genders.write_text("label,gender\n" + "".join(f"{k},{['female', 'm', '1', 'M'][k % 4]}\n" for k in range(11)))
    out = tmp_path / "prepared"
    prepare("rec", src, [genders], out)
    index = scan_dataset(out)
    # labels padded: the folders' sorted order is the records' label order (10 after 9, not after 1)
    assert index.folders == [f"{k:02d}_{[1, 0, 1, 0][k % 4]}" for k in range(11)]
    for folder, label in zip(index.folders, range(11)):
        files = sorted((out / folder).iterdir())
        assert not any(p.is_symlink() for p in files)
        assert [p.read_bytes() for p in files] == identities[label]
    assert report_rows(out)["11"][0] == "no label"
    assert "image files written from the records" in (out / LOG_NAME).read_text()
    before = snapshot(out)
    assert prepare("rec", src / "train.rec", [genders], out).created == 0
    assert snapshot(out) == before

    # image records whose label contradicts their identity record are reported, never guessed
    odd = tmp_path / "odd"
    odd.mkdir()
    with RecordWriter(odd / "train.rec") as writer:
        writer.write(0, (5.0, 8.0))
        for key, label in enumerate([0, 1, 0, 2], start=1):   # key 3 says identity 0 but lies in identity 1's range
            writer.write(key, float(label), jpeg(key))
        for key, (first, end) in enumerate([(1, 2), (2, 4), (4, 5)], start=5):
            writer.write(key, (float(first), float(end)))
    odd_genders = tmp_path / "odd_gender.csv"
    odd_genders.write_text("Label, Gender\n0,F\n1,M\n2,Male\n")
    prepare("rec", odd, [odd_genders], tmp_path / "odd_out")
    assert scan_dataset(tmp_path / "odd_out").folders == ["0_1", "2_0"]
    assert report_rows(tmp_path / "odd_out")["1"][0] == "conflicting labels"
    with pytest.raises(UserError, match="line 2"):
        bad = tmp_path / "bad_gender.csv"
        bad.write_text("label,gender\n0,unknown\n")
        prepare("rec", src, [bad], tmp_path / "o2")


# ------------------------------------------------------------------------------------------------ CelebA

CELEBA = {10: "FFF", 20: "MMFM", 30: "MM", 40: "FFMFF"}   # identity: per-image Male labels (F = -1, M = 1)
ATTRS = "5_o_Clock_Shadow Arched_Eyebrows Male Young"


def celeba(tmp_path: Path, count_line: bool = True) -> dict:
    """img_align_celeba as downloaded (flat, 000001.jpg...), identity_CelebA.txt and list_attr_celeba.txt; identity
    20 has one dissenting image of four (75% masculine), identity 40 one of five (80% feminine)."""
    root = tmp_path / "img_align_celeba"
    files, ident_lines, attr_lines = [], [], []
    for ident, genders in CELEBA.items():
        for g in genders:
            name = f"{len(files) + 1:06d}.jpg"
            files.append(name)
            ident_lines.append(f"{name} {ident}")
            attr_lines.append(f"{name} -1  1 {'1' if g == 'M' else '-1'}  1")
    write_images(root, files + ["999999.jpg"])   # the last one is in no label file
    identity = tmp_path / "identity_CelebA.txt"
    identity.write_text("\n".join(ident_lines) + "\n")
    attrs = tmp_path / "list_attr_celeba.txt"
    attrs.write_text((f"{len(attr_lines)}\n" if count_line else "") + ATTRS + " \n" + "\n".join(attr_lines) + "\n")
    return {"root": root, "labels": [identity, attrs], "files": files}


def test_celeba_unanimous_leaves_out_identities_with_a_dissenting_image(tmp_path):
    data = celeba(tmp_path)
    out = tmp_path / "unanimous"
    result = prepare("celeba", data["root"], data["labels"], out)
    assert result.kept == {"10_1": 1, "30_0": 0}
    check_links(out, {"10_1": [data["root"] / f for f in data["files"][:3]],
                      "30_0": [data["root"] / f for f in data["files"][7:9]]})
    left = report_rows(out)
    assert left["20"][0] == left["40"][0] == "conflicting labels"
    assert "Male -1" in left["40"][1] and "Male 1" in left["40"][1]
    assert left["999999.jpg"] == ("not in the format's layout", "not in identity_CelebA.txt")
    log = (out / LOG_NAME).read_text()
    assert "gender rule: unanimous" in log and "Male -1 -> 1, Male 1 -> 0" in log
    # the attribute file without its count line reads the same
    other = celeba(tmp_path / "no_count", count_line=False)
    assert prepare("celeba", other["root"], other["labels"], tmp_path / "o2").kept == result.kept


def test_celeba_majority_keeps_identities_above_the_share_and_lists_them_with_counts(tmp_path):
    data = celeba(tmp_path)
    out = tmp_path / "majority"
    result = prepare("celeba", data["root"], data["labels"], out, gender_rule="majority")   # default share 0.8
    assert result.kept == {"10_1": 1, "30_0": 0, "40_1": 1}
    rows = report_rows(out)
    assert rows["40"][0] == "kept by majority"
    assert rows["40"][1].startswith("4 feminine and 1 masculine labels, 80% feminine: gender 1")
    assert rows["20"][0] == "conflicting labels" and "75% masculine" in rows["20"][1]
    assert "gender rule: majority, minimum share 0.8 (1 identities kept by majority" in (out / LOG_NAME).read_text()
    assert sorted(p.name for p in (out / "40_1").iterdir()) == data["files"][9:14]

    low = prepare("celeba", data["root"], data["labels"], tmp_path / "low", gender_rule="majority", min_share=0.7)
    assert low.kept == {"10_1": 1, "20_0": 0, "30_0": 0, "40_1": 1}
    assert report_rows(tmp_path / "low")["20"] == ("kept by majority", report_rows(tmp_path / "low")["20"][1])
    assert report_rows(tmp_path / "low")["20"][1].startswith("1 feminine and 3 masculine labels, 75% masculine")
    for share in (0.5, 1.5, float("nan")):
        with pytest.raises(UserError, match="--gender-min-share"):
            prepare("celeba", data["root"], data["labels"], tmp_path / "bad", gender_rule="majority", min_share=share)


def test_celeba_cli_and_label_file_errors(tmp_path, capsys):
    data = celeba(tmp_path)
    out = tmp_path / "cli"
    assert main(["--format", "celeba", "--images", str(data["root"]), "--labels", *map(str, data["labels"]),
                 "--out", str(out), "--gender-rule", "majority", "--gender-min-share", "0.7"]) == 0
    assert "kept: 4 identities" in capsys.readouterr().out
    with pytest.raises(UserError, match="two --labels"):
        prepare("celeba", data["root"], data["labels"][:1], tmp_path / "x")
    bad = tmp_path / "list_attr_bad.txt"
    bad.write_text(ATTRS + "\n000001.jpg -1 1 0 1\n")
    with pytest.raises(UserError, match="line 2.*Male '0'"):
        prepare("celeba", data["root"], [data["labels"][0], bad], tmp_path / "x")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default 3000)", "(default 2000)", "(default 0)", "(default 1)", "default symbolic",
                    "(unanimous, the default)", "(default 0.8)"):
        assert default in text


def test_celeba_in_the_wild_aligned_with_its_landmark_file(tmp_path):
    from facedata.align.detectors import DetectorSpec
    from facedata.align.transform import REFERENCE_112
    data = celeba(tmp_path)
    points = tmp_path / "list_landmarks_celeba.txt"   # the reference points shifted into a 160x160 photo
    lines = [f"{name} " + " ".join(str(int(round(v))) for v in (REFERENCE_112 + 24).ravel()) for name in data["files"]]
    points.write_text(f"{len(lines)}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x "
                      f"leftmouth_y rightmouth_x rightmouth_y\n" + "\n".join(lines) + "\n")
    for name in data["files"]:
        img = np.random.default_rng(len(name)).integers(0, 256, (160, 160, 3), dtype=np.uint8)
        assert cv2.imwrite(str(data["root"] / name), img)
    out = tmp_path / "aligned"
    result = prepare("celeba", data["root"], data["labels"], out, align=DetectorSpec("file", landmarks=(str(points),)),
                     workers=1, progress=False, gender_rule="majority")
    assert result.kept == {"10_1": 1, "30_0": 0, "40_1": 1}
    crops = sorted((out / "10_1").iterdir())
    assert len(crops) == 3 and not crops[0].is_symlink()
    assert cv2.imread(str(crops[0])).shape == (112, 112, 3)


def test_vggface2_attribute_rows_follow_the_gender_rule(tmp_path):
    root = tmp_path / "train"
    vggface2_images(root)
    write_images(root / "n000003", ["0003_01.jpg"], 9)
    attrs = tmp_path / "attributes.csv"
    attrs.write_text("Filename,Male\nn000001/0001_01.jpg,-1\nn000002/0001_01.jpg,1\n"
                     "n000003/0001_01.jpg,1\nn000003/0002_01.jpg,-1\nn000003/0003_01.jpg,1\n")   # 2 of 3 masculine
    assert "n000003_0" not in prepare("vggface2", root, [attrs], tmp_path / "u").kept
    assert "n000003_0" not in prepare("vggface2", root, [attrs], tmp_path / "m", gender_rule="majority").kept
    assert "67% masculine, under the --gender-min-share 0.8" in report_rows(tmp_path / "m")["n000003"][1]
    kept = prepare("vggface2", root, [attrs], tmp_path / "m6", gender_rule="majority", min_share=0.6).kept
    assert kept["n000003_0"] == 0
    assert report_rows(tmp_path / "m6")["n000003"][0] == "kept by majority"


def test_the_bins_sidecar_is_written_kept_and_never_overwritten(lfw):
    tmp = lfw["tmp"]
    bin_path = tmp / "eval" / "lfw_prep.bin"
    prepare("lfw", lfw["root"], lfw["labels"], tmp / "p", bin_path=bin_path, n_pairs=20, n_gender=6)
    sidecar = bin_path.with_suffix(".pairs.csv")
    first = sidecar.read_bytes()
    assert first.startswith(b"pair,image_a,image_b,subject_a,subject_b,gender_a,gender_b\n")
    assert len(first.splitlines()) == 21
    sidecar.unlink()   # a rerun with the .bin unchanged adds the missing sidecar
    prepare("lfw", lfw["root"], lfw["labels"], tmp / "p", bin_path=bin_path, n_pairs=20, n_gender=6)
    assert sidecar.read_bytes() == first
    sidecar.write_bytes(b"mine")
    with pytest.raises(UserError, match="never overwritten"):
        prepare("lfw", lfw["root"], lfw["labels"], tmp / "p", bin_path=bin_path, n_pairs=20, n_gender=6)
    assert sidecar.read_bytes() == b"mine"
