"""densitylab common.py: the training driver's plumbing shared by every model file.

Data (download, checksums, parsers, in-memory tensors, random batches), 2D toy sets with exact densities and
entropies, devices and seeds, torchrun / DistributedDataParallel, units (nats, bits/dim), PNG images, and run
folders with checkpoints that resume exactly. Nothing here implements a paper's equations: the model files
keep their model, objective and sampler self-contained, so a class copied out of them needs only torch, numpy
and einops.
"""
import argparse
import ast
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
import tokenize
import types
import typing
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.distributed as torch_dist
from PIL import Image
from torch import nn

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: without it the plain log lines are all there is
    tqdm = None

try:  # numpy >= 2 keeps the array-unpickling helper in numpy._core; numpy 1 in numpy.core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


class RunError(Exception):
    """A problem with the run folder or a checkpoint, with a one-line message meant for the user."""


class NonFiniteLoss(RunError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run saved a checkpoint and stops."""


# ----------------------------------------------------------------------------------------------------------
# Args: a @dataclass whose fields carry a trailing `# help` comment becomes an argparse command line
# ----------------------------------------------------------------------------------------------------------
def _field_comments(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the comment at the end of its line (empty when the source is missing).

    A comment may go on over the next lines, each a comment alone indented deeper than the field:
        hidden: int = 0  # units of the hidden layers
                         # (0: the paper's); >= 0
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines[node.lineno] = (node.target.id, node.col_offset)
    comments, field, column, last = {}, None, 0, 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row, col = tok.start
        text = tok.string.lstrip("#").strip()
        if row in lines:  # a field's own line
            (field, column), last = lines[row], row
            comments[field] = text
        elif field is not None and row == last + 1 and col > column:  # its comment goes on
            comments[field], last = f"{comments[field]} {text}", row
        else:
            field = None
    return comments


# A field's comment may end with its valid range, checked before anything runs:
#     batch_size: int = 128  # minibatch per process; >= 1
#     decay: float = 0.99  # EMA decay; in [0, 1)
_BOUND = re.compile(
    r";\s*(?:(?P<op>>=|>)\s*(?P<low>\S+)|in\s*(?P<lb>[\[(])\s*(?P<lo>[^,\s]+)\s*,\s*(?P<hi>[^\])\s]+)"
    r"\s*(?P<rb>[\])]))\s*$")


@dataclass(frozen=True)
class Bound:
    """A closed or open interval [low, high] / (low, high) of valid values; `text` is how the
    comment says it."""

    low: float
    high: float
    low_open: bool
    high_open: bool
    text: str

    def __contains__(self, value) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


def field_bound(comment: str) -> Bound | None:
    """The range at the end of a field's comment ("; >= 1", "; > 0", "; in [0, 1)"), or None."""
    m = _BOUND.search(comment)
    if m is None:
        return None
    text = m.group(0).lstrip("; ").strip()
    if m["op"]:
        return Bound(float(m["low"]), math.inf, m["op"] == ">", True, text)
    return Bound(float(m["lo"]), float(m["hi"]), m["lb"] == "(", m["rb"] == ")", text)


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field, hint, doc: str) -> None:
    flag = "--" + field.name.replace("_", "-")
    default = field.default
    shown = default if isinstance(default, str) and default else repr(default)
    # an empty-string default means "derived at run time": the field's comment says from what
    text = doc if default == "" else f"{doc} (default: {shown})".strip()
    origin, type_args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        hint = next(a for a in type_args if a is not type(None))
        origin, type_args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
    elif origin is typing.Literal:
        parser.add_argument(flag, type=type(type_args[0]), choices=type_args, help=text)
    elif origin is tuple:
        parser.add_argument(flag, type=type_args[0], nargs="+", help=text)
    else:
        parser.add_argument(flag, type=hint, help=text)


def _check_bounds(parser: argparse.ArgumentParser, args, docs: dict[str, str]) -> None:
    """argparse's own error (usage, one `error:` line, exit 2) for the first value outside its
    field's range."""
    for field in dataclasses.fields(args):
        bound = field_bound(docs.get(field.name, ""))
        value = getattr(args, field.name)
        values = value if isinstance(value, tuple) else (value,)
        if bound is None or any(isinstance(v, (bool, str)) or v is None for v in values):
            continue
        for v in values:
            if v not in bound:
                flag = "--" + field.name.replace("_", "-")
                parser.error(f"argument {flag}: must be {bound.text} (got {v})")


def parse_args(cls: type, argv: list[str] | None = None, presets: dict[str, dict] | None = None):
    """Parse the command line into an instance of the dataclass `cls`, checking each field's declared range.

    `presets` maps a boolean field (e.g. "quick") to overrides applied when that flag is set, a dict or a
    function of the values given explicitly (see `toy_or_image`); values given explicitly win over the preset.
    """
    module_doc = sys.modules[cls.__module__].__doc__ or ""
    parser = argparse.ArgumentParser(
        description="\n\n".join(module_doc.strip().split("\n\n")[:2]),  # the summary and the commands
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # so we can tell which values the user gave explicitly
    )
    docs, hints = _field_comments(cls), typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        _add_field(parser, field, hints[field.name], docs.get(field.name, ""))
    given = vars(parser.parse_args(argv))
    values = {}
    for flag, overrides in (presets or {}).items():
        if given.get(flag, getattr(cls, flag, False)):
            values.update(overrides(given) if callable(overrides) else overrides)
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    args = cls(**values)
    _check_bounds(parser, args, docs)
    return args


def toy_or_image(image: dict, toy: dict, default_dataset: str):
    """A preset for `parse_args` that depends on the dataset: `toy` on a 2D toy, `image` otherwise."""
    return lambda given: (toy if given.get("dataset", image.get("dataset", default_dataset)) in TOY_DATASETS
                          else image)


