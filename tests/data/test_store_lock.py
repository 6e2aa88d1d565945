"""One writer per store: a second writer (StoreWriter or `usae extract`) is refused with the holder named."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from usae.__main__ import main
from usae._io import sibling_lock
from usae.data.store import StoreWriter, open_store, write_store
from usae.errors import UsaeError

HOLD = """
import sys, time
from usae.data.store import StoreWriter
w = StoreWriter(sys.argv[1], {"a": 4})
print("ready", flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def holder(tmp_path_factory):
    """A process with a StoreWriter open on ``holder.store`` (until its stdin closes). One for the
    module: a refused writer changes nothing, so the tests share it (a Python start costs seconds)."""
    store = tmp_path_factory.mktemp("held") / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.store = store
    yield proc
    proc.stdin.close()
    proc.wait()


def test_second_store_writer_is_refused_naming_the_holder(holder):
    with pytest.raises(UsaeError, match=rf"store .*store is being written by pid {holder.pid} on "):
        StoreWriter(holder.store, {"a": 4})
    assert holder.store.with_name("store.partial").is_dir()  # the holder's partial store is untouched


def test_extract_into_a_store_being_written_is_one_line(tmp_path, holder, capsys):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "imgs/a.png")
    argv = [
        "extract",
        "--images",
        tmp_path / "imgs",
        "--models",
        "fake:w8s4",
        "--device",
        "cpu",
        "--out",
        holder.store,
    ]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {holder.pid}" in err[0]
    assert not holder.store.with_name("store.parts").exists()


def test_a_killed_writer_does_not_block_and_the_lock_goes_away(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "store")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    assert sibling_lock(tmp_path / "store").exists()  # left behind by the kill, but no longer held
    path = write_store(tmp_path / "store", {"a": np.ones((5, 4))})
    assert open_store(path).n_rows == 5
    assert not sibling_lock(tmp_path / "store").exists()
