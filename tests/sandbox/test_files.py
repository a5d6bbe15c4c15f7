"""Files in and out of a real sandbox's workspace: round trips, folders, quota, traversal."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from sandbox import FileTransferError, Outcome, WorkspacePathError, WorkspaceQuotaError

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]


async def test_binary_files_round_trip_across_chunks(shared_sandbox, backend):
    payload = os.urandom(9 << 20)  # more than two transfer chunks
    await shared_sandbox.files.put("data/blob.bin", payload)
    await shared_sandbox.files.put("empty.txt", b"")
    assert await shared_sandbox.files.get("data/blob.bin") == payload
    assert await shared_sandbox.files.get("empty.txt") == b""
    # The kernel sees the same bytes, as the sandbox user.
    res = await shared_sandbox.execute(
        "import hashlib, os; st = os.stat('data/blob.bin')\n"
        "print(st.st_uid, st.st_size, hashlib.sha256(open('data/blob.bin', 'rb').read()).hexdigest())"
    )
    sandbox_uid = (await backend.engine_ids()).sandbox_uid
    assert res.stdout.split() == [str(sandbox_uid), str(len(payload)), hashlib.sha256(payload).hexdigest()]
    await shared_sandbox.commands.run(["rm", "data/blob.bin"])


async def test_folders_round_trip(shared_sandbox, tmp_path):
    source = tmp_path / "bundle"
    (source / "pkg").mkdir(parents=True)
    (source / "train.py").write_text("print('training')\n")
    (source / "pkg" / "model.py").write_text("WEIGHTS = 3\n")
    (source / "outside").symlink_to("/etc/passwd")  # host symlinks are not followed
    written = await shared_sandbox.files.put_dir(source, "code")
    assert sorted(written) == ["code/pkg/model.py", "code/train.py"]
    run = await shared_sandbox.commands.run(["python", "train.py"], cwd="/workspace/code")
    assert run.outcome is Outcome.OK and run.stdout == "training\n"

    await shared_sandbox.execute(
        "import os; os.makedirs('out/sub', exist_ok=True); open('out/sub/p.txt', 'w').write('pred')\n"
        "os.symlink('/etc/hostname', 'out/link')"
    )
    copied = await shared_sandbox.files.get_dir("out", tmp_path / "back")
    assert [os.path.relpath(p, tmp_path / "back") for p in copied] == ["sub/p.txt"]
    assert (tmp_path / "back" / "sub" / "p.txt").read_text() == "pred"
    assert not (tmp_path / "back" / "link").exists()


async def test_writing_past_the_quota_is_a_clear_error_and_leaves_nothing(shared_sandbox):
    quota = shared_sandbox.spec.workspace_bytes
    with pytest.raises(WorkspaceQuotaError, match="quota of 64m"):
        await shared_sandbox.files.put("too_big.bin", b"\0" * (quota + (1 << 20)))
    listing = await shared_sandbox.execute("import os; 'too_big.bin' in os.listdir('.')")
    assert listing.result == "False"
    # Code inside the sandbox meets the same wall.
    res = await shared_sandbox.execute(f"open('fill.bin','wb').write(b'x' * {quota + (1 << 20)})")
    assert res.outcome is Outcome.ERROR and res.ename == "OSError" and "No space left" in res.evalue
    await shared_sandbox.commands.run(["rm", "-f", "fill.bin"])


@pytest.mark.parametrize("bad", ["../escape.txt", "/etc/passwd", "a/../../b", "", "~/x", "nul\0byte"])
async def test_paths_that_could_escape_are_refused(shared_sandbox, bad):
    with pytest.raises(WorkspacePathError):
        await shared_sandbox.files.put(bad, b"x")
    with pytest.raises(WorkspacePathError):
        await shared_sandbox.files.get(bad)


async def test_symlinks_out_of_the_workspace_are_refused(shared_sandbox):
    await shared_sandbox.execute(
        "import os\nfor name, target in [('etc_dir', '/etc'), ('pw', '/etc/passwd'), ('tmp_dir', '/tmp')]:\n"
        "    os.path.lexists(name) or os.symlink(target, name)"
    )
    for path in ["etc_dir/passwd", "pw", "tmp_dir/x"]:
        with pytest.raises(WorkspacePathError, match="outside the workspace"):
            await shared_sandbox.files.get(path)
        with pytest.raises(WorkspacePathError, match="outside the workspace"):
            await shared_sandbox.files.put(path, b"x")
    with pytest.raises(WorkspacePathError):
        await shared_sandbox.files.get_dir("etc_dir", "/tmp/never-written")


async def test_missing_files_and_folders_are_clear_errors(shared_sandbox, tmp_path):
    with pytest.raises(FileTransferError, match="no-such.txt"):
        await shared_sandbox.files.get("no-such.txt")
    await shared_sandbox.files.put("plain.txt", b"x")
    with pytest.raises(FileTransferError, match="not a folder"):
        await shared_sandbox.files.get_dir("plain.txt", tmp_path)
    with pytest.raises(FileTransferError, match="not a folder"):
        await shared_sandbox.files.put_dir(tmp_path / "absent", "code")
    await shared_sandbox.files.put("big.txt", b"y" * 5000)
    with pytest.raises(FileTransferError, match="more than the 100 allowed"):
        await shared_sandbox.files.get("big.txt", max_bytes=100)


async def test_a_transfer_that_cannot_get_the_kernel_in_time_is_a_clear_error(shared_sandbox):
    busy = asyncio.create_task(shared_sandbox.execute("import time; time.sleep(3)"))
    await asyncio.sleep(0.2)
    with pytest.raises(FileTransferError, match="did not finish within 0.5s"):
        await shared_sandbox.files.put("late.txt", b"x", timeout=0.5)
    assert (await busy).outcome is Outcome.OK
    await shared_sandbox.files.put("late.txt", b"x")


async def test_files_are_listed_and_removed(shared_sandbox):
    await shared_sandbox.files.put("listing/a.txt", b"a")
    await shared_sandbox.files.put("listing/sub/b.txt", b"b")
    await shared_sandbox.execute("import os; os.symlink('/etc/passwd', 'listing/link')")
    assert await shared_sandbox.files.list("listing") == ["a.txt", "sub/b.txt"]  # the symlink is left out
    await shared_sandbox.files.remove("listing/sub/b.txt")
    assert await shared_sandbox.files.list("listing") == ["a.txt"]
    assert "listing/a.txt" in await shared_sandbox.files.list()
    with pytest.raises(FileTransferError, match="listing/sub/b.txt"):
        await shared_sandbox.files.remove("listing/sub/b.txt")
    with pytest.raises(FileTransferError, match="not a folder"):
        await shared_sandbox.files.list("listing/a.txt")
    with pytest.raises(WorkspacePathError):
        await shared_sandbox.files.remove("../etc/passwd")
