"""Dataset uploads: validated by service.data's loader, clear 4xx on bad files, 413 over the size cap,
mounted read-only into the owner's sandboxes and invisible to other tenants."""

from __future__ import annotations

import anndata as ad
import httpx
import numpy as np
import pandas as pd
import pytest

from service.client import InvalidRequestError, NotFoundError
from service.data import simulate

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "screen.h5ad"
    simulate("knockout", 0, n_cells=1500, n_genes=50).write_h5ad(path)
    return path


def test_upload_a_valid_dataset_and_mount_it_in_a_sandbox(server, alice, screen, transport):
    with server.client(alice, transport) as c:
        ds = c.upload_dataset(screen)
        assert ds.id.startswith("ds_") and ds.name == "screen.h5ad"
        assert ds.layout["perturbation_key"] == "perturbation"
        assert ds.id in {d.id for d in c.list_datasets()}
        sb = c.create_sandbox(memory="512m", dataset_id=ds.id).id
        try:
            res = c.execute(sb, "import os, anndata\n"
                                "a = anndata.read_h5ad('/data/screen.h5ad')\n"
                                "try:\n    open('/data/x', 'w')\nexcept OSError as e:\n    print(type(e).__name__)\n"
                                "a.n_obs, sorted(os.listdir('/data'))")
        finally:
            c.delete_sandbox(sb)
    assert res.outcome.value == "ok", res
    assert res.result == "(1500, ['screen.h5ad'])"
    assert "OSError" in res.stdout or "PermissionError" in res.stdout


def test_not_hdf5_is_422_naming_the_file(server, alice, tmp_path):
    bad = tmp_path / "broken.h5ad"
    bad.write_bytes(b"this is not an HDF5 file" * 10)
    with server.client(alice) as c:
        with pytest.raises(InvalidRequestError, match="broken.h5ad.*HDF5") as info:
            c.upload_dataset(bad)
    assert info.value.status == 422
    assert str(server.data_dir) not in info.value.message  # no server paths leak


def test_anndata_without_a_perturbation_column_is_422(server, alice, tmp_path):
    path = tmp_path / "plain.h5ad"
    ad.AnnData(X=np.ones((20, 5), dtype=np.float32), obs=pd.DataFrame({"sample": ["a"] * 20},
               index=[f"c{i}" for i in range(20)])).write_h5ad(path)
    with server.client(alice, "grpc") as c:
        with pytest.raises(InvalidRequestError, match="plain.h5ad") as info:
            c.upload_dataset(path)
    assert "perturbation" in info.value.message.lower()


def test_oversized_upload_is_413_and_bad_names_400(server, alice, tmp_path):
    big = tmp_path / "big.h5ad"
    big.write_bytes(b"\0" * (5 << 20))  # the server under test caps uploads at 4m
    r = httpx.post(f"{server.url}/v1/datasets", params={"name": "big.h5ad"}, content=big.read_bytes(),
                   headers={"Authorization": f"Bearer {alice.key}"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    with server.client(alice, "grpc") as c:
        with pytest.raises(InvalidRequestError) as info:
            c.upload_dataset(big)
        assert info.value.status == 413
    r = httpx.post(f"{server.url}/v1/datasets", params={"name": "../../etc/x.h5ad"}, content=b"x",
                   headers={"Authorization": f"Bearer {alice.key}"})
    assert r.status_code == 400
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_another_tenants_dataset_cannot_be_mounted(server, alice, bob, screen):
    with server.client(alice) as c:
        ds = c.upload_dataset(screen, name="private.h5ad")
    with server.client(bob) as c:
        assert ds.id not in {d.id for d in c.list_datasets()}
        with pytest.raises(NotFoundError, match="no dataset"):
            c.create_sandbox(dataset_id=ds.id)
        with pytest.raises(NotFoundError, match="no dataset"):
            c.create_sandbox(dataset_id="ds_0000000000000000")
