"""Checks on an `.h5ad` nobody vouches for, run on its HDF5 structure before anndata reads any data.

HDF5 lets a dataset's bytes come from outside the file: external storage (raw bytes of any host
file, a FIFO, a device), external links and virtual datasets (other HDF5 files), and filters loaded
as plugins. anndata follows all of them, so an obs column stored "externally" in `/etc/shadow` has
the reader load that file and echo it in an error. A chunked dataset whose chunks were never written
reads as fill values: a 200 KB file can declare gigabytes. The walk here reads metadata only (links,
creation properties, chunk counts, shapes and types) and refuses all of that, naming the HDF5 path
at fault and, for limits, the environment variable that raises them.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, get_origin

import h5py
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError

from .errors import DataError, DataFileError, DataTooLarge, UnsafeDataFile

ENV_PREFIX = "CELLFORGE_DATA_"
_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Filters HDF5 and h5py carry built in; any other id would make HDF5 load a plugin library.
BUILTIN_FILTERS = (
    h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32, h5py.h5z.FILTER_SZIP,
    h5py.h5z.FILTER_NBIT, h5py.h5z.FILTER_SCALEOFFSET, h5py.h5z.FILTER_LZF,
)
# What backed mode leaves on disk; everything else anndata reads into memory even when backed.
_BACKED_PATHS = ("/X", "/raw/X", "/raw.X")
_LINK_KINDS = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}
_Settings = TypeVar("_Settings", bound=BaseModel)


class H5Limits(BaseModel):
    """Bounds an `.h5ad` must keep to be opened; each is set by `CELLFORGE_DATA_<FIELD>` (sizes take
    units: `64GiB`, `512MiB`). Declared sizes are shape x item size, i.e. uncompressed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_cells: int = Field(20_000_000, gt=0, description="rows of X (or of obs)")
    max_features: int = Field(2_000_000, gt=0, description="columns of X (or rows of var)")
    max_objects: int = Field(200_000, gt=0, description="groups, datasets and attributes")
    max_depth: int = Field(32, gt=0, description="nesting of groups")
    max_declared_bytes: ByteSize = Field(ByteSize(64 << 30), gt=0,
                                         description="declared size of all datasets and attributes")
    max_expansion: float = Field(100.0, gt=0, description="declared size over the file's size")
    expansion_floor_bytes: ByteSize = Field(ByteSize(256 << 20), ge=0,
                                            description="declared size always allowed, whatever the ratio")
    max_memory_bytes: ByteSize = Field(ByteSize(16 << 30), gt=0,
                                       description="declared size read into memory (X excluded when backed)")
    allowed_filters: tuple[int, ...] = Field(BUILTIN_FILTERS, description="HDF5 filter ids allowed")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> H5Limits:
        """The defaults, overridden by `CELLFORGE_DATA_*` variables (a DataError names a bad one)."""
        return settings_from_env(cls, ENV_PREFIX, env)


def settings_from_env(model: type[_Settings], prefix: str, env: Mapping[str, str] | None = None,
                      **fixed: object) -> _Settings:
    """`model` with each field read from `<prefix><FIELD>` where set (lists comma-separated), the
    defaults elsewhere; a DataError names the variable of a bad value."""
    env = os.environ if env is None else env
    values: dict[str, object] = dict(fixed)
    for name, info in model.model_fields.items():
        raw = env.get(prefix + name.upper())
        if raw is not None and raw.strip() and name not in fixed:
            values[name] = raw.split(",") if get_origin(info.annotation) is tuple else raw.strip()
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{prefix}{str(e['loc'][0]).upper()}: {e['msg']} (got {e['input']!r})"
                             for e in exc.errors())
        raise DataError(f"invalid settings in the environment: {problems}") from None


