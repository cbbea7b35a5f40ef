import nibabel as nib
import numpy as np
import pytest

from fmrisynth.data.grid import brain_mask, get_grid, gray_matter
from fmrisynth.data.store import ClipStore, StoreWriter
from fmrisynth.errors import FmrisynthError


def test_named_grids_cover_the_mni_brain():
    g2 = get_grid("2mm")
    assert g2.shape == (96, 112, 96) and all(s % 16 == 0 for s in g2.shape)
    # the 2 mm grid sits on the HCP lattice: voxel (2, 1, 2) is MNI (-90, -126, -72)
    assert np.allclose(g2.affine @ [2, 1, 2, 1], [-90, -126, -72, 1])
    g6 = get_grid("6mm")
    m = brain_mask(g6)
    assert m.shape == (32, 40, 32) and 7000 < m.sum() < 10000
    assert not m[0].any() and not m[-1].any()  # the brain does not touch the box
    gm = gray_matter(g6)
    assert gm[m].mean() > gm[~m].mean()
    assert get_grid("4mm:48x56x48").shape == (48, 56, 48)
    with pytest.raises(FmrisynthError, match="unknown grid"):
        get_grid("5cm")


def _write(path, n=5, mask=None):
    mask = np.zeros((4, 5, 6), bool) if mask is None else mask
    mask[1:3, 1:4, 2:5] = True
    items = np.random.default_rng(0).normal(size=(n, 3, int(mask.sum()))).astype(np.float32)
    with StoreWriter(path, (3, int(mask.sum())), np.eye(4), mask.shape, ["a", "b"], mask=mask) as w:
        for i, x in enumerate(items):
            w.add(x, subject=f"s{i % 2}", condition="ab"[i % 2], label=i % 2, split="train" if i < 3 else "test")
    return items, mask


def test_store_roundtrip(tmp_path):
    items, mask = _write(tmp_path / "store")
    s = ClipStore(tmp_path / "store")
    assert len(s) == 5 and s.conditions == ["a", "b"] and s.item_shape == (3, int(mask.sum()))
    assert np.allclose(s.item(4), items[4], atol=2e-3)  # float16 on disk
    stored = s.read_item(4)  # the same item by a file read, outside the map
    assert stored.dtype == np.float16 and stored.shape == s.item_shape and np.array_equal(stored, s.item(4))
    assert np.array_equal(s.read_item(0), s.item(0))
    clip = s.clip(4)
    assert clip.shape == (3, 4, 5, 6) and np.all(clip[:, ~mask] == 0)
    assert np.allclose(clip[:, mask], items[4], atol=2e-3)
    assert list(s.indices(split="test")) == [3, 4] and list(s.indices(condition="b")) == [1, 3]
    assert nib.load(tmp_path / "store" / "mask.nii.gz").shape == mask.shape


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "s", (2, 3), np.eye(4), (1, 2, 3), ["a"]) as w:
            w.add(np.zeros((2, 3)), condition="a")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_empty_store_and_existing_out_are_clear_errors(tmp_path):
    with pytest.raises(FmrisynthError, match="empty"):
        with StoreWriter(tmp_path / "s", (2, 3), np.eye(4), (1, 2, 3), ["a"]):
            pass
    assert list(tmp_path.iterdir()) == []
    _write(tmp_path / "t")
    with pytest.raises(FmrisynthError, match="already exists"):
        StoreWriter(tmp_path / "t", (2, 3), np.eye(4), (1, 2, 3), ["a"])
    with pytest.raises(FmrisynthError, match="not a clip store"):
        ClipStore(tmp_path / "nowhere")
