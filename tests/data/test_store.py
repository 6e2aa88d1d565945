"""Tests for the paired activation store: round trips, streaming stats, hash, reads, refusals."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usae.data.store import (
    ModelStats,
    Store,
    StoreWriter,
    content_hash,
    open_store,
    shard_name,
    write_store,
)
from usae.errors import UsaeError

N_ROWS = 23
ROWS_PER_SHARD = 5  # 5 shards, the last one 3 rows


def _arrays(n: int = N_ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "vit": rng.normal(size=(n, 3)).astype(np.float32),
        "clip.b-16": (rng.normal(size=(n, 5)) * 3 + 1).astype(np.float32),
    }


def _write(path: Path, arrays: dict[str, np.ndarray] | None = None, **kwargs) -> Store:
    kwargs.setdefault("rows_per_shard", ROWS_PER_SHARD)
    kwargs.setdefault("dtype", "float32")
    write_store(path, arrays if arrays is not None else _arrays(), **kwargs)
    return open_store(path)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_float32_exact_across_shards(tmp_path: Path) -> None:
    x = _arrays()
    widths = {name: a.shape[1] for name, a in x.items()}
    with StoreWriter(tmp_path / "s", widths, dtype="float32", rows_per_shard=5) as writer:
        for lo, hi in [(0, 7), (7, 8), (8, 8), (8, 23)]:  # uneven batches, one empty
            writer.append({name: a[lo:hi] for name, a in x.items()})
        assert writer.n_rows == N_ROWS
    store = open_store(tmp_path / "s")
    assert store.model_names == ["vit", "clip.b-16"]
    assert store.widths == {"vit": 3, "clip.b-16": 5}
    assert len(store) == store.n_rows == N_ROWS
    assert store.dtype == np.float32 and store.n_shards == 5
    assert sorted(p.name for p in (tmp_path / "s" / "vit").iterdir()) == [shard_name(i) for i in range(5)]
    assert np.load(tmp_path / "s" / "vit" / shard_name(4)).shape == (3, 3)
    for name, a in x.items():
        got = store.rows(name, 0, N_ROWS)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, a)
    assert store.image_ids is None and store.tokens_per_image is None and store.grid is None
    assert store.extra == {}
    assert "n_rows=23" in repr(store)


def test_round_trip_float16_and_torch_input(tmp_path: Path) -> None:
    x = _arrays()
    tensors = {"vit": torch.from_numpy(x["vit"]), "clip.b-16": torch.from_numpy(x["clip.b-16"])}
    tensors["vit"] = tensors["vit"].to(torch.bfloat16)  # numpy has no bfloat16; must still work
    store = _write(tmp_path / "s", tensors, dtype="float16")
    assert store.dtype == np.float16
    want_vit = x["vit"].astype(np.float32)
    got = store.rows("vit", 0, N_ROWS)
    np.testing.assert_allclose(got, want_vit, rtol=2e-2, atol=1e-2)  # bf16 then fp16 rounding
    got = store.rows("clip.b-16", 0, N_ROWS)
    np.testing.assert_array_equal(got, x["clip.b-16"].astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(got, x["clip.b-16"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streaming_stats_match_numpy(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(1)
    # A large offset relative to the spread is where naive sum-of-squares would lose precision.
    x = {"a": (rng.normal(size=(301, 4)) * 0.5 + 40).astype(np.float32)}
    store = _write(tmp_path / "s", x, dtype=dtype, rows_per_shard=17)
    stored_bd = x["a"].astype(dtype).astype(np.float64)
    stats = store.stats("a")
    assert isinstance(stats, ModelStats) and stats.mean.dtype == np.float32
    np.testing.assert_allclose(stats.mean, stored_bd.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.var, stored_bd.var(axis=0), rtol=1e-6)
    assert stats.std == pytest.approx(np.sqrt(stored_bd.var(axis=0).mean()), rel=1e-9)
    assert stats.scalar_mean == pytest.approx(stored_bd.mean(), rel=1e-9)


def test_gamma_is_the_norm_of_the_means_over_the_norm_of_the_stds(tmp_path: Path) -> None:
    """A store built with known per-dimension means and stds (exactly, by standardising the noise)."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(400, 4))
    z = (z - z.mean(0)) / z.std(0)  # each column: mean 0, population std 1, exactly
    mean_d, std_d = np.array([3.0, -4.0, 0.0, 12.0]), np.array([1.0, 2.0, 0.5, 0.25])
    store = _write(tmp_path / "s", {"a": mean_d + z * std_d})
    want = np.linalg.norm(mean_d) / np.linalg.norm(std_d)  # 13 / sqrt(5.3125)
    assert store.stats("a").gamma == pytest.approx(want, rel=1e-5)
    assert store.metadata["stats"]["a"]["gamma"] == pytest.approx(want, rel=1e-5)  # recorded for other readers
    # a store written before γ existed: computed on read from the recorded mean and var
    meta_path = tmp_path / "s" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["stats"]["a"]["gamma"]
    meta_path.write_text(json.dumps(meta))
    assert open_store(tmp_path / "s").stats("a").gamma == pytest.approx(want, rel=1e-5)
    constant = _write(tmp_path / "c", {"a": np.ones((5, 2))})  # no spread: γ is infinite, null in JSON
    assert constant.stats("a").gamma == float("inf") and constant.metadata["stats"]["a"]["gamma"] is None