@dataclass(frozen=True)
class Inventory:
    """What the walk found: sizes and shapes, all from metadata."""

    file_bytes: int
    device_inode: tuple[int, int]
    n_obs: int
    n_vars: int
    declared_bytes: int  # every dataset, uncompressed
    backed_bytes: int  # the part of it backed mode leaves on disk (X, raw X)
    largest: tuple[tuple[str, int], ...]  # the biggest datasets, for error messages

    def memory_bytes(self, backed: bool) -> int:
        """What anndata reads into memory: everything, or everything but X when backed."""
        return self.declared_bytes - (self.backed_bytes if backed else 0)


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _raise_hint(field: str) -> str:
    return f"set {ENV_PREFIX}{field.upper()} to raise it"


def open_checked(path: str | Path, limits: H5Limits) -> tuple[h5py.File, Inventory]:
    """Open `path` read-only after checking it is a regular HDF5 file, walk it, and check it against
    `limits` (all but the memory bound, which depends on how it will be read). The caller closes the
    file; on any refusal it is closed here."""
    p = Path(path)
    st = _regular_file(p)
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced since the stat above
            raise UnsafeDataFile(f"{p}: is not a regular file; expected an AnnData .h5ad file")
        if not _has_signature(fd, st.st_size):
            raise DataFileError(f"{p}: not an HDF5 file (bad signature); expected an AnnData .h5ad file")
        try:
            f = h5py.File(p, "r", driver="sec2")
        except OSError as exc:
            raise DataFileError(f"{p}: cannot be opened as HDF5 ({exc}); expected an AnnData .h5ad file") from None
    finally:
        os.close(fd)
    try:
        opened = os.fstat(f.id.get_vfd_handle())
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            raise UnsafeDataFile(f"{p}: the file was replaced while being opened")
        return f, _inventory(f, p, st, limits)
    except BaseException:
        f.close()
        raise


def same_file(f: h5py.File, inventory: Inventory, path: Path) -> None:
    """Refuse an h5py handle (e.g. the one anndata opens for backed mode) that is not the checked file."""
    try:
        opened = os.fstat(f.id.get_vfd_handle())
    except (OSError, ValueError, TypeError):
        raise UnsafeDataFile(f"{path}: cannot confirm the opened file is the checked one") from None
    if (opened.st_dev, opened.st_ino) != inventory.device_inode:
        raise UnsafeDataFile(f"{path}: the file was replaced while being opened")


