"""Hardening: damaged files, fuzzed readers, malicious pickles, kill -9 and a full disk.

Every fault must end in one line ``usae: error: <file>: ...`` (or a UsaeError naming the file)
and leave every existing file as it was. Counts are printed (pytest -s) for docs/reliability.md.
"""

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usae.__main__ import main
from usae._io import load_tensors
from usae.config import EncodeConfig, EvalConfig, SAEConfig, TrainConfig, from_json_dict
from usae.data.store import open_store, write_store
from usae.errors import UsaeError
from usae.run import load
from usae.training.checkpoints import latest_checkpoint, load_checkpoint
from usae.training.fit import build_sae, make_optimizer

SRC = Path(__file__).resolve().parents[1] / "src"
TRAIN = ["--n-latents", "16", "--k", "2", "--batch-size", "128", "--no-progress"]


# -- fixtures: one small store and one run with checkpoints, copied per case ----------------------
@pytest.fixture(scope="module")
def store_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(1200, 8)), "b": rng.normal(size=(1200, 12))}
    return write_store(root / "store", x, dtype="float32", rows_per_shard=500)


@pytest.fixture
def world(store_template, tmp_path):
    """A store and a run with checkpoints at steps 3 and 6 (trained here: a run resumes only where it was made)."""
    world = tmp_path / "w"
    shutil.copytree(store_template, world / "store")
    assert (
        main(["train", str(world / "store"), "--out", str(world / "run"), "--steps", "6", "--save-every", "3", *TRAIN])
        == 0
    )
    return world