def test_token_positions_round_trip_and_are_checked(tmp_path: Path) -> None:
    x = {"a": np.arange(12, dtype=np.float32).reshape(6, 2)}
    pos = np.array([[0, 3], [1, 2], [2, 3]])
    layout = dict(image_ids=["i0", "i1", "i2"], tokens_per_image=2, grid=(2, 2))
    store = _write(tmp_path / "s", x, positions=pos, **layout)
    assert store.metadata["schema_version"] == 2 and store.subsampled and np.array_equal(store.positions, pos)
    assert store.positions.dtype == np.int64 and (tmp_path / "s" / "token_positions.npy").is_file()
    store.verify()
    plain = _write(tmp_path / "p", {"a": np.zeros((8, 2))}, image_ids=["i0", "i1"], tokens_per_image=4, grid=(2, 2))
    assert plain.metadata["schema_version"] == 1 and plain.positions is None and "token_positions" not in plain.metadata
    bad = [
        (pos[:, ::-1], "not strictly increasing"),
        (pos + 2, "outside the grid"),
        (pos[:2], "must be ints of shape"),
        (pos.astype(float), "must be ints of shape"),
    ]
    for i, (wrong, message) in enumerate(bad):
        with pytest.raises(UsaeError, match=message):
            _write(tmp_path / f"b{i}", x, positions=wrong, **layout)
    with pytest.raises(UsaeError, match="fewer than the grid's 4 tokens"):
        _write(tmp_path / "full", {"a": np.zeros((8, 2))}, positions=np.tile(np.arange(4), (2, 1)),
               image_ids=["i0", "i1"], tokens_per_image=4, grid=(2, 2))  # fmt: skip
    with pytest.raises(UsaeError, match="token positions need image_ids"):
        _write(tmp_path / "noids", x, positions=pos, tokens_per_image=2, grid=(2, 2))
    with pytest.raises(UsaeError, match="not a safe directory name"):
        _write(tmp_path / "clash", {"token_positions.npy": np.zeros((2, 2))})


def test_hash_deterministic_and_content_sensitive(tmp_path: Path) -> None:
    x = _arrays()
    h1 = _write(tmp_path / "a", x).hash
    # Same content with a different sharding and batching hashes the same.
    h2 = _write(tmp_path / "b", x, rows_per_shard=64).hash
    assert h1 == h2
    y = {name: a.copy() for name, a in x.items()}
    y["clip.b-16"][11, 2] += 1e-3
    assert _write(tmp_path / "c", y).hash != h1
    assert _write(tmp_path / "d", x, dtype="float16").hash != h1


