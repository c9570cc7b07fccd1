"""Run.to_arrow / to_polars / to_parquet: the same long table as to_pandas(), with the same dtypes
(checked through each package's own to_pandas() round trip), from tracked, spilled and empty runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import neural_mechanics as nm
from neural_mechanics.run import COLUMNS, GroupInfo, Run

pa = pytest.importorskip("pyarrow")
pl = pytest.importorskip("polars")
pq = pytest.importorskip("pyarrow.parquet")

CATEGORICAL = ("symmetry", "layer", "label")


def synthetic(steps: int, groups: int, **kw) -> Run:
    """A run of random rows: three symmetries, layers whose discovery order is not sorted."""
    third = groups // 3
    info = GroupInfo(
        symmetry=np.array(["scale"] * third + ["translation"] * third + ["rescale"] * (groups - 2 * third), dtype=object),
        layer=np.array([f"block{(7 * i) % 5}.conv" for i in range(groups)], dtype=object),
        index=np.arange(groups, dtype=np.int64),
        label=np.array([f"unit {i}" for i in range(groups)], dtype=object),
        size=np.ones(groups, dtype=np.int64),
    )
    run = Run(groups=info, optimizer="SGD", **kw)
    rng = np.random.default_rng(0)
    for s in range(steps):
        run.append_row(s, 0.1 * s, rng.standard_normal((len(COLUMNS), groups)))
    return run


@pytest.fixture(scope="module")
def tracked() -> Run:
    from helpers import bn_mlp, digits, sgd, train_steps

    x, y = digits(flatten=True)
    model = bn_mlp((16,))
    opt = sgd()(model)
    with nm.track(model, opt) as tracker:
        train_steps(model, opt, x, y, 12)
    return tracker.run


def _runs(tracked, tmp_path) -> dict[str, Run]:
    spilled = synthetic(40, 9, max_rows_in_memory=7, spill_dir=str(tmp_path / "spill"))
    assert spilled.chunks  # rows on disk and in memory
    return {"tracked": tracked, "synthetic": synthetic(25, 10), "spilled": spilled, "empty": synthetic(0, 6)}


def test_arrow_is_the_pandas_table(tracked, tmp_path):
    for name, run in _runs(tracked, tmp_path).items():
        expected = run.to_pandas()
        table = run.to_arrow()
        assert isinstance(table, pa.Table)
        assert table.column_names == list(expected.columns), name
        for col in CATEGORICAL:
            assert pa.types.is_dictionary(table.schema.field(col).type), (name, col)
        assert table.schema.field("step").type == pa.int64() and table.schema.field("measured").type == pa.float64()
        pd.testing.assert_frame_equal(table.to_pandas(), expected, check_exact=True)


def test_parquet_is_the_pandas_table(tracked, tmp_path):
    for name, run in _runs(tracked, tmp_path).items():
        path = run.to_parquet(tmp_path / f"{name}.parquet")
        expected = run.to_pandas()
        pd.testing.assert_frame_equal(pq.read_table(path).to_pandas(), expected, check_exact=True)
        pd.testing.assert_frame_equal(pd.read_parquet(path), expected, check_exact=True)
        assert pl.read_parquet(path).shape == expected.shape


def test_polars_is_the_pandas_table(tracked, tmp_path):
    for name, run in _runs(tracked, tmp_path).items():
        expected = run.to_pandas()
        frame = run.to_polars()
        assert isinstance(frame, pl.DataFrame)
        assert frame.columns == list(expected.columns)
        assert frame.schema["step"] == pl.Int64 and frame.schema["group"] == pl.Int64 and frame.schema["measured"] == pl.Float64
        for col in CATEGORICAL:
            # pl.Enum over the sorted values: pandas' categories, in pandas' order
            assert frame.schema[col] == pl.Enum(list(expected[col].cat.categories)), (name, col)
        back = frame.to_pandas()
        for col in CATEGORICAL:
            assert back[col].cat.ordered  # the one difference: polars marks an Enum's categories ordered
            back[col] = back[col].cat.as_unordered()
        pd.testing.assert_frame_equal(back, expected, check_exact=True)


def test_dataframes_are_built_without_a_loop_per_row():
    """10⁵ long-table rows in well under a second each (a Python loop per row would not be)."""
    import time

    run = synthetic(1000, 100)
    for convert in (run.to_arrow, run.to_polars):
        start = time.perf_counter()
        convert()
        assert time.perf_counter() - start < 2.0
