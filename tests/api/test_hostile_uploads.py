"""Hostile `.h5ad` uploads through the real server: refused with 422/413 before anything they point at
is read, echoing none of it; checked in killable, memory-capped child processes, a bounded number at
once, so one tenant's file can neither read the host, stall the API nor swell the server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

import hostile_h5ad as H
from service.client import InvalidRequestError
from service.data import simulate

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def upload(server, tenant, path: Path, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/datasets", params={"name": path.name}, content=path.read_bytes(),
                      headers={"Authorization": f"Bearer {tenant.key}"}, timeout=timeout)


def in_background(fn: Callable[[], httpx.Response]) -> Callable[[], httpx.Response]:
    """Start fn in a thread; the returned callable waits for its answer."""
    answer: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answer.append(fn()), daemon=True)
    thread.start()

    def result() -> httpx.Response:
        thread.join(60)
        assert answer, "no answer within 60s"
        return answer[0]

    return result


def rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def no_secret(server, response: httpx.Response) -> None:
    assert H.SECRET[:9] not in response.text
    assert str(server.data_dir) not in response.text


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "screen.h5ad"
    simulate("knockout", 0, n_cells=1500, n_genes=50).write_h5ad(path)
    return path


def test_external_storage_pointing_at_a_host_file_is_422_without_its_bytes(server, alice, tmp_path, transport):
    evil = H.external_storage(tmp_path / "evil.h5ad", H.secret_file(tmp_path))
    with server.client(alice, transport) as c:
        with pytest.raises(InvalidRequestError) as info:
            c.upload_dataset(evil)
    assert info.value.status == (422 if transport == "http" else 400)  # gRPC: INVALID_ARGUMENT
    assert "evil.h5ad: /obs/perturbation" in info.value.message and "external storage" in info.value.message
    assert H.SECRET[:9] not in info.value.message and "labels seen" not in info.value.message


@pytest.mark.parametrize(("attack", "fragment"), [
    ("external link", "an external link"), ("virtual dataset", "virtual dataset (VDS)"),
    ("soft link loop", "/uns/loop is a soft link"), ("hard link cycle", "same object as /uns/a"),
])
def test_links_and_virtual_datasets_are_422(server, alice, tmp_path, attack, fragment):
    evil = tmp_path / "evil.h5ad"
    {"external link": lambda: H.external_link(evil, H.secret_hdf5(tmp_path)),
     "virtual dataset": lambda: H.virtual_dataset(evil, H.secret_hdf5(tmp_path)),
     "soft link loop": lambda: H.soft_link_loop(evil),
     "hard link cycle": lambda: H.hard_link_cycle(evil)}[attack]()
    r = upload(server, alice, evil)
    assert r.status_code == 422 and fragment in r.json()["error"]["message"], r.text
    no_secret(server, r)


def test_memory_bombs_are_refused_and_the_server_does_not_grow(server, alice, tmp_path):
    unwritten = H.unwritten_x(tmp_path / "unwritten.h5ad")
    compressed = H.compressed_bomb(tmp_path / "compressed.h5ad", n_cells=50_000)
    before = rss(server)
    r = upload(server, alice, unwritten)
    assert r.status_code == 422, r.text
    assert "/X declares 100,000 x 5,000" in r.json()["error"]["message"]
    r = upload(server, alice, compressed)
    assert r.status_code == 413, r.text
    assert "CELLFORGE_DATA_MAX_EXPANSION" in r.json()["error"]["message"]
    assert rss(server) - before < 100 << 20


def test_fifo_external_storage_does_not_hold_the_server(server, alice, bob, tmp_path, screen):
    pipe = H.fifo(tmp_path)
    evil = H.external_storage(tmp_path / "evil.h5ad", pipe)
    try:
        hostile = in_background(lambda: upload(server, alice, evil))
        started = time.monotonic()
        listed = httpx.get(f"{server.url}/v1/datasets", headers={"Authorization": f"Bearer {bob.key}"}, timeout=10)
        assert listed.status_code == 200 and time.monotonic() - started < 5
        assert upload(server, bob, screen).status_code == 201
        r = hostile()
    finally:
        H.release_fifo(pipe)
    assert r.status_code == 422 and "external storage" in r.json()["error"]["message"], r.text
    assert time.monotonic() - started < 30


def test_a_check_that_runs_too_long_is_killed_and_busy_checkers_answer_at_once(make_server, tmp_path, monkeypatch):
    # Limits loosened so that the 2 GB bomb passes the walk and its check really streams X: the
    # deadline, the process kill and the bounds are what stop it here.
    monkeypatch.setenv("CELLFORGE_DATA_MAX_EXPANSION", "100000")
    monkeypatch.setenv("CELLFORGE_UPLOAD_TIMEOUT_S", "2")
    monkeypatch.setenv("CELLFORGE_UPLOAD_WORKERS", "2")
    monkeypatch.setenv("CELLFORGE_UPLOAD_PER_TENANT", "1")
    (tmp_path / "srv").mkdir()
    server = make_server(tmp_path / "srv", "--max-upload", "16m").start()
    try:
        alice, carol, bob = (server.tenant(n, rate_limit=200) for n in ("alice", "carol", "bob"))
        bomb = H.compressed_bomb(tmp_path / "bomb.h5ad")
        before = rss(server)
        slow = [in_background(lambda t=t: upload(server, t, bomb)) for t in (alice, carol)]
        checks = _wait_for_checks(server, 2)
        again = upload(server, alice, bomb)
        assert again.status_code == 429 and int(again.headers["Retry-After"]) > 0, again.text
        busy = upload(server, bob, bomb)
        assert busy.status_code == 503 and int(busy.headers["Retry-After"]) > 0, busy.text
        started = time.monotonic()
        listed = httpx.get(f"{server.url}/v1/datasets", headers={"Authorization": f"Bearer {bob.key}"}, timeout=10)
        assert listed.status_code == 200 and time.monotonic() - started < 2
        for answer in (r() for r in slow):
            assert answer.status_code == 413 and "longer than 2s" in answer.json()["error"]["message"], answer.text
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in checks)
        assert rss(server) - before < 100 << 20
    finally:
        server.stop()


def _wait_for_checks(server, n: int, timeout: float = 30) -> list[psutil.Process]:
    """The check processes (children of the server's forkserver), once n of them run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checks = [p for fs in psutil.Process(server.proc.pid).children()
                  if "forkserver" in " ".join(fs.cmdline()) for p in fs.children()]
        if len(checks) >= n:
            return checks
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} upload checks started in {timeout}s")