def test_hash_recomputable_without_usae(tmp_path: Path) -> None:
    """The recipe in docs/store.md, with plain numpy + hashlib + json."""
    _write(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    models = []
    for m in meta["models"]:
        sha = hashlib.sha256()
        for i in range(meta["n_shards"]):
            shard = np.load(tmp_path / "s" / m["name"] / f"shard-{i:05d}.npy", allow_pickle=False)
            sha.update(np.ascontiguousarray(shard, dtype="<" + shard.dtype.str[1:]).tobytes())
        models.append({"name": m["name"], "sha256": sha.hexdigest(), "width": m["width"]})
    header = {"dtype": meta["dtype"], "models": models, "n_rows": meta["n_rows"]}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(text.encode()).hexdigest() == meta["hash"]
    digests = [(m["name"], m["width"], m["sha256"]) for m in models]
    assert content_hash(meta["dtype"], meta["n_rows"], digests) == meta["hash"]


def test_docs_reader_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "store.md").read_text()
    snippet = doc.split("## Reading without usae")[1].split("```python")[1].split("```")[0]
    x = _arrays()
    _write(tmp_path / "STORE", x)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(snippet, namespace)
    np.testing.assert_array_equal(namespace["x"], x["vit"])
    np.testing.assert_array_equal(namespace["rows"]("clip.b-16", 4, 11), x["clip.b-16"][4:11])
    assert "positions" not in namespace  # no image layout
    layouts = {
        "full": dict(image_ids=["p", "q"], tokens_per_image=4, grid=(2, 2)),
        "sub": dict(image_ids=["p", "q", "r"], tokens_per_image=2, grid=(2, 2), positions=[[0, 1], [1, 3], [0, 2]]),
    }
    for name, layout in layouts.items():
        store = _write(tmp_path / name / "STORE", {"a": np.zeros((6 if name == "sub" else 8, 2))}, **layout)
        monkeypatch.chdir(store.path.parent)
        namespace = {}
        exec(snippet, namespace)
        want = store.positions if store.subsampled else np.tile(np.arange(4), (2, 1))
        np.testing.assert_array_equal(namespace["positions"], want)


def test_rows_take_iter_batches_agree_with_numpy(tmp_path: Path) -> None:
    x = _arrays()
    store = _write(tmp_path / "s", x)
    a = x["clip.b-16"]
    for lo, hi in [(0, 0), (4, 6), (5, 10), (3, 23), (22, 23), (0, 23)]:
        np.testing.assert_array_equal(store.rows("clip.b-16", lo, hi), a[lo:hi])
    idx = np.array([22, 0, 5, 5, 4, 19, 0, 10, 9])  # unsorted, duplicates, shard boundaries
    np.testing.assert_array_equal(store.take("clip.b-16", idx), a[idx])
    np.testing.assert_array_equal(store.take("vit", torch.tensor(idx)), x["vit"][idx])
    assert store.take("vit", np.array([], np.int64)).shape == (0, 3)
    batches = list(store.iter_batches(4, start=3, stop=21))
    assert [row for row, _ in batches] == [3, 7, 11, 15, 19]
    for row, batch in batches:
        assert set(batch) == {"vit", "clip.b-16"}
        np.testing.assert_array_equal(batch["clip.b-16"], a[row : min(row + 4, 21)])
    only = list(store.iter_batches(10, names=["vit"]))
    assert [set(b) for _, b in only] == [{"vit"}] * 3
    np.testing.assert_array_equal(np.concatenate([b["vit"] for _, b in only]), x["vit"])


