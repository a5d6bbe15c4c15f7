"""Hostile `.h5ad` files: each attack is first shown to work on a plain `anndata.read_h5ad`, then the
checked opener (and every data-layer path that opens a user's file) refuses it, naming the HDF5 path
at fault and echoing none of what the file points at."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import psutil
import pytest

import hostile_h5ad as H
from service.data import (
    DataError,
    DataTooLarge,
    H5Limits,
    NoControlCells,
    UnsafeDataFile,
    check_isolated,
    load_dataset,
    load_split,
    make_split,
    profile_dataset,
    read_h5ad,
    run_baselines,
)
from service.data.evaluate import PredictionsError, evaluate  # the function, not the lazily bound module

CLI = [str(Path(sys.executable).parent / "cellforge")]


def finishes(fn: Callable[[], object], seconds: float = 10.0) -> BaseException | None:
    """Run fn in a thread; the exception it raised (None if it returned). Fails if it is still running
    after `seconds`: a blocked read is what these tests guard against, and must not hang the suite."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s: the read blocked"
    return outcome[0]


def refused(fn: Callable[[], object], kind: type[Exception], *fragments: str) -> str:
    exc = finishes(fn)
    assert isinstance(exc, kind), f"expected {kind.__name__}, got {exc!r}"
    message = str(exc)
    for fragment in fragments:
        assert fragment in message, message
    assert H.SECRET[:9] not in message
    return message


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    return H.secret_file(tmp_path)


# -- reaching outside the file -----------------------------------------------------------------------


def test_external_storage_pointing_at_a_host_file_is_refused(tmp_path, secret):
    evil = H.external_storage(tmp_path / "evil.h5ad", secret)
    assert H.SECRET[:16] in "".join(ad.read_h5ad(evil).obs["perturbation"])  # the attack, unchecked
    refused(lambda: read_h5ad(evil), UnsafeDataFile, "/obs/perturbation", "external storage")


@pytest.mark.parametrize("entry", ["load_dataset", "profile_dataset", "make_split"])
def test_every_entry_point_refuses_before_reading(tmp_path, secret, entry):
    evil = H.external_storage(tmp_path / "evil.h5ad", secret)
    calls = {
        "load_dataset": lambda: load_dataset(evil),
        "profile_dataset": lambda: profile_dataset(evil),
        "make_split": lambda: make_split(evil, "unseen-perturbation", 0, tmp_path / "split"),
    }
    message = refused(calls[entry], UnsafeDataFile, "/obs/perturbation")
    # The attack's own error, seen before the fix, echoed the secret as "labels seen".
    assert "labels seen" not in message


def test_external_link_to_another_file_is_refused(tmp_path):
    evil = H.external_link(tmp_path / "evil.h5ad", H.secret_hdf5(tmp_path))
    assert ad.read_h5ad(evil).obs["perturbation"].iloc[0] == H.SECRET
    refused(lambda: read_h5ad(evil), UnsafeDataFile, "/obs/perturbation", "an external link")


def test_virtual_dataset_is_refused(tmp_path):
    evil = H.virtual_dataset(tmp_path / "evil.h5ad", H.secret_hdf5(tmp_path))
    assert ad.read_h5ad(evil).obs["perturbation"].iloc[0] == H.SECRET
    refused(lambda: read_h5ad(evil), UnsafeDataFile, "/obs/perturbation", "virtual dataset")


def test_soft_link_loop_and_hard_link_cycle_are_refused(tmp_path):
    loop = H.soft_link_loop(tmp_path / "loop.h5ad")
    cycle = H.hard_link_cycle(tmp_path / "cycle.h5ad")
    for evil in (loop, cycle):
        with pytest.raises(RecursionError):
            ad.read_h5ad(evil)
    refused(lambda: read_h5ad(loop), UnsafeDataFile, "/uns/loop is a soft link")
    refused(lambda: read_h5ad(cycle), UnsafeDataFile, "/uns/a/again is the same object as /uns/a")


def test_references_are_refused(tmp_path):
    # An object reference can name an object no link reaches (never walked); anndata dereferences
    # the `categories` attribute of pre-0.7 categoricals.
    evil = H.plain(tmp_path / "evil.h5ad")
    with h5py.File(evil, "a") as f:
        f["obs/perturbation"].attrs["categories"] = f["var"].ref
    refused(lambda: read_h5ad(evil), UnsafeDataFile, "attribute 'categories' of /obs/perturbation",
            "HDF5 references")


def test_a_multi_driver_file_is_not_opened(tmp_path):
    with h5py.File(tmp_path / "split.h5ad", "w", driver="split") as f:  # -m.h5 metadata, -r.h5 raw data
        f["obs/_index"] = np.array([b"c0"])
    refused(lambda: read_h5ad(tmp_path / "split.h5ad-m.h5"), DataError, "multi driver should be used")