# ----------------------------------------------------------------------------------------------------------
# Device, seeds, mixed precision
# ----------------------------------------------------------------------------------------------------------
def get_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; any other name ("cpu", "cuda:1", ...) is taken as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} was asked for, but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on cuda when enabled; a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@contextlib.contextmanager
def eval_mode(model: nn.Module, seed: int = 0):
    """Evaluate with a fixed seed, without touching the training RNG streams, in eval mode, without grads."""
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# Several GPUs: `torchrun --nproc_per_node=N file.py ...` runs DistributedDataParallel
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(args) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun, set the CPU threads, pick the device, seed
    this rank."""
    dist = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(args, "threads", 0):  # 0 keeps torch's default (one per core, or $OMP_NUM_THREADS)
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    if dist.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_everything(args.seed + dist.rank)  # each rank draws its own noise; DDP copies rank 0's weights
    return dist, device


def wrap_ddp(model: nn.Module, dist: Dist) -> nn.Module:
    """DistributedDataParallel under torchrun, the model itself otherwise."""
    if not dist.enabled:
        return model
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def adam(params, lr: float, **kwargs) -> torch.optim.Adam:
    """torch.optim.Adam, fused into one kernel where this torch version supports it (about 10% of a small
    model's CPU step)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, **kwargs)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def replicas_max_diff(model: nn.Module, dist: Dist) -> float:
    """Largest absolute difference between this rank's parameters and rank 0's, over all ranks."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    reference = flat.clone()
    torch_dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max().reshape(1)
    torch_dist.all_reduce(diff, op=torch_dist.ReduceOp.MAX)
    return diff.item()


def all_reduce_mean(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Average a tensor over ranks (identity in a single process)."""
    if dist.enabled:
        value = value.clone()
        torch_dist.all_reduce(value)
        value /= dist.world_size
    return value


def broadcast_flag(flag: bool, dist: Dist) -> bool:
    """Rank 0's decision, for every rank (e.g. a schedule switched by an evaluation only rank 0 ran)."""
    if not dist.enabled:
        return flag
    device = (torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl"
              else "cpu")
    value = torch.tensor([float(flag)], device=device)
    torch_dist.broadcast(value, src=0)
    return bool(value.item())


def cleanup() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Data: where the files come from, how they are checked, and how they are parsed
# ----------------------------------------------------------------------------------------------------------

CHUNK = 1 << 20  # 1 MiB: bounds memory when hashing, downloading and reading gzip streams
IDX_UBYTE = 0x08  # idx type code of unsigned bytes, the only one MNIST-like files use
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
AMAT_COLS = 784
AMAT_ROWS = {"train": 50_000, "valid": 10_000, "test": 10_000}
FOLDER_OF = {"binarized_mnist": "mnist"}  # binarized_mnist is binarized by the caller from the mnist files


class DataError(Exception):
    """A problem with a data file or download, with a one-line message meant for the user."""


@dataclass(frozen=True)
class Resource:
    filename: str  # name in the dataset folder, e.g. "train-images-idx3-ubyte.gz"
    urls: tuple[str, ...]  # canonical host first, then fallback mirror(s)
    md5: str | None  # None only where no published checksum exists
    md5_of_content: bool = False  # True: md5 of the gunzipped content (MNIST); False: of the file as fetched


def _resources(bases: tuple[str, ...], files: dict, of_content: bool = False) -> tuple[Resource, ...]:
    """One Resource per file, each downloadable from every base URL."""
    return tuple(Resource(f, tuple(b + f for b in bases), md5, of_content) for f, md5 in files.items())


# MNIST: the md5s are of the *uncompressed* idx content. Copies of the files are often re-gzipped, so the .gz
# bytes (and their md5, f68b3c2d... in torchvision) differ between copies while the content does not.
MNIST_URLS = ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}
# Fashion-MNIST: md5s of the .gz files as published in the zalandoresearch/fashion-mnist README (torchvision
# agrees); that GitHub repository holds the same .gz files under data/fashion/.
FASHION_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# Static binarized MNIST (Larochelle & Murray 2011): no md5 is published (TFDS lists only sha256 and sizes),
# so md5 is None and read_amat's format checks (exact row count, 784 tokens of 0/1 per row) stand in for one.
AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"

RESOURCES: dict[str, tuple[Resource, ...]] = {
    "mnist": _resources(MNIST_URLS, MNIST_MD5, of_content=True),
    "fashion_mnist": _resources(FASHION_URLS, FASHION_MD5),
    # CIFAR-10: md5 of the archive as published on the dataset page; there is no official mirror.
    "cifar10": (
        Resource("cifar-10-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                 "c58f30108f718f92721af3b95e74349a"),
    ),
    "static_binarized_mnist": _resources((AMAT_URL,), {f"binarized_mnist_{s}.amat": None for s in AMAT_ROWS}),
}


def md5sum(path, gunzip: bool = False) -> str:
    """Hex md5 of a file (of its gunzipped content if gunzip), read in chunks."""
    digest = hashlib.md5()
    try:
        with (gzip.open(path, "rb") if gunzip else open(path, "rb")) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    return digest.hexdigest()


def _md5_mismatch(path: Path, resource: Resource, gz: bool) -> tuple[str, str] | None:
    """(actual, expected) md5 if path (gzipped if gz) does not match resource's checksum, else None."""
    if resource.md5 is None:
        return None
    if not gz and resource.filename.endswith(".gz") and not resource.md5_of_content:
        return None  # an uncompressed copy cannot be checked against the md5 of a .gz; read_idx validates it
    actual = md5sum(path, gunzip=resource.md5_of_content and gz)
    return None if actual == resource.md5 else (actual, resource.md5)


def _reason(error: BaseException) -> str:
    """A short, human reason for a failed download."""
    cause = getattr(error, "reason", error)
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, (socket.timeout, TimeoutError)):
        return "timed out"
    return str(cause) or type(cause).__name__


def _fetch(url: str, resource: Resource, folder: Path, timeout: float) -> Path:
    """Stream url into a temporary file in folder, check its md5, then move it into place."""
    part = tempfile.NamedTemporaryFile(dir=folder, prefix=resource.filename + ".", suffix=".part",
                                       delete=False)
    tmp = Path(part.name)
    try:  # the temporary file goes away on any failure, Ctrl-C included, so nothing half-written remains
        with part, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, part, CHUNK)
        if mismatch := _md5_mismatch(tmp, resource, gz=resource.filename.endswith(".gz")):
            raise DataError(f"checksum mismatch: md5 {mismatch[0]}, expected {mismatch[1]}")
        os.replace(tmp, folder / resource.filename)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return folder / resource.filename


def _try_urls(resource: Resource, folder: Path, timeout: float) -> str | None:
    """Download resource from the first URL that works; return the last failure reason, or None on success."""
    reason = "no URL to try"
    for url in resource.urls:
        try:
            _fetch(url, resource, folder, timeout)
            return None
        except (OSError, http.client.HTTPException, DataError) as e:  # URLError and timeouts are OSErrors
            reason = f"last error at {url}: {_reason(e)}"
    return reason


def _manual_hint(resources: list[Resource], folder: Path) -> str:
    """'fetch A, B from URL(s) and put them in FOLDER', for the one-line offline message."""
    names = ", ".join(r.filename for r in resources)
    bases = dict.fromkeys(u.rsplit("/", 1)[0] + "/" for r in resources for u in r.urls)
    them = "it" if len(resources) == 1 else "them"
    return f"fetch {names} from {' or '.join(bases)} and put {them} in {folder}"