def test_read_errors_name_the_problem(tmp_path: Path) -> None:
    store = _write(tmp_path / "s")
    with pytest.raises(UsaeError, match="unknown model 'nope'; known models: vit, clip.b-16"):
        store.rows("nope", 0, 1)
    with pytest.raises(UsaeError, match=r"rows \[5, 24\)"):
        store.rows("vit", 5, 24)
    with pytest.raises(UsaeError, match="idx outside"):
        store.take("vit", [23])
    with pytest.raises(UsaeError, match="batch_size"):
        store.iter_batches(0)


def test_refuses_missing_and_unfinalised(tmp_path: Path) -> None:
    with pytest.raises(UsaeError, match=f"no store at {tmp_path / 'missing'}"):
        open_store(tmp_path / "missing")
    writer = StoreWriter(tmp_path / "s", {"a": 2}, rows_per_shard=2)
    writer.append({"a": np.ones((3, 2), np.float32)})  # one shard on disk, not finalised
    with pytest.raises(UsaeError, match=r"s\.partial is not finalised"):
        open_store(tmp_path / "s.partial")
    with pytest.raises(UsaeError, match="no store at"):
        open_store(tmp_path / "s")
    (tmp_path / "bare").mkdir()
    with pytest.raises(UsaeError, match=r"bare is not finalised \(no metadata.json\)"):
        open_store(tmp_path / "bare")