def test_a_filter_that_is_not_built_in_is_refused(tmp_path):
    evil = H.plain(tmp_path / "evil.h5ad")
    with h5py.File(evil, "a") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((4,))
        dcpl.set_filter(32015, h5py.h5z.FLAG_OPTIONAL, (3,))  # zstd: HDF5 would look for a plugin
        dsid = h5py.h5d.create(f["uns"].id if "uns" in f else f.create_group("uns").id, b"z",
                               h5py.h5t.py_create(np.dtype("f4")), h5py.h5s.create_simple((8,)), dcpl=dcpl)
        h5py.Dataset(dsid)[:] = np.arange(8)
    refused(lambda: read_h5ad(evil), UnsafeDataFile, "/uns/z", "filter 32015")


# -- blocking reads ----------------------------------------------------------------------------------


def test_external_storage_in_a_fifo_blocks_unchecked_and_is_refused_at_once(tmp_path):
    pipe = H.fifo(tmp_path)
    evil = H.external_storage(tmp_path / "evil.h5ad", pipe)
    def unchecked() -> None:
        with contextlib.suppress(OSError):  # once released, HDF5 finds the FIFO too short
            ad.read_h5ad(evil)

    blocked = threading.Thread(target=unchecked, daemon=True)
    blocked.start()
    blocked.join(0.5)
    try:
        assert blocked.is_alive()  # the attack: the unchecked reader waits on the FIFO forever
    finally:
        while blocked.is_alive():
            H.release_fifo(pipe)
            blocked.join(0.1)
    refused(lambda: read_h5ad(evil), UnsafeDataFile, "/obs/perturbation", "external storage")


@pytest.mark.parametrize("target", ["fifo", "symlink to fifo", "device"])
def test_a_file_that_is_not_regular_is_refused_without_opening_it(tmp_path, target):
    pipe = H.fifo(tmp_path)
    path = {"fifo": pipe, "symlink to fifo": tmp_path / "evil.h5ad", "device": tmp_path / "zero.h5ad"}[target]
    if target == "symlink to fifo":
        path.symlink_to(pipe)
    elif target == "device":
        path.symlink_to("/dev/zero")
    try:
        refused(lambda: read_h5ad(path), UnsafeDataFile, "not a regular file",
                "a device" if target == "device" else "a FIFO")
    finally:
        H.release_fifo(pipe)


# -- declared sizes ----------------------------------------------------------------------------------


def test_unwritten_chunked_x_is_refused_without_allocating_it(tmp_path):
    evil = H.unwritten_x(tmp_path / "bomb.h5ad")
    assert evil.stat().st_size < 3 << 20
    with h5py.File(evil) as f:  # the attack: 2 GB declared, nothing stored
        assert f["X"].size * 4 == 2_000_000_000 and f["X"].id.get_num_chunks() == 0
    rss = psutil.Process().memory_info().rss
    refused(lambda: read_h5ad(evil), UnsafeDataFile, "/X", "100,000 x 5,000", "0 were ever written")
    assert psutil.Process().memory_info().rss - rss < 100 << 20


def test_decompression_bomb_is_too_large_and_names_the_limit(tmp_path):
    evil = H.compressed_bomb(tmp_path / "bomb.h5ad")
    refused(lambda: read_h5ad(evil), DataTooLarge, "/X 1.9 GiB", "the limit is 100x",
            "CELLFORGE_DATA_MAX_EXPANSION")


def test_declared_beyond_memory_opens_backed_or_is_refused_in_memory(tmp_path):
    path = H.compressed_bomb(tmp_path / "big.h5ad")
    limits = H5Limits(max_expansion=10_000, max_memory_bytes=64 << 20)
    rss = psutil.Process().memory_info().rss
    adata = read_h5ad(path, limits=limits)  # more than max_memory_bytes declared: X stays on disk
    try:
        assert adata.isbacked and adata.shape == (100_000, 5_000)
    finally:
        adata.file.close()
    assert psutil.Process().memory_info().rss - rss < 100 << 20
    refused(lambda: read_h5ad(path, backed=False, limits=limits), DataTooLarge, "into memory",
            "CELLFORGE_DATA_MAX_MEMORY_BYTES")


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("max_cells", 10, "24 cells"),
    ("max_features", 5, "6 features"),
    ("max_objects", 5, "more than 5 groups, datasets and attributes"),
    ("max_depth", 1, "nested 2 groups deep"),
    ("max_declared_bytes", 100, "the limit is 100 B"),
])
def test_each_limit_is_enforced_and_named(tmp_path, field, value, fragment):
    path = H.plain(tmp_path / "plain.h5ad")
    assert read_h5ad(path).n_obs == H.N_CELLS
    refused(lambda: read_h5ad(path, limits=H5Limits(**{field: value})), DataTooLarge, fragment,
            f"CELLFORGE_DATA_{field.upper()}")