def download(resource: Resource, folder: Path, timeout: float = 60.0) -> Path:
    """Download one resource into folder, trying each URL in turn; raise DataError if all fail."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if reason := _try_urls(resource, folder, timeout):
        hint = _manual_hint([resource], folder)
        raise DataError(f"could not download {resource.filename} ({reason}); {hint}")
    return folder / resource.filename


def _present(folder: Path, filename: str) -> Path | None:
    """folder/filename if it exists, else its uncompressed copy (for a .gz) if that exists, else None."""
    path = folder / filename
    if not path.exists() and path.suffix == ".gz":
        path = path.with_suffix("")
    return path if path.exists() else None


def ensure_files(name: str, data_dir, timeout: float = 60.0) -> Path:
    """Make sure data_dir/<name> holds verified files for dataset name, downloading what is missing."""
    key = FOLDER_OF.get(name, name)
    if key not in RESOURCES:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted([*RESOURCES, *FOLDER_OF]))}")
    folder = Path(data_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    if key == "cifar10" and (folder / CIFAR_DIR).is_dir():
        return folder  # already extracted; the archive is no longer needed
    missing = []
    for resource in RESOURCES[key]:
        path = _present(folder, resource.filename)
        if path is None:
            missing.append(resource)
        elif mismatch := _md5_mismatch(path, resource, gz=path.name.endswith(".gz")):
            # never download over a user's file: it may be a newer copy, or a sign of a wrong URL
            raise DataError(f"{path} has the wrong checksum (md5 {mismatch[0]}, expected {mismatch[1]}); "
                            "delete it to download it again")
    for i, resource in enumerate(missing):
        # stop at the first failure: when offline the rest would fail too, each after its own timeout
        if reason := _try_urls(resource, folder, timeout):
            raise DataError(f"could not download {name} ({reason}); {_manual_hint(missing[i:], folder)}")
    if key == "cifar10":
        _extract_cifar(folder)
    return folder


def _extract_cifar(folder: Path) -> None:
    """Extract the CIFAR-10 archive via a temporary folder, so an interruption leaves no half-done folder."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".extract-"))
    try:
        safe_extract_tar(folder / RESOURCES["cifar10"][0].filename, tmp)
        if not (tmp / CIFAR_DIR).is_dir():
            raise DataError(f"{folder / RESOURCES['cifar10'][0].filename} has no {CIFAR_DIR}/ folder")
        os.replace(tmp / CIFAR_DIR, folder / CIFAR_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_exactly(f, n: int, path) -> bytearray:
    """Read exactly n bytes in bounded chunks, so a lying header cannot make us allocate beyond the data."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(CHUNK * 16, n - len(buf)))
        if not chunk:
            raise DataError(f"{path}: truncated: the header promises {n} data bytes, found {len(buf)}")
        buf += chunk
    return buf


def read_idx(path) -> np.ndarray:
    """Read an idx file (gzipped or raw, unsigned-byte data) into an array shaped as its header says."""
    path = Path(path)
    gz = path.name.endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] != IDX_UBYTE or not 1 <= magic[3] <= 4:
                raise DataError(f"{path}: not an unsigned-byte idx file (header {magic.hex() or 'empty'})")
            header = f.read(4 * magic[3])
            if len(header) < 4 * magic[3]:
                raise DataError(f"{path}: truncated idx header")
            shape = tuple(int.from_bytes(header[i:i + 4], "big") for i in range(0, len(header), 4))
            n = math.prod(shape)
            if not gz and (held := path.stat().st_size - 4 - len(header)) != n:
                what = "truncated" if held < n else "trailing data"
                raise DataError(f"{path}: {what}: the header promises {n} data bytes, the file holds {held}")
            data = _read_exactly(f, n, path)
            if f.read(1):
                raise DataError(f"{path}: trailing data after the {n} bytes the header promises")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _check_member(member: tarfile.TarInfo, dest: Path, archive) -> None:
    """Refuse archive members that are not plain files or folders, or that would land outside dest."""
    name = PurePosixPath(member.name)
    if (not (member.isfile() or member.isdir()) or name.is_absolute() or ".." in name.parts
            or not (dest / name).resolve().is_relative_to(dest)):
        raise DataError(f"{archive}: refusing unsafe archive member {member.name!r}")


def safe_extract_tar(archive, dest) -> None:
    """Extract a tar archive into dest, refusing links, special files and paths that escape dest."""
    dest = Path(dest).resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:  # check all before writing any, so a bad archive writes nothing
                _check_member(member, dest, archive)
            # the "data" filter repeats these checks inside tarfile and drops unsafe permission bits
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **extra)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot extract {archive}: {e}") from None


# the only globals the official CIFAR-10 batches reference (Python 2 pickles of numpy arrays), in the numpy 1
# spelling they were written with and the numpy 2 one
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else, so a tampered batch cannot run code."""

    def find_class(self, module, name):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return _PICKLE_ALLOWED[module, name]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) and labels (N,) from one CIFAR-10 python batch."""
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a broken pickle can raise almost anything; all of it means a bad file
        raise DataError(f"cannot read CIFAR-10 batch {path}: {e}") from None
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
        raise DataError(f"{path}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: data should be a uint8 array of shape (N, 3072), got {got}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or not np.isin(labels, range(10)).all():
        raise DataError(f"{path}: labels should be {len(data)} integers in 0..9")
    # rows hold 1024 red, then 1024 green, then 1024 blue values, each plane in row-major order
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar10(batches_dir) -> dict[str, np.ndarray]:
    """Train (data_batch_1..5) and test (test_batch) images and labels from cifar-10-batches-py."""
    batches_dir = Path(batches_dir)
    for name in (*CIFAR_TRAIN, "test_batch"):
        if not (batches_dir / name).is_file():
            raise DataError(f"{batches_dir / name} is missing; delete {batches_dir} to extract it anew")
    train = [_read_cifar_batch(batches_dir / name) for name in CIFAR_TRAIN]
    test_x, test_y = _read_cifar_batch(batches_dir / "test_batch")
    train_x, train_y = (np.concatenate(arrays) for arrays in zip(*train))
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def read_amat(path, rows: int | None = None) -> np.ndarray:
    """Read a binarized-MNIST .amat file (lines of 784 space-separated 0/1) into a (rows, 784) uint8 array."""
    try:
        data = Path(path).read_bytes().rstrip()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    buf = np.frombuffer(data, dtype=np.uint8)
    digit = (buf == ord("0")) | (buf == ord("1"))
    # every token must be a single 0 or 1: any other byte, or two digits in a row ("10"), is a bad token
    bad = ~(digit | (buf == ord(" ")) | (buf == ord("\t")) | (buf == ord("\r")) | (buf == ord("\n")))
    bad[1:] |= digit[1:] & digit[:-1]
    if bad.any():
        line = data.count(b"\n", 0, int(bad.argmax())) + 1
        raise DataError(f"{path}: line {line}: every value must be 0 or 1")
    counts = np.zeros(0, np.int32)
    if len(buf):  # digits per line; int32 sums are several times faster than int64 and cannot overflow here
        starts = np.concatenate([[0], np.flatnonzero(buf == ord("\n")) + 1])
        counts = np.add.reduceat(digit.view(np.uint8), starts, dtype=np.int32)
    if (wrong := np.flatnonzero(counts != AMAT_COLS)).size:
        raise DataError(f"{path}: line {wrong[0] + 1} has {counts[wrong[0]]} values, expected {AMAT_COLS}")
    if rows is not None and len(counts) != rows:
        raise DataError(f"{path}: {len(counts)} rows, expected {rows}")
    return (np.compress(digit, buf) - ord("0")).reshape(len(counts), AMAT_COLS)


def _load_idx_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 28, 28) uint8 and labels (N,) int64 from <prefix>-images/labels idx files."""
    paths = [_present(folder, f"{prefix}-{kind}.gz") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{paths[0]}: expected images of 28x28, got shape {images.shape}")
    if labels.shape != images.shape[:1]:
        raise DataError(f"{paths[1]}: {labels.shape} labels for {len(images)} images in {paths[0].name}")
    return images[:, None], labels.astype(np.int64)


def _load_mnist_like(folder: Path) -> dict[str, np.ndarray | None]:
    """MNIST or Fashion-MNIST arrays from the four idx files."""
    (train_x, train_y), (test_x, test_y) = _load_idx_pair(folder, "train"), _load_idx_pair(folder, "t10k")
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def _load_cifar10(folder: Path) -> dict[str, np.ndarray | None]:
    """CIFAR-10 arrays from the extracted batches."""
    return read_cifar10(folder / CIFAR_DIR)


def _load_static_binarized(folder: Path) -> dict[str, np.ndarray | None]:
    """Static binarized MNIST (0/1 values, no labels) with its train/valid/test split."""
    arrays = {f"{s}_x": read_amat(folder / f"binarized_mnist_{s}.amat", n).reshape(-1, 1, 28, 28)
              for s, n in AMAT_ROWS.items()}
    return {**arrays, "train_y": None, "test_y": None}


_LOADERS = {"mnist": _load_mnist_like, "binarized_mnist": _load_mnist_like, "fashion_mnist": _load_mnist_like,
            "cifar10": _load_cifar10, "static_binarized_mnist": _load_static_binarized}


def load_arrays(name: str, data_dir) -> dict[str, np.ndarray | None]:
    """train_x/test_x uint8 (N, C, H, W), train_y/test_y int64 (or None) of a dataset, fetched if needed."""
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[name](ensure_files(name, data_dir))

# ---------------------------------------------------------------------------------------------------------
# 2D toy datasets (FFJORD lib/toy_data.py parameters) with exact samplers and entropies (the exact
# log-densities that derive and check the entropies are in tests/toy_densities.py).
# Each set is a proper continuous distribution, so KL(data || model) = test NLL - TOY_ENTROPY[name] in nats.
# ---------------------------------------------------------------------------------------------------------

TOY_DATASETS: tuple[str, ...] = ("8gaussians", "checkerboard", "two_moons", "swissroll", "pinwheel",
                                 "circles")

# Differential entropies in nats. Non-closed-form values: toy_entropy_by_quadrature of tests/toy_densities.py
# (midpoint rule on [-L, L]^2) at steps h = 0.04 / 0.02 / 0.01, plus h = 0.02 with L + 1 to check the tails;
# "spread" is the largest difference among those runs. Smooth densities converge spectrally in h.
TOY_ENTROPY: dict[str, float] = {
    # quadrature, spread < 1e-13 (< log 8 + 1 + log(2 pi s^2) = 2.83818: overlap)
    "8gaussians": 2.831880406138,
    "checkerboard": math.log(32.0),  # exact: uniform on 8 squares of side 2 (area 32)
    "two_moons": 2.393879195966,  # quadrature, spread 1e-13 (density: 2 x 512-node Gauss-Legendre in t)
    "swissroll": 2.669646173882,  # quadrature, spread 6e-13 (density: 1536-node Gauss-Legendre in t)
    "pinwheel": 2.31778803,  # quadrature, spread 7e-8, 8e-9 for h <= 0.02 (h = 0.005: 2.3177880313); slower
    # convergence from the caustics (integrable 1/sqrt singularities carrying mass ~1e-8)
    "circles": 3.268135711706,  # quadrature, spread < 1e-13 (density: Bessel closed form)
}

# FFJORD lib/toy_data.py: 8 centers at radius 4 (compass directions), std 0.5, all divided by 1.414
# (not sqrt 2)
GAUSS8_SCALE = 1.414
GAUSS8_RADIUS = 4.0 / GAUSS8_SCALE
GAUSS8_STD = 0.5 / GAUSS8_SCALE
# FFJORD: make_moons(noise=0.1) * 2 + (-1, -0.2), so arc radius 2 and noise std 0.2
MOONS_RADIUS, MOONS_STD = 2.0, 0.2
MOONS_SHIFT = (-1.0, -0.2)
# FFJORD: make_swiss_roll(noise=1.0), columns (0, 2), divided by 5; sklearn: t = 1.5 pi (1 + 2u)
SWISS_T_RANGE = (1.5 * math.pi, 4.5 * math.pi)
SWISS_SCALE, SWISS_STD = 5.0, 1.0 / 5.0
# FFJORD: make_circles(factor=0.5, noise=0.08) * 3: rings of radius 3 and 1.5, noise std 0.24
CIRCLES_RADII, CIRCLES_STD = (3.0, 1.5), 0.24
# FFJORD pinwheel: 5 classes, features (r, tau) ~ N((1, 0), diag(0.3^2, 0.1^2)),
# angle rad_k + 0.25 exp(r), x 2
PIN_CLASSES, PIN_RADIAL_STD, PIN_TANGENTIAL_STD, PIN_RATE, PIN_SCALE = 5, 0.3, 0.1, 0.25, 2.0


def _check(name: str) -> None:
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; known: {', '.join(TOY_DATASETS)}")


def _u(n: int, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64)


def _z(n: int, g: torch.Generator | None) -> torch.Tensor:
    return torch.randn(n, 2, generator=g, dtype=torch.float64)


def _pick(n: int, k: int, g: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=g)


def _circle(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.cos(t), torch.sin(t)], dim=-1)