# -- no unpickling --------------------------------------------------------------------------------
def test_no_code_path_unpickles():
    """Grep-able rule: no pickle.load(s), torch.load only with weights_only=True, np.load never allows pickles."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(
                r"\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b|\bjoblib\.load\(|yaml\.load\(|allow_pickle=True", code
            ):
                offenders.append(f"{path}:{i}: {line.strip()}")
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                offenders.append(f"{path}:{i}: {line.strip()}")
            if re.search(r"\bnp\.load\(", code) and "allow_pickle=False" not in code:
                offenders.append(f"{path}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_as_checkpoint_is_refused(world, cli, tree):
    marker = world / "pwned"
    payload = pickle.dumps({"heads.a.W_enc": _Exploit(marker)})
    ckpt = latest_checkpoint(world / "run")
    for target in (world / "run/model.safetensors", ckpt.path / "model.safetensors"):
        good = target.read_bytes()
        target.write_bytes(payload)
        before = tree(world)
        argv = ["evaluate", world / "run", world / "store", "--no-progress", "--no-report"]
        if target != world / "run/model.safetensors":
            argv = [
                "train",
                world / "store",
                "--out",
                world / "run",
                "--steps",
                "6",
                "--save-every",
                "3",
                "--resume",
                *TRAIN,
            ]
        rc, err = cli(argv)
        assert rc == 2 and len(err) == 1 and f"{target}: not a readable safetensors file" in err[0], err
        assert tree(world) == before and not marker.exists()
        target.write_bytes(good)


# -- damaged files in place of store, run and checkpoint files -------------------------------------
def _mutations(data: bytes, rng: random.Random, other: bytes) -> list[tuple[str, bytes]]:
    flips = []
    for _ in range(3):
        b = bytearray(data)
        pos = rng.randrange(len(b))
        b[pos] ^= 1 << rng.randrange(8)
        flips.append((f"bit flip at byte {pos}", bytes(b)))
    header = bytearray(data)
    header[min(3, len(data) - 1)] ^= 0x01  # inside every format's header/magic
    return [
        ("truncated to half", data[: len(data) // 2]),
        ("truncated by one byte", data.rstrip()[:-1]),  # the last byte that matters (JSON ends in a newline)
        ("empty", b""),
        ("header bit flip", bytes(header)),
        *flips,
        ("foreign: another usae file", other),
        ("foreign: PNG bytes", b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(200))),
    ]


def _targets(world: Path):
    ckpt = latest_checkpoint(world / "run").path
    resume = ["train", world / "store", "--out", world / "run", "--steps", "6", "--save-every", "3", "--resume", *TRAIN]
    evaluate = ["evaluate", world / "run", world / "store", "--no-progress", "--no-report"]
    fresh = ["train", world / "store", "--out", world / "new", "--steps", "2", *TRAIN]
    verify_store = ["verify", world / "store"]
    json_file = world / "run/config.json"
    safetensors_file = world / "run/model.safetensors"
    return [
        # (file, readers, a foreign file of another kind, is_json)
        (world / "store/a/shard-00001.npy", [verify_store, fresh], safetensors_file, False),
        (world / "store/metadata.json", [verify_store, fresh, evaluate], json_file, True),
        (
            world / "run/model.safetensors",
            [evaluate, ["verify", world / "run"]],
            world / "store/a/shard-00000.npy",
            False,
        ),
        (world / "run/config.json", [evaluate, resume], world / "store/metadata.json", True),
        (ckpt / "model.safetensors", [resume], ckpt / "trainer.safetensors", False),
        (ckpt / "optimizer.safetensors", [resume], ckpt / "model.safetensors", False),
        (ckpt / "trainer.safetensors", [resume], ckpt / "optimizer.safetensors", False),
        (ckpt / "state.json", [resume], world / "run/config.json", True),
    ]


def test_damaged_files_give_one_line_errors_and_change_nothing(world, cli, tree):
    rng = random.Random(8)
    counts = {"cases": 0, "errors": 0, "accepted_json_flips": 0, "bytes_corrupted": 0}
    pristine = tree(world)
    for target, readers, other_path, is_json in _targets(world):
        good = target.read_bytes()
        for what, bad in _mutations(good, rng, other_path.read_bytes()):
            target.write_bytes(bad)
            counts["bytes_corrupted"] += sum(a != b for a, b in zip(good, bad, strict=False)) + abs(
                len(good) - len(bad)
            )
            for argv in readers:
                before = tree(world)  # a reader that accepts a flip may write (evaluate: report.json)
                counts["cases"] += 1
                rc, err = cli(argv)
                shutil.rmtree(world / "new", ignore_errors=True)
                where = f"{target.name} ({what}) read by usae {argv[0]}"
                if rc == 0:
                    # Accepted: only a flipped bit that kept the JSON valid, or a flip in shard data that
                    # only `usae verify` (every byte re-hashed) is required to find.
                    shard_data_flip = target.suffix == ".npy" and "bit flip" in what and argv[0] != "verify"
                    assert (is_json and "bit flip" in what) or shard_data_flip, where
                    counts["accepted_json_flips"] += is_json
                    (world / "run/report.json").unlink(missing_ok=True)  # what an accepting evaluate wrote
                    continue
                counts["errors"] += 1
                assert rc == 2 and len(err) == 1 and err[0].startswith("usae: error:"), (where, err)
                assert target.name in err[0] or target.parent.name in err[0], (where, err)
                after = tree(world)
                assert after == before, (where, sorted(k for k in after if after.get(k) != before.get(k)))
            target.write_bytes(good)
    assert tree(world) == pristine
    print(f"damaged-file cases: {counts}")


# -- property tests over config and metadata parsing ------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    cls=st.sampled_from([SAEConfig, TrainConfig, EvalConfig, EncodeConfig]),
    base=st.sampled_from(["valid", "empty"]),
    edits=st.dictionaries(
        st.sampled_from(
            ["widths", "n_latents", "k", "encoder", "store", "steps", "lr", "betas", "models", "stores", "run", "x"]
        ),
        JSON,
        max_size=4,
    ),
)
def test_config_parsing_only_raises_usae_errors(cls, base, edits):
    valid = {
        SAEConfig: {"widths": {"a": 4}, "n_latents": 8, "k": 2},
        TrainConfig: {"store": "s", "n_latents": 8, "k": 2},
        EvalConfig: {"run": "r", "stores": ["s"]},
        EncodeConfig: {"run": "r", "store": "s"},
    }[cls]
    data = {**(valid if base == "valid" else {}), **edits}
    try:
        cfg = from_json_dict(cls, data, "cfg.json")
    except UsaeError as e:
        assert "\n" not in str(e)
        return
    assert dataclasses.is_dataclass(cfg)
    if cls is SAEConfig:  # an accepted architecture builds
        from usae.model.sae import UniversalSAE

        UniversalSAE(cfg)


@pytest.fixture(scope="module")
def meta_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    write_store(root / "s", {"a": np.ones((10, 3)), "b": np.zeros((10, 2))}, tokens_per_image=5, image_ids=["x", "y"])
    return root / "s"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    drop=st.lists(
        st.sampled_from(["models", "n_rows", "dtype", "rows_per_shard", "n_shards", "hash", "stats", "grid"]),
        max_size=2,
    ),
    edits=st.dictionaries(
        st.sampled_from(
            [
                "models",
                "n_rows",
                "dtype",
                "rows_per_shard",
                "n_shards",
                "image_ids",
                "tokens_per_image",
                "grid",
                "stats",
                "hash",
                "extra",
                "schema_version",
            ]
        ),
        JSON,
        max_size=3,
    ),
)
def test_metadata_parsing_only_raises_usae_errors(meta_template, tmp_path, drop, edits):
    meta = json.loads((meta_template / "metadata.json").read_text())
    for key in drop:
        meta.pop(key, None)
    meta.update(edits)
    store = tmp_path / "s"
    if not store.exists():
        shutil.copytree(meta_template, store)
    (store / "metadata.json").write_text(json.dumps(meta))
    try:
        s = open_store(store)
        s.rows(s.model_names[0], 0, s.n_rows)
    except UsaeError as e:
        assert "\n" not in str(e)


# -- fuzzing the store and checkpoint readers --------------------------------------------------------
def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    head = min(len(b), 256)  # half the mutations land in headers, where parsers live
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        op = rng.randrange(6)
        pos = rng.randrange(head) if rng.random() < 0.5 and head else rng.randrange(max(len(b), 1))
        if op == 0 and b:
            b[pos % len(b)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[pos % len(b)] = rng.randrange(256)
        elif op == 2:
            del b[pos : pos + rng.randrange(1, 64)]
        elif op == 3:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
        elif op == 4:
            b = b[: rng.randrange(len(b) + 1)]
        else:  # a digit or structural character swapped: keeps JSON plausible
            if b:
                b[pos % len(b)] = ord(rng.choice('0123456789-.e,:{}[]"'))
    return bytes(b)


N_FUZZ = int(os.environ.get("USAE_FUZZ_CASES", "250"))


def test_fuzzed_store_and_checkpoint_readers_raise_only_usae_errors(world):
    rng = random.Random(2024)
    ckpt = latest_checkpoint(world / "run")
    sae = load(world / "run")

    def read_store():
        s = open_store(world / "store", verify=True)
        s.take("a", np.arange(0, s.n_rows, 7))

    def read_checkpoint():
        opt = make_optimizer(sae, TrainConfig(store=world / "store"))
        load_checkpoint(ckpt, sae, opt)

    targets = {
        world / "store/metadata.json": read_store,
        world / "store/b/shard-00002.npy": read_store,
        world / "run/config.json": lambda: load(world / "run"),
        world / "run/model.safetensors": lambda: load(world / "run"),
        ckpt.path / "optimizer.safetensors": read_checkpoint,
        ckpt.path / "state.json": read_checkpoint,
        ckpt.path / "trainer.safetensors": read_checkpoint,
    }
    outcomes = {}
    for path, read in targets.items():
        good = path.read_bytes()
        counts = outcomes.setdefault(f"{path.parent.name}/{path.name}", {"usae_error": 0, "loaded": 0})
        for _ in range(N_FUZZ):
            path.write_bytes(_mutate(good, rng))
            try:
                read()
                counts["loaded"] += 1
            except UsaeError as e:
                assert "\n" not in str(e)
                counts["usae_error"] += 1
        path.write_bytes(good)
    read_store()
    read_checkpoint()
    print(f"fuzz outcomes: {outcomes}")


# -- kill -9 of `usae train`, then --resume --------------------------------------------------------
def _train_cmd(store: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "usae", "train", str(store), "--out", str(out), "--n-latents", "64", "--k", "4",
            "--steps", str(steps), "--batch-size", "256", "--save-every", "1", "--log-every", "5", "--seed", "3", "--no-progress"]  # fmt: skip


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)


@pytest.mark.slow
def test_kill_9_during_train_then_resume_is_bit_identical(tmp_path):
    n_seeds = int(os.environ.get("USAE_KILL_SEEDS", "3"))
    rng = np.random.default_rng(0)
    store = write_store(tmp_path / "store", {"a": rng.normal(size=(3000, 16)), "b": rng.normal(size=(3000, 24))})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    steps = 80
    start = time.monotonic()
    subprocess.run(_train_cmd(store, tmp_path / "ref", steps), env=env, check=True, capture_output=True)
    t_ref = time.monotonic() - start
    ref_model = _tensors(tmp_path / "ref/model.safetensors")
    ref_metrics = (tmp_path / "ref/metrics.jsonl").read_text()
    killed, at_steps = 0, []
    for seed in range(n_seeds):
        r = random.Random(seed)
        run = tmp_path / f"run{seed}"
        for _ in range(3):
            # one command line for the first launch and every restart (a preemptible job's)
            proc = subprocess.Popen(
                _train_cmd(store, run, steps) + ["--resume"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(r.uniform(0.3, 0.8 * t_ref))  # start-up, steps and checkpoint writes alike
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                killed += 1
                ckpt = latest_checkpoint(run) if run.exists() else None
                at_steps.append(ckpt.step if ckpt else 0)
            proc.wait()
        done = subprocess.run(_train_cmd(store, run, steps) + ["--resume"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        model = _tensors(run / "model.safetensors")
        assert model.keys() == ref_model.keys()
        for key, value in ref_model.items():
            assert torch.equal(value, model[key]), (seed, key)
        assert (run / "metrics.jsonl").read_text() == ref_metrics, seed
        assert not list(run.rglob("*.tmp")), seed
    print(
        f"kill -9: {killed} processes killed over {n_seeds} seeds (latest checkpoint at each kill: {at_steps}); every resumed run bit-identical"
    )


# -- disk full -------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"mount not permitted: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    filler = disk / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))
    return filler


@pytest.mark.slow
def test_disk_full_is_one_line_and_keeps_the_previous_store_and_checkpoint(small_disk, cli, tree):
    rng = np.random.default_rng(0)
    store = write_store(
        small_disk / "store", {"a": rng.normal(size=(2000, 16)), "b": rng.normal(size=(2000, 24))}, dtype="float32"
    )
    # replacing the store with one that does not fit: error, old store intact, partial removed
    big = {"a": rng.normal(size=(20000, 16)), "b": rng.normal(size=(20000, 24))}
    with pytest.raises(
        UsaeError,
        match=r"shard-00000.npy: could not write \((No space left on device|.*bytes free on the device)\); nothing was published; .*store is unchanged",
    ) as e:
        write_store(store, big, dtype="float32", overwrite=True)
    assert "\n" not in str(e.value)
    open_store(store, verify=True)
    assert not (small_disk / "store.partial").exists()

    run = small_disk / "run"
    args = ["train", store, "--out", run, "--n-latents", "64", "--k", "4", "--batch-size", "128", "--save-every", "4", "--log-every", "4", "--no-progress"]  # fmt: skip
    assert cli([*args, "--steps", "4"])[0] == 0
    filler = _fill(small_disk, leave_bytes=48 * 1024)
    before = tree(run)
    rc, err = cli([*args, "--steps", "8", "--resume"])
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0], err
    after = tree(run)
    # metrics.jsonl may have grown by log lines; every weight file and the checkpoint are as they were
    assert {k: v for k, v in after.items() if "metrics" not in k} == {
        k: v for k, v in before.items() if "metrics" not in k
    }
    assert latest_checkpoint(run).step == 4
    sae = build_sae(TrainConfig(store=store, n_latents=64, k=4), open_store(store), ["a", "b"], torch.device("cpu"))
    load_checkpoint(latest_checkpoint(run), sae, make_optimizer(sae, TrainConfig(store=store)))
    # with space again, the same command finishes
    filler.unlink()
    assert cli([*args, "--steps", "8", "--resume"])[0] == 0
    assert latest_checkpoint(run).step == 8
    print(f"disk full: {err[0]}")
