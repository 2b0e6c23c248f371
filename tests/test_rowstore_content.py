"""The row store finds an image by its content: the same bytes met as a file of a training folder and as an image
of a .bin (make_bin.py copies the files' bytes) are extracted once, whichever comes first; pruning keeps them."""
import numpy as np
import pytest

import templates.cache
from facedata.binfile import load_bin
from facedata.dataset import scan_dataset
from helpers import demo_cfg, synthetic_world, template_cache
from templates.space import prune


@pytest.fixture
def counted(monkeypatch):
    """The number of images each backbone pass extracts."""
    passes: list[int] = []
    real = templates.cache.extract_rows

    def spy(backbone, items, *args, **kw):
        passes.append(len(items))
        return real(backbone, items, *args, **kw)
    monkeypatch.setattr(templates.cache, "extract_rows", spy)
    return passes


def world_sets(tmp_path):
    synthetic_world(tmp_path, n_train_ids=6, imgs=3, n_test_ids=6, test_imgs=3, pairs=20, gender=12)
    cfg = demo_cfg(tmp_path)
    folder = scan_dataset(tmp_path / "test" / "synth_a").paths       # the folder the .bin was made of
    es = load_bin(tmp_path / "rec" / "synth_a.bin")
    images = es.pair_images + es.gender_images
    return cfg, folder, images


def by_content(paths, rows):
    return {p.read_bytes(): r for p, r in zip(paths, rows)}


def test_a_bin_extracted_first_spares_its_folders_files(tmp_path, counted):
    cfg, folder, images = world_sets(tmp_path)
    cache = template_cache(cfg)
    bin_rows = np.array(cache.get("bin", "b", images).templates)
    in_bin = {bytes(b) for b in images}
    new = [p for p in folder if p.read_bytes() not in in_bin]
    assert 0 < len(new) < len(folder)           # the .bin holds some of the folder's images, not all
    folder_rows = np.array(cache.get("folder", "f", folder).templates)
    assert counted == [len(in_bin), len(new)]   # only the images the .bin does not hold
    from_bin = {bytes(b): r for b, r in zip(images, bin_rows)}
    for p, r in zip(folder, folder_rows):
        if p.read_bytes() in from_bin:
            np.testing.assert_array_equal(r, from_bin[p.read_bytes()])
    # a third set of the same files: found by their path keys (the aliases), nothing read or extracted
    counted.clear()
    cache.get("again", "a", folder[::-1])
    assert counted == []


def test_a_folder_extracted_first_spares_the_bin_and_pruning_keeps_the_rows(tmp_path, counted):
    cfg, folder, images = world_sets(tmp_path)
    cache = template_cache(cfg)
    folder_rows = by_content(folder, np.array(cache.get("folder", "f", folder).templates))
    assert counted == [len(folder)]
    assert prune(cfg.cache_dir).rows == 0
    bin_rows = np.array(cache.get("bin", "b", images).templates)
    assert counted == [len(folder)]             # every image of the .bin is a file of the folder: no pass
    for b, r in zip(images, bin_rows):
        np.testing.assert_array_equal(r, folder_rows[bytes(b)])
    assert prune(cfg.cache_dir).rows == 0       # both entries' rows are needed