def _gauss8_centers() -> torch.Tensor:
    # FFJORD centers: (+-1, 0), (0, +-1), (+-1/sqrt2, +-1/sqrt2) -- i.e. angles 2 pi j / 8
    return GAUSS8_RADIUS * _circle(torch.arange(8, dtype=torch.float64) * (math.pi / 4))


def _moon_centers(t: torch.Tensor, moon: torch.Tensor) -> torch.Tensor:
    # sklearn make_moons: outer (cos t, sin t), inner (1 - cos t, 0.5 - sin t); FFJORD: * 2 + (-1, -0.2)
    c = _circle(t)
    c = torch.where(moon[:, None] == 0, c, torch.tensor([1.0, 0.5], dtype=torch.float64) - c)
    return MOONS_RADIUS * c + torch.tensor(MOONS_SHIFT, dtype=torch.float64)


def _swiss_centers(t: torch.Tensor) -> torch.Tensor:
    # sklearn make_swiss_roll: (t cos t, t sin t) in columns (0, 2); FFJORD divides by 5
    return t[:, None] * _circle(t) / SWISS_SCALE


def _pinwheel_map(feat: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """FFJORD's feature -> point map before the final x2: einsum('ti,tij->tj', f, [[c, -s], [s, c]]),
    i.e. y = (r c + tau s, -r s + tau c) = rotation of (r, tau) by -phi, phi = 2 pi k / 5 + 0.25 e^r."""
    phi = 2 * math.pi * k / PIN_CLASSES + PIN_RATE * torch.exp(feat[:, 0])
    c, s = torch.cos(phi), torch.sin(phi)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    return torch.einsum("ti,tij->tj", feat, rot)


def _sample64(name: str, n: int, g: torch.Generator | None) -> torch.Tensor:
    if name == "8gaussians":
        return _gauss8_centers()[_pick(n, 8, g)] + GAUSS8_STD * _z(n, g)
    if name == "checkerboard":
        # FFJORD: x1 ~ U[-2, 2), x2 ~ U[0, 1) - 2 Bernoulli(1/2) + (floor(x1) mod 2), all times 2
        x1 = 4 * _u(n, g) - 2
        x2 = _u(n, g) - 2 * _pick(n, 2, g) + torch.remainder(torch.floor(x1), 2)
        return 2 * torch.stack([x1, x2], dim=1)
    if name == "two_moons":
        # sklearn spaces t evenly on [0, pi]; here t ~ U[0, pi] and the moon ~ Bernoulli(1/2)
        # (a proper density)
        return _moon_centers(math.pi * _u(n, g), _pick(n, 2, g)) + MOONS_STD * _z(n, g)
    if name == "swissroll":
        lo, hi = SWISS_T_RANGE
        return _swiss_centers(lo + (hi - lo) * _u(n, g)) + SWISS_STD * _z(n, g)
    if name == "circles":
        # sklearn spaces angles evenly; here angle ~ U[0, 2 pi) and the ring ~ Bernoulli(1/2)
        radius = torch.tensor(CIRCLES_RADII, dtype=torch.float64)[_pick(n, 2, g)]
        return radius[:, None] * _circle(2 * math.pi * _u(n, g)) + CIRCLES_STD * _z(n, g)
    # pinwheel: FFJORD uses n // 5 points per class; here the class is uniform on {0..4}
    k = _pick(n, PIN_CLASSES, g).to(torch.float64)
    feat = _z(n, g) * torch.tensor([PIN_RADIAL_STD, PIN_TANGENTIAL_STD], dtype=torch.float64)
    return PIN_SCALE * _pinwheel_map(feat + torch.tensor([1.0, 0.0], dtype=torch.float64), k)


def toy_sample(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n i.i.d. samples, shape (n, 2), float32 on CPU; reproducible given the generator."""
    _check(name)
    return _sample64(name, n, generator).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Datasets as tensors in memory, and random minibatches of them
# ----------------------------------------------------------------------------------------------------------
IMAGE_DATASETS = ("mnist", "binarized_mnist", "static_binarized_mnist", "fashion_mnist", "cifar10")
TEST_BINARIZATION_SEED = 0  # the dynamically binarized test set is drawn once with this seed
TOY_TRAIN_SIZE, TOY_TEST_SIZE = 1_000_000, 20_000  # fixed draws (seeds 1 and 2): effectively unlimited data


@dataclasses.dataclass
class Data:
    """A dataset held in memory. Images: float (N, C, H, W) in [0, 1]; toys: float (N, 2)."""

    name: str
    kind: str  # "binary" (report nats), "8bit" (report bits/dim) or "toy" (2D, report nats and KL)
    train_x: torch.Tensor
    train_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    dynamic_binarization: bool = False  # draw x ~ Bernoulli(intensity) afresh for every training batch
    entropy: float | None = None  # differential entropy of a toy distribution, nats

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_dims(self) -> int:
        return math.prod(self.shape)


def default_data_dir() -> str:
    return os.environ.get("DATA_DIR") or "data"


def dataset_kind(name: str) -> str:
    """"toy", "binary" or "8bit" from the name alone, so a model file can refuse a dataset before
    loading it."""
    if name in TOY_DATASETS:
        return "toy"
    if name not in IMAGE_DATASETS:
        known = ", ".join(IMAGE_DATASETS + TOY_DATASETS)
        raise DataError(f"unknown dataset '{name}'; known: {known}")
    return "binary" if "binarized" in name else "8bit"


def load_dataset(name: str, data_dir: str = "", device: torch.device | str = "cpu", dist: Dist | None = None
                 ) -> Data:
    """Load a dataset by name (downloading it once, on rank 0) and put it on `device`."""
    data_dir = data_dir or default_data_dir()
    dist = dist or Dist()
    if dataset_kind(name) == "toy":
        train = toy_sample(name, TOY_TRAIN_SIZE, torch.Generator().manual_seed(1))
        test = toy_sample(name, TOY_TEST_SIZE, torch.Generator().manual_seed(2))
        return Data(name, "toy", train.to(device), None, test.to(device), None, entropy=TOY_ENTROPY[name])
    if dist.is_main:
        arrays = load_arrays(name, data_dir)
    barrier(dist)
    if not dist.is_main:
        arrays = load_arrays(name, data_dir)
    as_float = 1.0 if name == "static_binarized_mnist" else 255.0
    tensors = {k: None if v is None else torch.from_numpy(v) for k, v in arrays.items()}
    train_x = tensors["train_x"].float().div_(as_float)
    test_x = tensors["test_x"].float().div_(as_float)
    kind = dataset_kind(name)
    if name == "binarized_mnist":  # fixed test binarization so evaluations are comparable across runs
        test_x = torch.bernoulli(test_x, generator=torch.Generator().manual_seed(TEST_BINARIZATION_SEED))

    def put(t):
        return None if t is None else t.to(device)

    return Data(name, kind, put(train_x), put(tensors["train_y"]), put(test_x), put(tensors["test_y"]),
                dynamic_binarization=name == "binarized_mnist")


class Batches:
    """Random minibatches by step: a fresh permutation each epoch, shared by all ranks, each rank its slice.

    The batch of step s depends only on (seed, s), so a resumed run sees exactly the batches it would have.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, batch_size: int, seed: int,
                 dist: Dist | None = None, binarize: bool = False):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.dist, self.binarize = dist or Dist(), binarize
        self.steps_per_epoch = len(x) // (batch_size * self.dist.world_size)
        if self.steps_per_epoch == 0:
            raise RunError(
                f"batch size {batch_size} x {self.dist.world_size} ranks exceeds the {len(x)} examples")
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = (epoch,
                                       torch.randperm(len(self.x), generator=generator).to(self.x.device))
        start = (i * self.dist.world_size + self.dist.rank) * self.batch_size
        index = self._perm[start : start + self.batch_size]
        x = self.x[index]
        if self.binarize:  # dynamic binarization: a fresh Bernoulli draw from the intensities
            # same law as torch.bernoulli, several times faster on CPU
            x = (torch.rand_like(x) < x).to(x.dtype)
        return x, None if self.y is None else self.y[index]

    def random(self) -> torch.Tensor:
        """A batch drawn uniformly with replacement from the global RNG, for inner loops that need
        extra data."""
        index = torch.randint(len(self.x), (self.batch_size,), device=self.x.device)
        return torch.bernoulli(self.x[index]) if self.binarize else self.x[index]


# ----------------------------------------------------------------------------------------------------------
# Units: every model reports nats (binarized data, toys) or bits/dim (8-bit data) the same way
# ----------------------------------------------------------------------------------------------------------
def bits_per_dim(nll_nats: torch.Tensor | float, num_dims: int, bin_width: float | None = None):
    """Negative log-likelihood per example in nats -> bits per dimension.

    Pass `bin_width` when the model is a density over continuous (dequantized) data: the width of one of
    the 256 bins in the model's coordinates (1/256 for [0, 1] data, 2/256 for [-1, 1]). The probability of
    the 8-bit value is then bounded by density x bin_width^D, which adds -D log(bin_width) nats.
    """
    if bin_width is not None:
        nll_nats = nll_nats - num_dims * math.log(bin_width)
    return nll_nats / (num_dims * math.log(2))


def uniform_dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """8-bit data k/255 in [0, 1] -> (k + u) / 256 with u ~ U[0, 1): a density over [0, 1)^D, bins
    1/256 wide."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (torch.round(x * 255) + noise) / 256


# ----------------------------------------------------------------------------------------------------------
# Images: grids and PNG files
# ----------------------------------------------------------------------------------------------------------
def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> one (rows, cols, C) uint8 image with `pad` pixels between tiles."""
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    tiles = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):  # a few dozen tiles: a loop is clearer than a reshape here
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = tiles[i].transpose(1, 2, 0)
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an (H, W) or (H, W, 1 | 3) uint8 array as PNG (8-bit grey or RGB), through Pillow."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # a read-only or missing folder: name the file we meant to write
        raise OSError(e.errno, e.strerror, str(path)) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # e.g. a full disk: the file at `path`, if any, is unchanged
            raise OSError(e.errno, f"{e.strerror} (an earlier file there is unchanged)", str(path)) from None
        raise


