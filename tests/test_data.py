import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import common

REPO = Path(__file__).resolve().parent.parent
IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# md5 of the uncompressed content of the real MNIST files, in IDX_NAMES order
REAL_MNIST_MD5 = ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
                  "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637")


# ----------------------------------------------------------------------------------------------------------
# builders for synthetic files in the official formats
# ----------------------------------------------------------------------------------------------------------

def idx_bytes(arr: np.ndarray) -> bytes:
    """An unsigned-byte idx file: 0, 0, type 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=20, n_test=10, seed=0) -> dict[str, np.ndarray]:
    """The four gzipped MNIST-style idx files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
              "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_y": rng.integers(0, 10, n_test, dtype=np.uint8)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, key in zip(IDX_NAMES, arrays):
        (folder / name).write_bytes(gzip.compress(idx_bytes(arrays[key])))
    return arrays


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def resources_for(folder: Path, urls_of, of_content: bool) -> tuple:
    """Resources for the files in folder with md5s of their content (of_content) or of the files."""
    res = []
    for name in IDX_NAMES:
        data = (folder / name).read_bytes()
        res.append(common.Resource(name, urls_of(name), md5_of(gzip.decompress(data) if of_content else data),
                                   of_content))
    return tuple(res)


class Py2Pickler(pickle._Pickler):
    """Writes the opcodes Python 2's cPickle wrote for the official CIFAR batches.

    Python 3 at protocol 2 writes bytes as _codecs.encode(...) calls and numpy 2 names; Python 2 wrote its str
    as BINSTRING opcodes and used the numpy.core.multiarray name, which is what the real files hold.
    """

    dispatch = dict(pickle._Pickler.dispatch)
    GLOBALS = {np.ndarray: "numpy\nndarray\n", np.dtype: "numpy\ndtype\n",
               np.empty(0).__reduce__()[0]: "numpy.core.multiarray\n_reconstruct\n"}  # numpy's _reconstruct

    def save_bytes(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin-1"))

    def save_global(self, obj, name=None):
        self.write(pickle.GLOBAL + self.GLOBALS[obj].encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def cifar_batch(data: np.ndarray, labels: list[int], label: bytes) -> bytes:
    return py2_pickle({b"batch_label": label, b"labels": labels, b"data": data,
                       b"filenames": [b"img_%d.png" % i for i in range(len(labels))]})


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_cifar_archive(path: Path, rows: np.ndarray, labels: np.ndarray, per_batch=10) -> None:
    """A cifar-10-python.tar.gz laid out like the official one, from 6 * per_batch rows of 3072 bytes."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "cifar-10-batches-py/batches.meta", py2_pickle({b"label_names": [b"airplane"] * 10}))
        for b, name in enumerate(names):
            sl = slice(b * per_batch, (b + 1) * per_batch)
            batch = cifar_batch(rows[sl], labels[sl].tolist(), name.encode())
            add_member(tar, f"cifar-10-batches-py/{name}", batch)


def amat_text(bits: np.ndarray, newline: str = "\n") -> bytes:
    return "".join(" ".join(map(str, row)) + newline for row in bits).encode()


# ----------------------------------------------------------------------------------------------------------
# a local HTTP server standing in for the dataset hosts
# ----------------------------------------------------------------------------------------------------------

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(folder served, base URL) of an HTTP server on 127.0.0.1."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def closed_url():
    """Base URL of a port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------------------
# parsers
# ----------------------------------------------------------------------------------------------------------

def test_read_idx_gz_and_raw(tmp_path):
    arrays = write_idx_set(tmp_path)
    assert np.array_equal(common.read_idx(tmp_path / IDX_NAMES[0]), arrays["train_x"])
    assert np.array_equal(common.read_idx(tmp_path / IDX_NAMES[1]), arrays["train_y"])
    raw = tmp_path / "raw-idx3-ubyte"
    raw.write_bytes(idx_bytes(arrays["test_x"]))
    got = common.read_idx(raw)
    assert got.dtype == np.uint8 and np.array_equal(got, arrays["test_x"])


def test_md5sum(tmp_path):
    content = os.urandom(3 << 20)
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(content))
    assert common.md5sum(path) == md5_of(path.read_bytes())
    assert common.md5sum(path, gunzip=True) == md5_of(content)


@pytest.mark.parametrize("name", ["mnist", "binarized_mnist", "fashion_mnist"])
def test_load_arrays_idx_sets(tmp_path, monkeypatch, closed_url, name):
    key = "fashion_mnist" if name == "fashion_mnist" else "mnist"
    arrays = write_idx_set(tmp_path / key)
    monkeypatch.setitem(common.RESOURCES, key, resources_for(tmp_path / key, lambda n: (closed_url + n,),
                                                             of_content=key == "mnist"))
    out = common.load_arrays(name, tmp_path)
    assert out["train_x"].shape == (20, 1, 28, 28) and out["test_x"].shape == (10, 1, 28, 28)
    assert out["train_x"].dtype == np.uint8 and out["train_y"].dtype == np.int64
    for k in arrays:
        assert np.array_equal(out[k].reshape(arrays[k].shape), arrays[k])


@pytest.mark.parametrize("key", ["mnist", "fashion_mnist"])
def test_uncompressed_idx_file_is_accepted(tmp_path, monkeypatch, closed_url, key):
    arrays = write_idx_set(tmp_path / key)
    monkeypatch.setitem(common.RESOURCES, key, resources_for(tmp_path / key, lambda n: (closed_url + n,),
                                                             of_content=key == "mnist"))
    gz = tmp_path / key / IDX_NAMES[0]
    gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    out = common.load_arrays(key, tmp_path)
    assert np.array_equal(out["train_x"][:, 0], arrays["train_x"])


def test_present_file_with_wrong_md5_is_an_error_not_overwritten(tmp_path, monkeypatch, server):
    www, base = server
    write_idx_set(www, seed=1)
    write_idx_set(tmp_path / "mnist", seed=2)  # different files under the same names
    # the server holds the right files, so a wrong re-download would succeed and be caught by the last assert
    before = (tmp_path / "mnist" / IDX_NAMES[0]).read_bytes()
    monkeypatch.setitem(common.RESOURCES, "mnist", resources_for(www, lambda n: (base + n,), of_content=True))
    with pytest.raises(common.DataError, match="train-images-idx3-ubyte.gz.*wrong checksum"):
        common.ensure_files("mnist", tmp_path)
    assert (tmp_path / "mnist" / IDX_NAMES[0]).read_bytes() == before


def test_load_arrays_cifar10_layout(tmp_path, monkeypatch, closed_url):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    archive = folder / "cifar-10-python.tar.gz"
    rng = np.random.default_rng(0)
    rows, labels = rng.integers(0, 256, (60, 3072), dtype=np.uint8), rng.integers(0, 10, 60)
    n = 13  # image 3 of data_batch_2: give its pixel at row 5, column 7 distinct R, G, B values
    rows[n, [5 * 32 + 7, 1024 + 5 * 32 + 7, 2048 + 5 * 32 + 7]] = [11, 22, 33]
    write_cifar_archive(archive, rows, labels)
    resource = common.Resource(archive.name, (closed_url + archive.name,), md5_of(archive.read_bytes()))
    monkeypatch.setitem(common.RESOURCES, "cifar10", (resource,))
    out = common.load_arrays("cifar10", tmp_path)
    assert out["train_x"].shape == (50, 3, 32, 32) and out["test_x"].shape == (10, 3, 32, 32)
    assert out["train_x"].dtype == np.uint8 and out["train_y"].dtype == np.int64
    assert out["train_x"][n, :, 5, 7].tolist() == [11, 22, 33]
    assert np.array_equal(out["train_y"], labels[:50]) and np.array_equal(out["test_y"], labels[50:])
    assert np.array_equal(out["test_x"].reshape(10, -1), rows[50:])
    archive.unlink()  # extracted once: later loads need only the batches folder
    assert np.array_equal(common.load_arrays("cifar10", tmp_path)["train_x"], out["train_x"])
    assert leftovers(folder) == ["cifar-10-batches-py"]


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_malicious_pickle_is_refused(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    good = cifar_batch(np.zeros((2, 3072), np.uint8), [0, 1], b"ok")
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (batches / name).write_bytes(good)
    evil = pickle.dumps(Evil(tmp_path / "pwned"), protocol=2)
    pickle.loads(evil)  # plain pickle runs the payload...
    assert (tmp_path / "pwned").exists()
    (tmp_path / "pwned").unlink()
    (batches / "data_batch_3").write_bytes(evil)
    with pytest.raises(common.DataError, match="data_batch_3.*refusing to load global .*system"):
        common.read_cifar10(batches)
    assert not (tmp_path / "pwned").exists()  # ...the restricted one does not


def test_cifar_batch_with_wrong_shape(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (batches / name).write_bytes(cifar_batch(np.zeros((2, 3000), np.uint8), [0, 1], b"x"))
    with pytest.raises(common.DataError, match="data_batch_1.*3072"):
        common.read_cifar10(batches)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_read_amat(tmp_path, newline):
    bits = np.random.default_rng(0).integers(0, 2, (7, 784), dtype=np.uint8)
    path = tmp_path / "b.amat"
    path.write_bytes(amat_text(bits, newline))
    got = common.read_amat(path, rows=7)
    assert got.dtype == np.uint8 and np.array_equal(got, bits)


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines.__setitem__(2, lines[2].replace("1", "2", 1)), "line 3.*0 or 1"),
    (lambda lines: lines.__setitem__(1, "10 " + lines[1]), "line 2.*0 or 1"),
    (lambda lines: lines.__setitem__(4, lines[4][2:]), "line 5 has 783 values"),
    (lambda lines: lines.__setitem__(0, lines[0] + " 0"), "line 1 has 785 values"),
    (lambda lines: lines.pop(), "4 rows, expected 5"),
])
def test_read_amat_errors(tmp_path, edit, message):
    lines = amat_text(np.ones((5, 784), np.uint8)).decode().splitlines()
    edit(lines)
    path = tmp_path / "bad.amat"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(common.DataError, match=f"bad.amat.*{message}"):
        common.read_amat(path, rows=5)