def test_append_validation(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s", {"a": 2, "b": 3}, dtype="float16", rows_per_shard=4)
    ok = {"a": np.zeros((3, 2)), "b": np.zeros((3, 3))}
    writer.append(ok)
    with pytest.raises(UsaeError, match="model 'b' has 2 rows but model 'a' has 3"):
        writer.append({"a": np.zeros((3, 2)), "b": np.zeros((2, 3))})
    with pytest.raises(UsaeError, match=r"model 'b' expected shape \(n, 3\), got \(3, 4\)"):
        writer.append({"a": np.zeros((3, 2)), "b": np.zeros((3, 4))})
    with pytest.raises(UsaeError, match="expected exactly"):
        writer.append({"a": np.zeros((3, 2))})
    bad = np.zeros((3, 3))
    bad[2, 1] = np.nan
    with pytest.raises(UsaeError, match=r"model 'b' has a non-finite value \(NaN/inf\) at row 5"):
        writer.append({"a": np.zeros((3, 2)), "b": bad})
    bad[2, 1] = -np.inf
    with pytest.raises(UsaeError, match="model 'b' .* at row 5"):
        writer.append({"a": np.zeros((3, 2)), "b": bad})
    big = np.zeros((3, 2))
    big[1, 0] = 1e6  # finite in float64 but beyond float16
    with pytest.raises(UsaeError, match=r"model 'a' .*beyond float16 range\) at row 4"):
        writer.append({"a": big, "b": np.zeros((3, 3))})
    assert writer.n_rows == 3  # rejected batches left nothing behind
    writer.append(ok)
    store = open_store(writer.finalize())
    assert store.n_rows == 6
    np.testing.assert_array_equal(store.rows("b", 0, 6), 0)
    with pytest.raises(UsaeError, match="already finalised"):
        writer.append(ok)


def test_writer_argument_validation(tmp_path: Path) -> None:
    for widths in [{}, {"../x": 2}, {"_x": 2}, {"a": 0}, {"a": 2, "A": 2}, {"metadata.json": 1}]:
        with pytest.raises(UsaeError, match="StoreWriter"):
            StoreWriter(tmp_path / "s", widths)
    with pytest.raises(UsaeError, match="dtype"):
        StoreWriter(tmp_path / "s", {"a": 2}, dtype="bfloat16")  # type: ignore[arg-type]
    with pytest.raises(UsaeError, match="rows_per_shard"):
        StoreWriter(tmp_path / "s", {"a": 2}, rows_per_shard=0)
    with pytest.raises(UsaeError, match="extra"):
        StoreWriter(tmp_path / "s", {"a": 2}, extra={"f": object()})
    with pytest.raises(UsaeError, match="no rows"):
        StoreWriter(tmp_path / "s", {"a": 2}).finalize()
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()
    with pytest.raises(UsaeError, match="different row counts"):
        write_store(tmp_path / "s", {"a": np.zeros((2, 1)), "b": np.zeros((3, 1))})


def test_image_layout_fields(tmp_path: Path) -> None:
    x = {"a": np.arange(24, dtype=np.float32).reshape(12, 2)}
    layout = dict(image_ids=["i0", "i1", "i2"], tokens_per_image=4, grid=[2, 2])
    store = _write(tmp_path / "s", x, extra={"source": "unit"}, **layout)
    assert store.image_ids == ["i0", "i1", "i2"] and store.tokens_per_image == 4
    assert store.grid == (2, 2) and store.extra == {"source": "unit"}
    with pytest.raises(UsaeError, match=r"grid \[2, 3\] has 6 tokens but tokens_per_image is 4"):
        StoreWriter(tmp_path / "t", {"a": 2}, tokens_per_image=4, grid=[2, 3])
    with pytest.raises(UsaeError, match="grid"):
        StoreWriter(tmp_path / "t", {"a": 2}, grid=[2, 2])  # grid needs tokens_per_image
    with pytest.raises(UsaeError, match="image_ids must be a list of str"):
        StoreWriter(tmp_path / "t", {"a": 2}, image_ids=[1, 2])
    with pytest.raises(UsaeError, match=r"n_rows 12 != len\(image_ids\) 2 \* tokens_per_image 4"):
        write_store(tmp_path / "t", x, image_ids=["i0", "i1"], tokens_per_image=4)
    with pytest.raises(UsaeError, match="not a multiple of tokens_per_image"):
        write_store(tmp_path / "u", x, tokens_per_image=5)
    assert not (tmp_path / "t").exists() and not (tmp_path / "u").exists()


def test_refuses_broken_shards(tmp_path: Path) -> None:
    _write(tmp_path / "s")
    shard = tmp_path / "s" / "clip.b-16" / shard_name(2)
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(UsaeError, match=f"{shard}: shard missing"):
        open_store(tmp_path / "s")
    shard.write_bytes(data[:-4])
    with pytest.raises(UsaeError, match=f"{shard}: .*truncated"):
        open_store(tmp_path / "s")
    np.save(shard, np.zeros((5, 4), np.float32))
    with pytest.raises(UsaeError, match=rf"{shard}: holds float32 \(5, 4\), expected"):
        open_store(tmp_path / "s")
    shard.write_bytes(data)
    np.save(tmp_path / "s" / "vit" / shard_name(5), np.zeros((1, 3), np.float32))
    with pytest.raises(UsaeError, match="shard-00005.npy: not listed"):
        open_store(tmp_path / "s")


def test_refuses_bad_metadata(tmp_path: Path) -> None:
    _write(tmp_path / "s")
    meta_path = tmp_path / "s" / "metadata.json"
    good = json.loads(meta_path.read_text())
    meta_path.write_text(meta_path.read_text()[:-10])
    with pytest.raises(UsaeError, match=f"{meta_path}: unreadable"):
        open_store(tmp_path / "s")
    cases = [
        ({"schema_version": 3}, "unknown schema_version 3"),
        ({"schema_version": 2}, "token positions need image_ids"),
        ({"format": "saev"}, "field 'format' is 'saev'"),
        ({"n_rows": 26}, "field 'n_shards' 5 does not fit"),
        ({"dtype": "int8"}, "field 'dtype'"),
        ({"hash": "xyz"}, "field 'hash'"),
        ({"stats": {}}, "field 'stats' entry for model 'vit'"),
        ({"models": [{"name": "vit", "width": 3}, {"name": "vit", "width": 5}]}, "repeated"),
    ]
    for change, message in cases:
        meta_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(UsaeError, match=message) as info:
            open_store(tmp_path / "s")
        assert "\n" not in str(info.value) and str(meta_path) in str(info.value)
    meta_path.write_text(json.dumps({**good, "n_rows": 24}))  # same shard count, longer last shard
    with pytest.raises(UsaeError, match=r"shard-00004.npy: holds float32 \(3, 3\), expected .*\(4, 3\)"):
        open_store(tmp_path / "s")
    meta_path.write_text(json.dumps({k: v for k, v in good.items() if k != "n_rows"}))
    with pytest.raises(UsaeError, match="missing field 'n_rows'"):
        open_store(tmp_path / "s")


def test_verify_catches_changed_value(tmp_path: Path) -> None:
    _write(tmp_path / "s")
    open_store(tmp_path / "s", verify=True)
    shard = tmp_path / "s" / "vit" / shard_name(3)
    mm = np.load(shard, mmap_mode="r+")
    mm[1, 1] += 1
    mm.flush()
    del mm
    open_store(tmp_path / "s")  # headers are still fine
    with pytest.raises(UsaeError, match=f"{shard}: contents changed"):
        Store(tmp_path / "s", verify=True)
    meta_path = tmp_path / "s" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["shard_sha256"]  # optional field: the store hash alone still catches it
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UsaeError, match="field 'hash' does not match"):
        open_store(tmp_path / "s", verify=True)