def save_png(path: str | Path, image: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(image))


def save_grid(path: str | Path, x: torch.Tensor, nrow: int | None = None) -> None:
    """Save (N, C, H, W) images in [0, 1] as one PNG grid."""
    save_png(path, image_grid(x, nrow))


def histogram_2d(points: torch.Tensor, bins: int = 200, lim: float = 4.0) -> torch.Tensor:
    """Counts of 2D points on a bins x bins grid over [-lim, lim]^2, rows running top (y = lim) to bottom."""
    index = ((points.float() + lim) / (2 * lim) * bins).floor().long()
    inside = ((index >= 0) & (index < bins)).all(dim=1)
    col, row = index[inside, 0], bins - 1 - index[inside, 1]
    counts = torch.zeros(bins * bins, device=points.device)
    counts.index_add_(0, row * bins + col, torch.ones_like(row, dtype=counts.dtype))
    return counts.view(bins, bins)


def save_heatmap(path: str | Path, values: torch.Tensor) -> None:
    """Save a (H, W) non-negative map (a density, or sample counts) as a grey PNG, scaled to its maximum."""
    values = values.detach().float().cpu()
    image = (values / values.max().clamp(min=1e-12) * 255).round().to(torch.uint8).numpy()
    save_png(path, image)


# ----------------------------------------------------------------------------------------------------------
# Runs: the output folder, metrics, checkpoints that resume exactly, and clean stops
# ----------------------------------------------------------------------------------------------------------
# Fields that may change when a run is resumed; any other difference means another model or objective.
RESUMABLE_FIELDS = {"steps", "epochs", "resume", "overwrite", "device", "out", "data_dir", "log_every",
                    "ckpt_every", "eval_every", "eval_k", "eval_n", "amp", "quick", "threads", "compile",
                    "channels_last"}


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    numpy_state = np.random.get_state()
    state["numpy"] = [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as e:  # a full or read-only disk: the last good checkpoint stays as it was
        raise RunError(f"cannot save the checkpoint {path}: {e.strerror}") from None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:  # missing, a folder, unreadable: the file system's own reason
        raise RunError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except Exception as e:  # a truncated file, a foreign pickle: torch's hint to load unsafely is not for us
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = "it holds objects other than tensors and plain values" if "weights_only" in first else first
        raise RunError(
            f"cannot read checkpoint {path}: not a valid checkpoint of this project ({reason})") from None
    if not isinstance(ckpt, dict):
        raise RunError(f"cannot read checkpoint {path}: not a valid checkpoint of this project (not a dict)")
    return ckpt


class _Stop:
    """Ctrl-C and SIGTERM for the whole command. Inside a training loop the first one asks the loop to stop
    after the current step (it checkpoints, then raises Interrupted); anywhere else (loading data, an
    evaluation), and for the second Ctrl-C always, Interrupted is raised at once. The last
    checkpoint is kept."""

    requested, in_loop, installed = False, False, 0
    run: "Run | None" = None

    @classmethod
    def where(cls) -> str:
        run = cls.run
        if run is None or not run.checkpoint_path.exists():
            return "no checkpoint had been written yet"
        return f"the checkpoint {run.checkpoint_path} is kept: --resume continues from it"

    @classmethod
    def handler(cls, signum, frame) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if cls.in_loop and not cls.requested:
            cls.requested = True
            print(f"{name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)
            return
        raise Interrupted(f"{name}; {cls.where()}")


@contextlib.contextmanager
def stop_on_signals():
    """Install _Stop's handler for SIGINT and SIGTERM (main thread only; nested uses share one)."""
    if threading.current_thread() is not threading.main_thread() or _Stop.installed:
        yield
        return
    _Stop.requested, _Stop.installed = False, 1
    old = {sig: signal.signal(sig, _Stop.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _Stop.installed, _Stop.in_loop = 0, False


class Run:
    """One training run: `--out` holds config.json, metrics.jsonl, PNG grids and checkpoint.pt.

    It owns what every training loop needs around the model: refusing to clobber an earlier run, restoring
    model, optimizer, EMA weights, step and RNG states on `--resume`, periodic and interrupt checkpoints, a
    NaN check before every checkpoint, a progress bar and plain log lines. A refused start changes nothing in
    the folder: on --resume the folder is touched only once the checkpoint has loaded and fits the budget.
    """

    def __init__(self, args, model_name: str, dist: Dist, model: nn.Module, optimizer=None, ema=None,
                 resumable: tuple[str, ...] = ()):
        """`resumable` names a model file's own fields that may change on --resume (evaluation, sampling)."""
        self.args, self.model_name, self.dist = args, model_name, dist
        self.resumable = RESUMABLE_FIELDS | set(resumable)
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.config = dataclasses.asdict(args)
        quick = "-quick" if getattr(args, "quick", False) else ""  # quick runs never collide with real ones
        self.dir = Path(args.out or f"runs/{model_name}-{args.dataset}{quick}")
        self.checkpoint_path = self.dir / "checkpoint.pt"
        self.state: dict = {}  # extra training state a model file wants checkpointed (plain python values)
        self._sums: dict[str, torch.Tensor] = {}
        self._count, self._first_bad = 0, None
        self._t0, self._bar_t, self._resumed = time.time(), 0.0, None
        if dist.is_main:
            self._check_folder()
            if not args.resume:
                self._start_fresh()
        barrier(dist)
        _Stop.run = self
        self.print(f"run folder: {self.dir}" + (" (resuming)" if args.resume else ""))

    def _check_folder(self) -> None:
        """Refuse, before writing anything, a --resume with nothing to resume and a start over an earlier run.
        A folder without a checkpoint (a first attempt that failed before its first checkpoint) is
        not a run."""
        if self.dir.exists() and not self.dir.is_dir():
            raise RunError(f"--out {self.dir} is a file, not a folder")
        if self.args.resume and not self.checkpoint_path.exists():
            raise RunError(f"--resume: there is no checkpoint to resume in {self.dir}")
        if self.checkpoint_path.exists() and not (self.args.resume or self.args.overwrite):
            raise RunError(f"{self.dir} already holds a run: pass --resume to continue it, --overwrite to "
                           f"start again, or --out to write elsewhere")

    def _start_fresh(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("checkpoint.pt", "metrics.jsonl"):  # --overwrite, or what a failed attempt left
            (self.dir / name).unlink(missing_ok=True)
        self._remove_temporary_files()
        atomic_write_bytes(self.dir / "config.json", json.dumps(self.config, indent=2).encode())

    def _remove_temporary_files(self) -> None:
        """The `.NAME.*.tmp` files of writes that a kill interrupted (atomic_write_bytes names them so)."""
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def _continue_resumed(self, step: int, metrics_bytes: int | None) -> None:
        """The resumed run's first writes: its config, no stale temporary files, and metrics.jsonl cut back to
        what it held when the checkpoint was saved (so no step appears twice)."""
        path = self.dir / "metrics.jsonl"
        if path.exists():
            if metrics_bytes is None:  # a checkpoint from before metrics_bytes was saved: cut by step
                lines = [ln for ln in path.read_text().splitlines(True) if json.loads(ln)["step"] <= step]
                atomic_write_bytes(path, "".join(lines).encode())
            elif path.stat().st_size > metrics_bytes:
                with open(path, "r+b") as f:
                    f.truncate(metrics_bytes)
        self._remove_temporary_files()
        atomic_write_bytes(self.dir / "config.json", json.dumps(self.config, indent=2).encode())

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Checkpoint the state *before* `step` (i.e. after step - 1 finished): rank 0 only."""
        if not self.dist.is_main:
            return
        metrics = self.dir / "metrics.jsonl"
        state = {"model_name": self.model_name, "config": self.config, "step": step,
                 "model": self.model.state_dict(), "rng": rng_state(), "state": self.state,
                 "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        save_checkpoint(self.checkpoint_path, state)

    def restore(self) -> int:
        """On --resume load the checkpoint into model, optimizer and EMA and return its step; else 0."""
        if not self.args.resume:
            return 0
        ckpt = load_checkpoint(self.checkpoint_path, map_location=model_device(self.model))
        self._check_compatible(ckpt)
        try:
            self.model.load_state_dict(ckpt["model"])
            if self.optimizer is not None:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(ckpt["ema"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise RunError(f"checkpoint {self.checkpoint_path} does not fit this model: "
                           f"{str(e).strip().splitlines()[0]}") from None
        if self.dist.is_main:
            set_rng_state(ckpt["rng"])
        else:  # other ranks' streams are not saved: give them fresh ones derived from the step
            seed_everything(self.args.seed + self.dist.rank + 7919 * ckpt["step"])
        self.state.update(ckpt.get("state", {}))
        self._resumed = (ckpt["step"], ckpt.get("metrics_bytes"))
        self.print(f"resumed {self.checkpoint_path} at step {ckpt['step']}")
        return ckpt["step"]

    def _check_compatible(self, ckpt: dict) -> None:
        if ckpt.get("model_name") != self.model_name:
            raise RunError(f"checkpoint {self.checkpoint_path} was written by {ckpt.get('model_name')}.py, "
                           f"not {self.model_name}.py")
        saved = ckpt.get("config", {})
        changed = [f"{k}={saved.get(k)!r} in the checkpoint but {v!r} now" for k, v in self.config.items()
                   if k not in self.resumable and saved.get(k) != v]
        if changed:
            raise RunError(f"checkpoint {self.checkpoint_path} is incompatible with this run: "
                           f"{'; '.join(changed)} (rerun with those flags, as in {self.dir / 'config.json'})")

    # -- the training loop ------------------------------------------------------------------------------
    def steps(self, start: int, total: int, items_per_step: int = 0):
        """Yield the steps start..total-1 with a progress bar; checkpoint periodically, at the end, and on
        Ctrl-C/SIGTERM (then raise Interrupted). Every checkpoint follows a check that the loss is finite."""
        if start > total:
            raise RunError(f"the checkpoint in {self.dir} is at step {start}, past this run's {total} steps: "
                           f"resume with a budget of at least {start} steps, or start again with --overwrite")
        if self._resumed is not None and self.dist.is_main:
            self._continue_resumed(*self._resumed)
        bar = None
        if tqdm is not None and self.dist.is_main and sys.stderr.isatty():
            bar = tqdm(total=total, initial=start, dynamic_ncols=True, unit="step")
        self._rate_t, self._rate_step, self._items = time.time(), start, items_per_step
        with stop_on_signals():
            try:
                for step in range(start, total):
                    _Stop.in_loop = True
                    yield step
                    if bar is not None:
                        self._update_bar(bar)
                    if self._stop_now(step):
                        self._flush(step)
                        self.save(step + 1)
                        raise Interrupted(
                            f"stopped at step {step + 1}; checkpoint saved in {self.checkpoint_path}, "
                            f"continue with --resume")
                    if (step + 1) % self.args.log_every == 0 or (step + 1) % self.args.ckpt_every == 0:
                        self._flush(step)
                    if (step + 1) % self.args.ckpt_every == 0:
                        self.save(step + 1)
                self._flush(total - 1)
                if total > start:
                    self.save(total)
            finally:
                _Stop.in_loop = False
                if bar is not None:
                    bar.close()

    def _update_bar(self, bar) -> None:
        """One step on the bar; the running mean loss of this log interval at most once a second
        (one sync)."""
        bar.update(1)
        now = time.time()
        if now - self._bar_t >= 1.0 and self._count and "loss" in self._sums:
            self._bar_t = now
            bar.set_postfix(loss=f"{self._sums['loss'].item() / self._count:.4g}", refresh=False)

    def _stop_now(self, step: int) -> bool:
        if not self.dist.enabled:
            return _Stop.requested
        if (step + 1) % self.args.log_every:  # ranks agree on stopping only at log steps, to stay in lockstep
            return False
        flag = torch.tensor([float(_Stop.requested)], device=self._device())
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return bool(flag.item())

    def _device(self) -> torch.device:
        return model_device(self.model)

    def log_train(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """Accumulate this step's metrics on the device (no host sync); `steps` flushes them at log steps."""
        for key, value in metrics.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
        loss = metrics["loss"].detach()
        bad = torch.where(torch.isfinite(loss), -1, step)
        self._first_bad = (bad if self._first_bad is None
                           else torch.where(self._first_bad >= 0, self._first_bad, bad))
        self._count += 1

    def _flush(self, step: int) -> None:
        if self._first_bad is not None and self._first_bad.item() >= 0:
            kept = f"the last good checkpoint is {self.checkpoint_path}" if self.checkpoint_path.exists() \
                else "no checkpoint had been written yet"
            raise NonFiniteLoss(f"loss became non-finite at step {self._first_bad.item()}; stopping ({kept})")
        if not self._count:
            return
        means = {k: v.item() / self._count for k, v in self._sums.items()}
        now = time.time()
        rate = (step + 1 - self._rate_step) * self._items / max(now - self._rate_t, 1e-9)
        self._rate_t, self._rate_step = now, step + 1
        self._sums, self._count, self._first_bad = {}, 0, None
        if self._items:
            means["items_per_s"] = rate
        self.log("train", step + 1, means)

    def log(self, split: str, step: int, metrics: dict[str, float], note: str = "") -> None:
        """Append one JSON line to metrics.jsonl and print one plain line (rank 0 only)."""
        if not self.dist.is_main:
            return
        record = {"split": split, "step": step, "time": round(time.time() - self._t0, 2), **metrics}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        values = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        prefix = f"step {step}" if split == "train" else f"eval {split}"
        self.print(f"{prefix} {values}" + (f" ({note})" if note else ""))

    def print(self, line: str) -> None:
        if not self.dist.is_main:
            return
        if tqdm is not None:
            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
        sys.stdout.flush()

    def path(self, name: str) -> Path:
        return self.dir / name


def progress(items, desc: str, total: int | None = None, unit: str = "img"):
    """Yield from `items` with a progress bar on stderr saying what is computed
    ("10,000 test images x k = 1000"), advanced by the rows of each tensor (or by 1). For evaluations and
    samplers that take more than a few seconds; no bar when stderr is not a terminal (log files, tests)."""
    if tqdm is None or not sys.stderr.isatty():
        yield from items
        return
    with tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) as bar:
        for item in items:
            yield item
            bar.update(len(item) if isinstance(item, torch.Tensor) else 1)


def steps_bar(what: str):
    """For a sampler's `progress` argument (a function wrapping its loop): a bar over the steps saying what
    is drawn."""
    return lambda steps: progress(steps, what, len(steps), unit="step")


def _fmt(value) -> str:
    """For reading: whole numbers without decimals, rates and large values with one or none, the rest four."""
    if not isinstance(value, float):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"


def cpu_recipes(doc: str) -> list[str]:
    """The commands of a docstring marked "# CPU recipe", each joined over its backslash-continued lines."""
    commands = re.findall(r"^[ \t]*(python (?:[^\n#]*\\\n)*[^\n#]*?)\s*# CPU recipe", doc, re.M)
    return [" ".join(c.replace("\\\n", " ").split()) for c in commands]


def cli(train, args_cls: type, presets: dict | None = None, argv: list[str] | None = None) -> None:
    """Parse arguments, train, and turn the expected failures into one clear line and an exit code:
    2 for bad input (data, run folder, checkpoint, file system), 130 for Ctrl-C / SIGTERM. After a --quick run
    on images (a smoke test) the last line is the docstring's command marked "# CPU recipe"."""
    args = parse_args(args_cls, argv, presets)
    recipe = cpu_recipes(sys.modules[args_cls.__module__].__doc__ or "")
    _Stop.run = None
    try:
        with stop_on_signals():
            train(args)
        if _Stop.run is not None and Dist(int(os.environ.get("RANK", 0))).is_main:
            print(f"run folder: {_Stop.run.dir}", file=sys.stderr)
            # images only: a dataset left "" is resolved by the file later (flows: a toy for its default task)
            if (recipe and getattr(args, "quick", False)
                    and getattr(args, "dataset", "") not in ("", *TOY_DATASETS)):
                print(f"--quick on images is a smoke test, too short to learn; recognizable samples "
                      f"in 30 minutes on a CPU: {recipe[0]}", file=sys.stderr)
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the file system: a read-only or full disk, a file where a folder should be, ...
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"interrupted: {e or 'Ctrl-C'}", file=sys.stderr)
        sys.exit(130)
    finally:
        cleanup()
