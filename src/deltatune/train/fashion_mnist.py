"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, arXiv:1708.07747) from Debian's ``dataset-fashion-mnist``.

60,000 training and 10,000 test images, 28×28 grey, 10 classes of clothing; MIT licence. The Debian
package holds the original IDX files under ``usr/share/datasets/fashion-mnist/``. Installed
(``apt-get install dataset-fashion-mnist``, needs root) they are used where they are; otherwise
``python -m deltatune.train.fashion_mnist`` (what ``make setup`` runs) fetches the package with
``apt-get download`` (no root needed) and unpacks the four files into the cache
(``$DELTATUNE_CACHE/fashion-mnist``): the ``.deb`` is an ``ar`` archive holding ``data.tar.*``,
read here with the standard library, so ``dpkg-deb`` is not needed either.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def cache_dir() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune")) / "fashion-mnist"


def _complete(directory: Path) -> bool:
    return all((directory / f).is_file() for pair in FILES.values() for f in pair)


def data_dir() -> Path:
    """Where the IDX files are: the system's copy, or the cache's; a ``ValueError`` naming the fix if neither."""
    for candidate in (SYSTEM_DIR, cache_dir()):
        if _complete(candidate):
            return candidate
    raise ValueError("task 'image' uses Fashion-MNIST from Debian's dataset-fashion-mnist package: run "
                     "`make setup` or `python -m deltatune.train.fashion_mnist` (no root needed), "
                     "or `apt-get install dataset-fashion-mnist`")


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (gzip) as a uint8 tensor: (N,) labels or (N, 28, 28) images."""
    raw = gzip.decompress(path.read_bytes())
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes; run `python -m deltatune.train.fashion_mnist` again")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8)
    if data.numel() != torch.Size(shape).numel():
        raise ValueError(f"{path} is truncated ({data.numel()} of {torch.Size(shape).numel()} bytes); "
                         "run `python -m deltatune.train.fashion_mnist` again")
    return data.view(*shape)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``("train" | "test")`` -> (images (N, 28, 28) uint8, labels (N,) int64)."""
    images, labels = FILES[split]
    where = data_dir()
    x, y = _read_idx(where / images), _read_idx(where / labels)
    if len(x) != len(y):
        raise ValueError(f"{where}: {len(x)} images but {len(y)} labels")
    return x, y.long()


def _ar_members(deb: bytes) -> dict[str, bytes]:
    """The members of an ``ar`` archive (a ``.deb``): name -> bytes."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar header)")
    members, pos = {}, 8
    while pos + 60 <= len(deb):
        header = deb[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    return members


def unpack(deb: Path, target: Path) -> None:
    """Extract the IDX files of the ``.deb`` at ``deb`` into ``target`` (atomically: all or nothing)."""
    members = _ar_members(deb.read_bytes())
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data is None:
        raise ValueError(f"{deb} holds no data.tar member")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fashion-mnist-", dir=target.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # gz, xz or zst-less formats tarfile reads
            wanted = {f for pair in FILES.values() for f in pair}
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name in wanted:
                    source = tar.extractfile(member)
                    assert source is not None
                    (tmp / name).write_bytes(source.read())
        if not _complete(tmp):
            raise ValueError(f"{deb} lacks some of the Fashion-MNIST files")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch() -> Path:
    """Make the files available (download the .deb with ``apt-get download`` and unpack it) and say where."""
    try:
        return data_dir()
    except ValueError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if result.returncode != 0 or not debs:
            raise ValueError(f"`apt-get download {PACKAGE}` failed ({result.stderr.strip()[-300:]}); on a machine "
                             "without Debian's apt, put the four Fashion-MNIST .gz files into " + str(cache_dir()))
        unpack(debs[0], cache_dir())
    return data_dir()


def main() -> int:
    try:
        where = fetch()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Fashion-MNIST: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
