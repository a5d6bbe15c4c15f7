"""Hostile `.h5ad` files, crafted with h5py as an attacker would: each is a real AnnData file whose
perturbation column (or X, or uns) reaches outside the file, blocks, or declares data it never wrote.
Shared by the data-layer, CLI and API tests."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

SECRET = "TOPSECRET-0123456789abcdef-KEY"
N_CELLS = 24
LABEL_BYTES = 16


def secret_file(folder: Path) -> Path:
    """A host file the attacker wants to read (stands for /etc/shadow or another tenant's key)."""
    path = folder / "secret.txt"
    path.write_text((SECRET + "\n") * 40)
    return path


def secret_hdf5(folder: Path) -> Path:
    """Another HDF5 file holding the secret as labels (stands for another tenant's dataset)."""
    path = folder / "other-tenant.h5"
    with h5py.File(path, "w") as f:
        f["labels"] = np.array([SECRET.encode()] * N_CELLS, dtype=f"S{len(SECRET)}")
    return path


def plain(path: Path, n_cells: int = N_CELLS) -> Path:
    """A small valid screen: the attacks below replace one of its parts."""
    labels = ["control"] * (n_cells // 2) + ["G1"] * (n_cells - n_cells // 2)
    adata = ad.AnnData(X=np.ones((n_cells, 6), dtype=np.float32),
                       obs=pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(6)]))
    adata.write_h5ad(path)
    return path


def _replace_column(f: h5py.File) -> None:
    del f["obs/perturbation"]
    f["obs"].attrs["column-order"] = ["perturbation"]


def _string_array(dset: h5py.Dataset) -> None:
    dset.attrs["encoding-type"] = "string-array"
    dset.attrs["encoding-version"] = "0.2.0"


def external_storage(path: Path, target: Path) -> Path:
    """The perturbation column is stored in `target` (HDF5 external storage): reading it reads that file."""
    plain(path)
    with h5py.File(path, "a") as f:
        _replace_column(f)
        dset = f["obs"].create_dataset("perturbation", shape=(N_CELLS,), dtype=f"S{LABEL_BYTES}",
                                       external=[(str(target), 0, N_CELLS * LABEL_BYTES)])
        _string_array(dset)
    return path


def external_link(path: Path, target: Path) -> Path:
    """The perturbation column is an external link to a dataset of another HDF5 file."""
    plain(path)
    with h5py.File(path, "a") as f:
        _replace_column(f)
        f["obs/perturbation"] = h5py.ExternalLink(str(target), "/labels")
    with h5py.File(target, "a") as f:
        _string_array(f["labels"])
    return path


def virtual_dataset(path: Path, source: Path) -> Path:
    """The perturbation column is a virtual dataset (VDS) mapping another file's dataset."""
    plain(path)
    layout = h5py.VirtualLayout(shape=(N_CELLS,), dtype=f"S{len(SECRET)}")
    layout[:] = h5py.VirtualSource(str(source), "labels", shape=(N_CELLS,))
    with h5py.File(path, "a") as f:
        _replace_column(f)
        _string_array(f["obs"].create_virtual_dataset("perturbation", layout))
    return path


def soft_link_loop(path: Path) -> Path:
    """uns holds a soft link to itself's parent: a walker that follows links goes round forever."""
    plain(path)
    with h5py.File(path, "a") as f:
        f.require_group("uns")["loop"] = h5py.SoftLink("/uns")
    return path


def hard_link_cycle(path: Path) -> Path:
    """A group hard-linked into its own child: anndata's recursive reader never ends."""
    plain(path)
    with h5py.File(path, "a") as f:
        group = f.require_group("uns").create_group("a")
        group.attrs["encoding-type"] = "dict"
        group.attrs["encoding-version"] = "0.1.0"
        group["again"] = group
    return path


def unwritten_x(path: Path, n_cells: int = 100_000, n_genes: int = 5_000) -> Path:
    """A 100000 x 5000 float32 X (2 GB) declared in chunks that were never written: a small file that
    reads as 2 GB of fill values."""
    _frame(path, n_cells, n_genes)
    with h5py.File(path, "a") as f:
        f.create_dataset("X", shape=(n_cells, n_genes), dtype="f4", chunks=(1_000, n_genes),
                         compression="gzip")
        f["X"].attrs["encoding-type"] = "array"
        f["X"].attrs["encoding-version"] = "0.2.0"
    return path


def compressed_bomb(path: Path, n_cells: int = 100_000, n_genes: int = 5_000) -> Path:
    """The same 2 GB X with every chunk written, as one zlib stream of zeros repeated: a decompression
    bomb (about 1000x) that no chunk count gives away."""
    _frame(path, n_cells, n_genes)
    rows = 1_000
    zeros = zlib.compress(bytes(rows * n_genes * 4), 9)
    with h5py.File(path, "a") as f:
        dset = f.create_dataset("X", shape=(n_cells, n_genes), dtype="f4", chunks=(rows, n_genes),
                                compression="gzip")
        for start in range(0, n_cells, rows):
            dset.id.write_direct_chunk((start, 0), zeros)
        dset.attrs["encoding-type"] = "array"
        dset.attrs["encoding-version"] = "0.2.0"
    return path


def _frame(path: Path, n_cells: int, n_genes: int) -> None:
    """obs (a categorical perturbation column) and var of the given sizes, and no X yet."""
    labels = pd.Categorical(np.where(np.arange(n_cells) % 10 == 0, "control", "G1"))
    adata = ad.AnnData(obs=pd.DataFrame({"perturbation": labels}, index=pd.RangeIndex(n_cells).astype(str)),
                       var=pd.DataFrame(index=pd.RangeIndex(n_genes).astype(str)))
    adata.write_h5ad(path, compression="gzip")


def fifo(folder: Path, name: str = "pipe") -> Path:
    path = folder / name
    os.mkfifo(path)
    return path


def release_fifo(path: Path) -> None:
    """Give EOF to anyone blocked reading the FIFO (a writer opens and closes it)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader is blocked on it
        pass
