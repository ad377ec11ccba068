"""Reading mapped caches ahead: only files behind a mapping, only when they fit the memory available."""
import numpy as np

from core.store import readahead


def test_a_mapped_file_is_read_ahead_and_an_array_in_memory_is_not(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(100_000, dtype=np.float32).reshape(1000, 100))
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert readahead.read_ahead(mapped, wait=True)
    assert readahead.read_ahead(mapped[10:20], wait=True)  # a view of the mapping: the same file
    assert not readahead.read_ahead(np.asarray(mapped).copy())  # in memory: nothing to read
    assert float(mapped[999, 99]) == 99_999.0  # the mapping still reads after the advice


def test_a_file_larger_than_its_share_of_memory_is_left_alone(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(1 << 20, np.uint8))
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    available = readahead.available_memory()
    assert available and available > 1 << 20  # Linux: MemAvailable is read
    assert not readahead.read_ahead(mapped, share=(1 << 19) / available)  # half the file's size
    assert readahead.read_ahead(mapped, share=(1 << 22) / available, wait=True)