def test_limits_come_from_the_environment(tmp_path, monkeypatch):
    path = H.plain(tmp_path / "plain.h5ad")
    monkeypatch.setenv("CELLFORGE_DATA_MAX_CELLS", "10")
    refused(lambda: read_h5ad(path), DataTooLarge, "24 cells (rows of /X or /obs); the limit is 10")
    monkeypatch.setenv("CELLFORGE_DATA_MAX_CELLS", "ten")
    with pytest.raises(DataError, match="CELLFORGE_DATA_MAX_CELLS: .*integer.*'ten'"):
        read_h5ad(path)
    limits = H5Limits.from_env({"CELLFORGE_DATA_MAX_MEMORY_BYTES": "1GiB", "CELLFORGE_DATA_ALLOWED_FILTERS": "1, 2"})
    assert (limits.max_memory_bytes, limits.allowed_filters) == (1 << 30, (1, 2))


# -- what an error may echo, and what normal files still give ------------------------------------------


def test_labels_a_file_really_holds_are_echoed_short(tmp_path):
    path = H.plain(tmp_path / "long.h5ad")
    adata = ad.read_h5ad(path)
    adata.obs["perturbation"] = ["G1" * 5_000] * H.N_CELLS
    adata.write_h5ad(path)
    with pytest.raises(NoControlCells) as info:
        load_dataset(path)
    assert "labels seen: 'G1G1" in str(info.value) and len(str(info.value)) < 600


def test_normal_file_reads_as_anndata_reads_it(make_adata, h5ad_path):
    path = h5ad_path(make_adata(doses=[1.0, 10.0], perturbation_key="drug", control_label="DMSO",
                                perturbations=("dA", "dB")))
    checked, plain = read_h5ad(path), ad.read_h5ad(path)
    assert not checked.isbacked
    assert (checked.X != plain.X).nnz == 0
    assert checked.obs.equals(plain.obs) and checked.var.equals(plain.var)
    assert checked.uns.keys() == plain.uns.keys()


# -- split directories and predictions ------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_split(make_adata, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_split")
    make_adata().write_h5ad(root / "data.h5ad")
    make_split(root / "data.h5ad", "unseen-perturbation", 0, root / "split")
    return root / "split"


@pytest.fixture
def split_dir(clean_split, tmp_path) -> Path:
    """A private copy of the module's split: a test may plant a hostile part in it."""
    return Path(shutil.copytree(clean_split, tmp_path / "split"))


def test_a_hostile_split_part_is_refused(split_dir, tmp_path, secret):
    H.external_storage(split_dir / "train.h5ad", secret)
    refused(lambda: load_split(split_dir).train, UnsafeDataFile, "train.h5ad", "/obs/perturbation")
    refused(lambda: run_baselines(split_dir), UnsafeDataFile, "train.h5ad")


def test_hostile_predictions_are_refused(split_dir, tmp_path, secret):
    evil = H.external_storage(tmp_path / "predictions.h5ad", secret)
    refused(lambda: evaluate(split_dir, evil, "test"), PredictionsError, "external storage")


# -- checks in a child process ------------------------------------------------------------------------


def test_an_isolated_check_gives_the_layout_of_a_normal_file(make_adata, h5ad_path):
    path = h5ad_path(make_adata(contexts=["A", "B"]))
    result = check_isolated(path, limits=H5Limits(), timeout_s=60, memory_bytes=2 << 30)
    assert result.outcome == "ok"
    expected = load_dataset(path, backed=True).layout.model_dump(mode="json", exclude={"source"})
    assert result.layout == expected


def test_an_isolated_check_is_killed_at_its_deadline_or_memory_cap(tmp_path):
    bomb = H.compressed_bomb(tmp_path / "bomb.h5ad", n_cells=20_000)  # 400 MB of zeros, checked for real
    loose = H5Limits(max_expansion=100_000)
    assert check_isolated(bomb, limits=loose, timeout_s=0.2, memory_bytes=2 << 30).outcome == "timeout"
    assert check_isolated(bomb, limits=loose, timeout_s=60, memory_bytes=32 << 20).outcome == "memory"
    assert check_isolated(bomb, limits=H5Limits(), timeout_s=60, memory_bytes=2 << 30).outcome == "too_large"


# -- the CLI --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["external storage", "fifo external storage"])
def test_cli_profile_refuses_with_a_clear_error(tmp_path, secret, attack):
    evil = tmp_path / "evil.h5ad"
    pipe = H.fifo(tmp_path)
    H.external_storage(evil, secret if attack == "external storage" else pipe)
    try:
        proc = subprocess.run([*CLI, "data", "profile", str(evil), "--json"], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "COLUMNS": "200"})
    finally:
        H.release_fifo(pipe)
    assert proc.returncode == 1, proc.stderr
    assert H.SECRET[:9] not in proc.stdout + proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["ok"] is False and answer["error"] == "UnsafeDataFile"
    assert "/obs/perturbation" in answer["message"] and "external storage" in answer["message"]
    assert "UnsafeDataFile" in proc.stderr
