"""Delta files: the mode and temporary file of SparseDelta.save, and the checks that files of the
older formats 1 and 2 pass before anything is written.

Oracles: the mode ``open()`` gives a new file under the same umask, the folder's listing, and
values written out by hand.
"""
import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from childopt import delta_file
from childopt.deltas import DeltaEntry, DeltaFormatError, SparseDelta


def small_delta():
    return SparseDelta({"w": DeltaEntry((4,), torch.float32, torch.tensor([1, 3]), torch.tensor([0.5, -1.0]).double())})


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_new_delta_gets_the_mode_open_gives_a_new_file_and_a_saved_over_one_keeps_its_own(tmp_path, umask):
    path = tmp_path / "delta.safetensors"
    kept = tmp_path / "kept.safetensors"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "x"):
            pass
        small_delta().save(path)
        small_delta().save(kept)
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o7777) == oct((tmp_path / "plain").stat().st_mode & 0o7777)
    assert oct(kept.stat().st_mode & 0o7777) == oct(0o640)  # a user's restricted file stays restricted
    assert sorted(os.listdir(tmp_path)) == ["delta.safetensors", "kept.safetensors", "plain"]
    assert SparseDelta.load(path).entries["w"].values.tolist() == [0.5, -1.0]


def test_a_delta_saves_under_a_name_near_the_file_system_limit(tmp_path):
    path = tmp_path / ("d" * 240 + ".safetensors")
    small_delta().save(path)
    assert SparseDelta.load(path).entries["w"].values.tolist() == [0.5, -1.0]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "KeyboardInterrupt"])
def test_a_save_interrupted_mid_write_removes_its_temporary_file_and_keeps_the_old_delta(tmp_path, monkeypatch,
                                                                                           error):
    path = tmp_path / "delta.safetensors"
    small_delta().save(path)
    before = path.read_bytes()
    seen = []
    real_write_bytes = pathlib.Path.write_bytes

    def half_written(self, data):  # writes half the data to the real file, then fails
        real_write_bytes(self, data[: len(data) // 2])
        seen.append(self.name)
        assert sorted(os.listdir(tmp_path)) == sorted(["delta.safetensors", self.name])  # it is there
        raise error

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_written)
    delta = SparseDelta({"w": DeltaEntry((4,), torch.float32, torch.tensor([0]), torch.tensor([2.0]).double())})
    with pytest.raises(type(error)):
        delta.save(path)
    assert seen and seen[0] != "delta.safetensors"
    assert os.listdir(tmp_path) == ["delta.safetensors"]
    assert path.read_bytes() == before


def write_old_format(path, version, entries, tensors):
    """A delta file of format 1 (no checksum) or 2 (checksum, no aliases or fingerprints), by hand."""
    meta = {"childopt.format": "childopt.sparse_delta", "childopt.format_version": version,
            "childopt.entries": json.dumps(entries)}
    if version == "2":
        meta["childopt.sha256"] = delta_file.checksum(meta, tensors)
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize("version", ["1", "2"])
def test_old_format_files_get_every_check_but_the_base_before_anything_is_written(tmp_path, version):
    path = tmp_path / "old.safetensors"
    layout = {"a": {"shape": [3], "dtype": "float32"}, "w": {"shape": [2, 2], "dtype": "float32"}}
    tensors = {"a.indices": torch.tensor([0], dtype=torch.int32), "a.values": torch.tensor([1.0]).double(),
               "w.indices": torch.tensor([1, 3], dtype=torch.int32), "w.values": torch.tensor([0.5, -2.0]).double()}
    write_old_format(path, version, layout, {**tensors, "w.indices": torch.tensor([1, 4], dtype=torch.int32)})
    with pytest.raises(DeltaFormatError, match=r"'w': indices must be strictly increasing and inside \[0, 4\)"):
        SparseDelta.load(path)

    write_old_format(path, version, layout, tensors)
    delta = SparseDelta.load(path)
    assert all(e.base_sha256 is None and e.aliases == () for e in delta.entries.values())
    bad_targets = {
        "shape": ({"a": torch.zeros(3), "w": torch.zeros(4)}, r"'w': the delta has shape \(2, 2\)"),
        "dtype": ({"a": torch.zeros(3), "w": torch.zeros(2, 2).double()}, "but the target has .* torch.float64"),
        "missing": ({"a": torch.zeros(3)}, "target lacks tensors the delta changes: 'w'"),
    }
    for what, (target, match) in bad_targets.items():
        before = {n: t.clone() for n, t in target.items()}
        with pytest.raises(ValueError, match=match):
            delta.apply_to(target)
        assert all(torch.equal(target[n], before[n]) for n in target), what  # 'a' is checked first, not written

    delta.entries["w"].indices = torch.tensor([1, 4], dtype=torch.int32)  # out of range after loading
    target = {"a": torch.zeros(3), "w": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"'w': indices must be strictly increasing and inside \[0, 4\)"):
        delta.apply_to(target)
    assert not any(t.any() for t in target.values())

    delta.entries["w"].indices = torch.tensor([1, 3], dtype=torch.int32)
    delta.apply_to(target)  # no fingerprint to check: any base of the right layout takes it
    assert target["a"].tolist() == [1.0, 0.0, 0.0] and target["w"].tolist() == [[0.0, 0.5], [0.0, -2.0]]


def test_a_save_to_a_missing_folder_names_that_folder_through_a_symlink_and_never_expands_a_tilde(tmp_path,
                                                                                                 monkeypatch):
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "gone" / "x.safetensors")
    with pytest.raises(FileNotFoundError, match=f"its folder '{tmp_path / 'gone'}' does not exist"):
        small_delta().save(link)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~").mkdir()  # a folder literally named ~ is where load() looks for ~/d.safetensors
    small_delta().save("~/d.safetensors")
    assert SparseDelta.load("~/d.safetensors").entries["w"].values.tolist() == [0.5, -1.0]