def test_load_arrays_static_binarized(tmp_path, monkeypatch):
    monkeypatch.setitem(common.AMAT_ROWS, "train", 6)
    monkeypatch.setitem(common.AMAT_ROWS, "valid", 3)
    monkeypatch.setitem(common.AMAT_ROWS, "test", 4)
    folder = tmp_path / "static_binarized_mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    bits = {s: rng.integers(0, 2, (n, 784), dtype=np.uint8) for s, n in common.AMAT_ROWS.items()}
    for split, b in bits.items():
        (folder / f"binarized_mnist_{split}.amat").write_bytes(amat_text(b))
    out = common.load_arrays("static_binarized_mnist", tmp_path)
    assert out["train_y"] is None and out["test_y"] is None
    for split, b in bits.items():
        assert out[f"{split}_x"].shape == (len(b), 1, 28, 28) and out[f"{split}_x"].dtype == np.uint8
        assert np.array_equal(out[f"{split}_x"].reshape(len(b), 784), b)


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(common.DataError, match="unknown dataset 'svhn'.*cifar10.*static_binarized_mnist"):
        common.load_arrays("svhn", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# downloads
# ----------------------------------------------------------------------------------------------------------

def test_download_success(tmp_path, server):
    www, base = server
    payload = os.urandom(100_000)
    (www / "file.bin").write_bytes(payload)
    dest = tmp_path / "dest"
    dest.mkdir()
    path = common.download(common.Resource("file.bin", (base + "file.bin",), md5_of(payload)), dest)
    assert path == dest / "file.bin" and path.read_bytes() == payload
    assert leftovers(dest) == ["file.bin"]


def test_download_falls_back_after_404(tmp_path, server):
    www, base = server
    payload = gzip.compress(b"content")
    (www / "f.gz").write_bytes(payload)
    urls = (base + "missing/f.gz", base + "f.gz")
    res = common.Resource("f.gz", urls, md5_of(b"content"), md5_of_content=True)
    assert common.download(res, tmp_path).read_bytes() == payload


def test_download_checksum_mismatch_leaves_nothing(tmp_path, server):
    www, base = server
    (www / "f.bin").write_bytes(b"tampered")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(common.DataError, match="checksum mismatch"):
        common.download(common.Resource("f.bin", (base + "f.bin",), md5_of(b"genuine")), dest)
    assert leftovers(dest) == []


def test_download_refused_connection_message(tmp_path, closed_url):
    name = "train-images-idx3-ubyte.gz"
    res = common.Resource(name, (closed_url + name,), "0" * 32)
    with pytest.raises(common.DataError) as info:
        common.download(res, tmp_path, timeout=5)
    msg = str(info.value)
    assert "\n" not in msg and "connection refused" in msg
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg and closed_url in msg
    assert leftovers(tmp_path) == []


def test_download_timeout(tmp_path):
    with socket.socket() as s:  # listens, so the connection is made, but never answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}/f.bin"
        with pytest.raises(common.DataError, match="f.bin.*timed out"):
            common.download(common.Resource("f.bin", (url,), None), tmp_path, timeout=0.3)
    assert leftovers(tmp_path) == []


class InterruptedResponse(io.BytesIO):
    """A response body that delivers some bytes, then the user presses Ctrl-C."""

    def read(self, size=-1):
        if self.tell():
            raise KeyboardInterrupt
        return super().read(10)


def test_download_interrupted_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: InterruptedResponse(b"x" * 1000))
    with pytest.raises(KeyboardInterrupt):
        common.download(common.Resource("f.bin", ("http://example.invalid/f.bin",), None), tmp_path)
    assert leftovers(tmp_path) == []