def test_overwrite_semantics(tmp_path: Path) -> None:
    target = tmp_path / "s"
    _write(target)
    before = _tree_bytes(target)
    with pytest.raises(UsaeError, match="already exists; pass overwrite=True"):
        write_store(target, _arrays(seed=1))
    assert _tree_bytes(target) == before
    writer = StoreWriter(target, {"a": 2}, overwrite=True)
    writer.append({"a": np.ones((4, 2))})
    assert _tree_bytes(target) == before  # old store intact until the new one is complete
    writer.finalize()
    store = open_store(target)
    assert store.model_names == ["a"] and store.n_rows == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(UsaeError, match="not a usae store; refusing to replace it"):
        write_store(tmp_path / "other", {"a": np.ones((1, 1))}, overwrite=True)


def test_exception_inside_with_publishes_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "s", {"a": 2}) as writer:
        writer.append({"a": np.ones((3, 2))})
        raise RuntimeError("extraction failed")
    assert not (tmp_path / "s").exists()
    with pytest.raises(UsaeError, match="not finalised"):
        open_store(tmp_path / "s.partial")
    # A later writer clears the stale partial directory and succeeds.
    store = _write(tmp_path / "s", {"a": np.ones((3, 2), np.float32)})
    assert store.n_rows == 3 and not (tmp_path / "s.partial").exists()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_rows=st.integers(1, 40),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    rows_per_shard=st.integers(1, 16),
    batch=st.integers(1, 50),
    dtype=st.sampled_from(["float16", "float32"]),
    seed=st.integers(0, 2**16),
)
def test_property_round_trip(
    tmp_path: Path,
    n_rows: int,
    widths: list[int],
    rows_per_shard: int,
    batch: int,
    dtype: str,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    x = {f"m{i}": rng.normal(size=(n_rows, d)).astype(dtype) for i, d in enumerate(widths)}
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "store"  # hypothesis reuses tmp_path
    widths_by_name = {k: v.shape[1] for k, v in x.items()}
    writer = StoreWriter(path, widths_by_name, dtype=dtype, rows_per_shard=rows_per_shard)
    for lo in range(0, n_rows, batch):
        writer.append({k: v[lo : lo + batch] for k, v in x.items()})
    store = Store(writer.finalize(), verify=True)
    assert store.n_shards == -(-n_rows // rows_per_shard)
    idx = rng.integers(0, n_rows, size=7)
    for name, a in x.items():
        np.testing.assert_array_equal(store.rows(name, 0, n_rows), a.astype(np.float32))
        np.testing.assert_array_equal(store.take(name, idx), a[idx].astype(np.float32))
