"""The faster Array decoding (fedrec/federation/array_decode.py) returns what np.load does."""

from io import BytesIO

import numpy as np
import pytest
from flwr.app import Array

from fedrec.federation import array_decode


def npy(a: np.ndarray, version=None) -> bytes:
    buf = BytesIO()
    if version is None:
        np.save(buf, a, allow_pickle=False)
    else:
        np.lib.format.write_array(buf, a, version=version, allow_pickle=False)
    return buf.getvalue()


CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4)),
    np.array(3.5, dtype=np.float32),
    np.zeros((0, 64), np.float32),
    np.arange(5, dtype=">i8"),
    np.array([True, False]),
    np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")]),
]


@pytest.mark.parametrize("a", CASES, ids=lambda a: f"{a.dtype}-{a.shape}")
@pytest.mark.parametrize("version", [None, (2, 0), (3, 0)])
def test_decode_matches_np_load(a, version):
    data = npy(a, version)
    want = np.load(BytesIO(data), allow_pickle=False)
    got = array_decode.decode(data)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.flags.writeable and got.flags.f_contiguous == want.flags.f_contiguous
    assert got.tobytes() == want.tobytes()


def test_what_np_load_refuses_is_still_refused():
    with pytest.raises(ValueError):  # pickled objects
        array_decode.decode(_object_npy())
    with pytest.raises(ValueError):  # truncated data
        array_decode.decode(npy(np.arange(10, dtype=np.float32))[:-4])
    with pytest.raises(ValueError):
        array_decode.decode(b"not an npy file at all")


def _object_npy() -> bytes:
    buf = BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_installed_array_numpy_decodes_the_same(monkeypatch):
    monkeypatch.setattr(Array, "numpy", Array.numpy)  # restored after the test
    a = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    before = Array(a).numpy()
    array_decode.install()
    after = Array(a).numpy()
    assert np.array_equal(before, after) and after.dtype == np.float32