def _regular_file(p: Path) -> os.stat_result:
    """stat (following symlinks) before any open: opening a FIFO for reading blocks, a device may not end."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise DataFileError(f"{p}: no such file; expected an AnnData .h5ad file") from None
    except OSError as exc:
        raise DataFileError(f"{p}: cannot be read ({exc.strerror}); expected an AnnData .h5ad file") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataFileError(f"{p}: is not a regular file (a directory); expected an AnnData .h5ad file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a device" if
                stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        raise UnsafeDataFile(f"{p}: is {kind}, not a regular file; expected an AnnData .h5ad file")
    return st


def _has_signature(fd: int, size: int) -> bool:
    """The HDF5 signature at 0, 512, 1024, 2048, ... (after a user block), as H5Fis_accessible looks."""
    offset = 0
    while offset + len(_SIGNATURE) <= size:
        if os.pread(fd, len(_SIGNATURE), offset) == _SIGNATURE:
            return True
        offset = 512 if offset == 0 else offset * 2
    return False


@dataclass(frozen=True)
class _Dataset:
    path: str
    declared: int


def _inventory(f: h5py.File, p: Path, st: os.stat_result, limits: H5Limits) -> Inventory:
    datasets = _walk(f, p, limits)
    n_obs, n_vars = _axis_lengths(f)
    if n_obs > limits.max_cells:
        raise DataTooLarge(f"{p}: {n_obs:,} cells (rows of /X or /obs); the limit is {limits.max_cells:,} "
                           f"({_raise_hint('max_cells')})")
    if n_vars > limits.max_features:
        raise DataTooLarge(f"{p}: {n_vars:,} features (columns of /X or rows of /var); the limit is "
                           f"{limits.max_features:,} ({_raise_hint('max_features')})")
    declared = sum(d.declared for d in datasets)
    largest = tuple((d.path, d.declared) for d in sorted(datasets, key=lambda d: -d.declared)[:3])
    biggest = ", ".join(f"{path} {size_text(n)}" for path, n in largest)
    if declared > limits.max_declared_bytes:
        raise DataTooLarge(f"{p}: its datasets declare {size_text(declared)} uncompressed (largest: {biggest}); "
                           f"the limit is {size_text(limits.max_declared_bytes)} ({_raise_hint('max_declared_bytes')})")
    allowed = max(limits.expansion_floor_bytes, limits.max_expansion * st.st_size)
    if declared > allowed:
        raise DataTooLarge(
            f"{p}: its datasets declare {size_text(declared)} uncompressed, {declared / max(st.st_size, 1):,.0f}x "
            f"the file's {size_text(st.st_size)} (largest: {biggest}); the limit is {limits.max_expansion:g}x "
            f"({_raise_hint('max_expansion')}), or {size_text(limits.expansion_floor_bytes)} whatever the ratio "
            f"({ENV_PREFIX}EXPANSION_FLOOR_BYTES)")
    backed = sum(d.declared for d in datasets if any(d.path == b or d.path.startswith(b + "/") for b in _BACKED_PATHS))
    return Inventory(file_bytes=st.st_size, device_inode=(st.st_dev, st.st_ino), n_obs=n_obs, n_vars=n_vars,
                     declared_bytes=declared, backed_bytes=backed, largest=largest)


def _walk(f: h5py.File, p: Path, limits: H5Limits) -> list[_Dataset]:
    """Every dataset and attribute reached through hard links from the root, refusing any other kind
    of link and any object reached twice (a hard-link cycle sends anndata's reader round forever)."""
    found: list[_Dataset] = _attributes(f.id, p, "/")
    seen: dict[int, str] = {}
    stack: list[tuple[h5py.h5g.GroupID, str, int]] = [(f.id, "", 0)]
    count = len(found)
    while stack:
        gid, where, depth = stack.pop()
        for raw in gid:
            here = f"{where}/{raw.decode('utf-8', 'replace')}"
            info = gid.links.get_info(raw)
            if info.type != h5py.h5l.TYPE_HARD:
                kind = _LINK_KINDS.get(info.type, f"a user-defined link (type {info.type})")
                raise UnsafeDataFile(f"{p}: {here} is {kind}; links that point elsewhere are refused "
                                     "(anndata writes plain groups and datasets only)")
            if info.u in seen:
                raise UnsafeDataFile(f"{p}: {here} is the same object as {seen[info.u]} (a hard-link alias or "
                                     "cycle); anndata writes each group and dataset once")
            seen[info.u] = here
            obj = h5py.h5o.open(gid, raw)
            attributes = _attributes(obj, p, here)
            found += attributes
            count += 1 + len(attributes)
            if count > limits.max_objects:
                raise DataTooLarge(f"{p}: more than {limits.max_objects:,} groups, datasets and attributes; "
                                   f"the limit is {limits.max_objects:,} ({_raise_hint('max_objects')})")
            if isinstance(obj, h5py.h5g.GroupID):
                if depth + 1 > limits.max_depth:
                    raise DataTooLarge(f"{p}: {here} is nested {depth + 1} groups deep; the limit is "
                                       f"{limits.max_depth} ({_raise_hint('max_depth')})")
                stack.append((obj, here, depth + 1))
            elif isinstance(obj, h5py.h5d.DatasetID):
                found.append(_Dataset(here, _check_dataset(obj, p, here, limits)))
    return found


def _attributes(oid: h5py.h5o.ObjectID, p: Path, here: str) -> list[_Dataset]:
    """The object's attributes (read whole by anndata), refusing references: one can name an object
    no link reaches (and so never walked), and anndata follows those of pre-0.7 categoricals."""
    out = []
    for i in range(h5py.h5o.get_info(oid).num_attrs):
        aid = h5py.h5a.open(oid, index=i)
        name = aid.get_name().decode("utf-8", "replace")
        tid = aid.get_type()
        if tid.get_class() == h5py.h5t.REFERENCE or tid.detect_class(h5py.h5t.REFERENCE):
            raise UnsafeDataFile(f"{p}: attribute {name!r} of {here} holds HDF5 references; refused (files "
                                 "written before anndata 0.7 use them: write it again with a current anndata)")
        out.append(_Dataset(f"{here} attribute {name!r}", _declared(aid.get_space(), tid)))
    return out


def _declared(space: h5py.h5s.SpaceID, tid: h5py.h5t.TypeID) -> int:
    """Bytes of the data as declared (shape x item size); 0 for an empty (null) dataspace."""
    if space.get_simple_extent_type() == h5py.h5s.NULL:
        return 0
    return math.prod(space.shape) * tid.get_size()


def _check_dataset(dsid: h5py.h5d.DatasetID, p: Path, here: str, limits: H5Limits) -> int:
    """The dataset's declared bytes, after refusing storage outside the file and unwritten data."""
    dcpl = dsid.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise UnsafeDataFile(f"{p}: {here} is a virtual dataset (VDS) mapping {dcpl.get_virtual_count()} "
                             "source(s) in other datasets or files; refused")
    if dcpl.get_external_count():
        raise UnsafeDataFile(f"{p}: {here} keeps its data in {dcpl.get_external_count()} file(s) outside the "
                             ".h5ad (HDF5 external storage); refused")
    for i in range(dcpl.get_nfilters()):
        code = dcpl.get_filter(i)[0]
        if code not in limits.allowed_filters:
            raise UnsafeDataFile(f"{p}: {here} is compressed with HDF5 filter {code}, which is not built in; "
                                 f"allowed: {', '.join(map(str, limits.allowed_filters))} "
                                 f"({_raise_hint('allowed_filters')})")
    tid = dsid.get_type()
    if tid.get_class() == h5py.h5t.REFERENCE or tid.detect_class(h5py.h5t.REFERENCE):
        raise UnsafeDataFile(f"{p}: {here} holds HDF5 references (which can name objects no link reaches, "
                             "or other files); refused")
    declared = _declared(dsid.get_space(), tid)
    if declared == 0:
        return 0
    shape = dsid.shape
    shape_text = " x ".join(f"{n:,}" for n in shape) or "scalar"
    if layout == h5py.h5d.CHUNKED:
        chunk = dcpl.get_chunk()
        expected = math.prod(-(-n // c) for n, c in zip(shape, chunk, strict=True))
        stored = dsid.get_num_chunks()
        if stored < expected:
            raise UnsafeDataFile(
                f"{p}: {here} declares {shape_text} ({size_text(declared)}) in {expected:,} chunks but only "
                f"{stored:,} were ever written; the rest would be read as fill values (a file written by "
                "anndata stores every chunk); refused")
    elif dsid.get_storage_size() < declared:
        raise UnsafeDataFile(f"{p}: {here} declares {shape_text} ({size_text(declared)}) but stores "
                             f"{size_text(dsid.get_storage_size())}: it was never written; refused")
    return declared


def _axis_lengths(f: h5py.File) -> tuple[int, int]:
    """(cells, features) from metadata: X's shape (dense, or a sparse group's `shape` attribute) and
    the lengths of the obs and var indexes, whichever is larger."""
    rows, cols = 0, 0
    x = f.get("X")
    if isinstance(x, h5py.Dataset) and len(x.shape) == 2:
        rows, cols = x.shape
    elif isinstance(x, h5py.Group):
        shape = x.attrs.get("shape", x.attrs.get("h5sparse_shape"))
        with contextlib.suppress(TypeError, ValueError):  # a malformed attribute: anndata will say so
            rows, cols = (max(0, int(n)) for n in shape)
    return max(rows, _index_length(f, "obs")), max(cols, _index_length(f, "var"))


def _index_length(f: h5py.File, key: str) -> int:
    node = f.get(key)
    if isinstance(node, h5py.Dataset):  # before anndata 0.7: a compound table
        return node.shape[0] if node.shape else 0
    if isinstance(node, h5py.Group):
        name = node.attrs.get("_index", "_index")
        index = node.get(name.decode() if isinstance(name, bytes) else str(name))
        if isinstance(index, h5py.Dataset) and index.shape:
            return index.shape[0]
    return 0