def test_ensure_files_downloads_then_loads(tmp_path, server, monkeypatch):
    www, base = server
    arrays = write_idx_set(www)
    resources = resources_for(www, lambda n: (base + "nope/" + n, base + n), of_content=True)
    monkeypatch.setitem(common.RESOURCES, "mnist", resources)
    out = common.load_arrays("mnist", tmp_path / "data")
    assert np.array_equal(out["test_y"], arrays["test_y"])
    assert leftovers(tmp_path / "data" / "mnist") == sorted(IDX_NAMES)


def test_ensure_files_offline_lists_all_missing(tmp_path, monkeypatch, closed_url):
    folder = tmp_path / "mnist"
    write_idx_set(folder)
    resources = resources_for(folder, lambda n: (closed_url + n,), of_content=True)
    (folder / IDX_NAMES[0]).unlink()
    (folder / IDX_NAMES[3]).unlink()
    monkeypatch.setitem(common.RESOURCES, "mnist", resources)
    with pytest.raises(common.DataError) as info:
        common.ensure_files("mnist", tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "connection refused" in msg and str(folder) in msg
    assert IDX_NAMES[0] in msg and IDX_NAMES[3] in msg and IDX_NAMES[1] not in msg


# ----------------------------------------------------------------------------------------------------------
# damaged and hostile files
# ----------------------------------------------------------------------------------------------------------

def test_truncated_and_corrupt_gzip(tmp_path):
    write_idx_set(tmp_path)
    data = (tmp_path / IDX_NAMES[0]).read_bytes()
    cases = {"truncated.gz": data[: len(data) // 2], "tail_cut.gz": data[:-4], "not_gzip.gz": b"hello" * 10,
             "corrupt.gz": data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:]}
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(common.DataError, match=name):
            common.read_idx(tmp_path / name)


@pytest.mark.parametrize("payload, message", [
    (b"\x00\x00\x0d\x01" + struct.pack(">I", 4) + b"\0" * 16, "not an unsigned-byte idx"),  # float type code
    (b"\x12\x34\x08\x01" + struct.pack(">I", 4) + b"\0" * 4, "not an unsigned-byte idx"),
    (b"\x00\x00\x08\x03" + struct.pack(">3I", 10**9, 28, 28) + b"\0" * 100, "truncated"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\0" * 3, "truncated"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\0" * 5, "trailing"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated idx header"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_bad_idx_files(tmp_path, payload, message, gz):
    path = tmp_path / ("bad-idx.gz" if gz else "bad-idx")
    path.write_bytes(gzip.compress(payload) if gz else payload)
    start = time.perf_counter()
    with pytest.raises(common.DataError, match=f"{path.name}.*{message}"):
        common.read_idx(path)
    assert time.perf_counter() - start < 1.0  # a lying header is caught before any big allocation


def _archive_with(path: Path, member: tarfile.TarInfo, payload: bytes = b"evil") -> None:
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "cifar-10-batches-py/ok.txt", b"fine")
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)


@pytest.mark.parametrize("make", [
    lambda tmp: tarfile.TarInfo("../evil.txt"),
    lambda tmp: tarfile.TarInfo("cifar-10-batches-py/../../evil.txt"),
    lambda tmp: tarfile.TarInfo(str(tmp / "evil.txt")),  # an absolute path
    lambda tmp: _link("cifar-10-batches-py/link", str(tmp / "evil.txt"), tarfile.SYMTYPE),
    lambda tmp: _link("cifar-10-batches-py/hard", "../evil.txt", tarfile.LNKTYPE),
    lambda tmp: _link("cifar-10-batches-py/dev", "", tarfile.CHRTYPE),
])
def test_unsafe_archive_members_are_refused(tmp_path, make):
    archive = tmp_path / "a.tar.gz"
    member = make(tmp_path)
    _archive_with(archive, member)
    dest = tmp_path / "data" / "cifar10"
    dest.mkdir(parents=True)
    with pytest.raises(common.DataError, match="refusing.*" + member.name.split("/")[-1]):
        common.safe_extract_tar(archive, dest)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()
    assert leftovers(dest) == []


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_safe_extract_tar_extracts_plain_members(tmp_path):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_member(tar, "top/sub/f.txt", b"hello")
    common.safe_extract_tar(archive, tmp_path / "out")
    assert (tmp_path / "out" / "top" / "sub" / "f.txt").read_bytes() == b"hello"


# ----------------------------------------------------------------------------------------------------------
# the real MNIST, when the user has it
# ----------------------------------------------------------------------------------------------------------

def _real_data_dir() -> Path | None:
    """DATA_DIR, or the repo's ./data, if it holds all four MNIST files (so the test never downloads)."""
    data_dir = Path(os.environ["DATA_DIR"]) if os.environ.get("DATA_DIR") else REPO / "data"
    folder = data_dir / "mnist"
    found = all((folder / n).exists() or (folder / n[:-3]).exists() for n in IDX_NAMES)
    return data_dir if found else None


@pytest.mark.skipif(_real_data_dir() is None, reason="no real MNIST (set DATA_DIR or put it in ./data/mnist)")
def test_real_mnist():
    data_dir = _real_data_dir()
    out = common.load_arrays("mnist", data_dir)
    assert out["train_x"].shape == (60000, 1, 28, 28) and out["test_x"].shape == (10000, 1, 28, 28)
    assert out["train_x"].dtype == np.uint8 and out["train_y"].dtype == np.int64
    assert out["train_y"].shape == (60000,) and out["test_y"].shape == (10000,)
    assert set(np.unique(out["train_y"])) == set(range(10)) == set(np.unique(out["test_y"]))
    assert tuple(res.md5 for res in common.RESOURCES["mnist"]) == REAL_MNIST_MD5
    for name, md5 in zip(IDX_NAMES, REAL_MNIST_MD5):
        path = data_dir / "mnist" / name
        if path.exists():
            assert common.md5sum(path, gunzip=True) == md5
        else:
            assert common.md5sum(path.with_suffix("")) == md5
