"""The benchmark's plumbing (not its speed: no timed assertions): FLOP counts, rows, the saved table."""

import pandas as pd
import pytest

from bnlib import bench, bench_cells, bench_tables


def test_step_rows_count_flops_and_compare_with_the_peak():
    rows = bench.bench_step("cpu", sides=(8,), sizes=(2,), methods=["bn", "gn"], repeats=1, precisions=("fp32",))
    frame = pd.DataFrame(rows)
    assert set(frame["what"]) == {"matmul", "step", "lockstep", "eval 1000"}
    assert {"fp32", "bf16"} <= set(frame.loc[frame["what"] == "matmul", "precision"])  # both peaks are measured
    steps = frame[frame["what"] == "step"].set_index("method")
    lock = frame[frame["what"] == "lockstep"].iloc[0]
    # the lockstep step does the FLOPs of its methods together: FLOP/s x time adds up
    flops = (steps["GFLOP/s"] * steps["ms"]).sum()
    assert lock["GFLOP/s"] * lock["ms"] == pytest.approx(flops, rel=1e-9)
    # one 8x8 step of the study's net: 4 convs (3x3, 32 channels) + linear, forward and backward
    forward = 2 * 8 * 8 * 9 * 32 * (1 + 3 * 32) * 2 + 2 * 2 * 32 * 10  # batch 2
    assert 2 * forward < steps.loc["bn", "GFLOP/s"] * steps.loc["bn", "ms"] * 1e6 < 3.5 * forward
    assert (frame["of_peak"] > 0).all()


def test_saved_step_table_is_the_csv_the_book_shows(tmp_path):
    rows = [
        {
            "what": "matmul",
            "precision": "fp32",
            "side": None,
            "N": None,
            "ms": float("nan"),
            "GFLOP/s": 70.0,
            "of_peak": 1.0,
        },
        {
            "what": "lockstep",
            "method": "all",
            "precision": "fp32",
            "side": 28,
            "N": 16,
            "ms": 650.0,
            "GFLOP/s": 28.0,
            "of_peak": 0.4,
        },
    ]
    bench_tables.save_step(rows, "a machine", tmp_path / "bench.csv")
    saved = pd.read_csv(tmp_path / "bench.csv")
    assert saved["machine"].eq("a machine").all()
    text = bench_tables.step_markdown(saved)
    assert "| lockstep | fp32 | 28x28 | 16 | 650.0 | 28.0 | 40% |" in text and "Measured on: a machine" in text


def test_seeds_rows_compare_stacked_and_solo_runs_of_the_same_condition():
    (row,) = bench.bench_seeds("cpu", datasets=("digits",), sizes=(4,), seeds=(0, 1), steps=12, methods=("bn", "gn"))
    assert row["seeds"] == 2 and row["methods"] == 2 and row["N"] == 4
    assert row["speedup"] == pytest.approx(row["solo_s"] / row["stacked_s"])
    assert row["solo_s"] > 0 and row["stacked_s"] > 0 and row["train_speedup"] > 0
    assert row["max_final_diff_points"] < 0.5  # the same runs, up to float rounding


def test_fusion_rows_compare_layouts_with_the_net_without_norms():
    frame = pd.DataFrame(bench.bench_fusion("cpu", side=8, batch_size=4, repeats=1, compile=False))
    assert list(frame["net"]) == ["matmul 2048", "bn", "bn", "no norm"]
    assert list(frame["layout"]) == ["", "eager", "channels-last", "eager"]
    rows = frame.iloc[1:]
    assert (rows["error"] == "").all() and (rows["ms"] > 0).all() and (rows["of_peak"] > 0).all()
    assert rows.loc[rows["layout"] == "eager", "vs_eager"].tolist() == [1.0, 1.0]
    # the same network's FLOPs in both layouts: FLOP/s x time agree
    bn = rows[rows["net"] == "bn"]
    assert (bn["GFLOP/s"] * bn["ms"]).iloc[0] == pytest.approx((bn["GFLOP/s"] * bn["ms"]).iloc[1], rel=1e-9)


def test_fusion_reports_a_failed_compilation_instead_of_crashing(monkeypatch):
    def no_compiler(model, **options):  # torch.compile as bnlib.train.compiling calls it
        def fails(*args):
            raise RuntimeError("InductorError: no C++ compiler found")

        return fails

    monkeypatch.setattr(bench.torch, "compile", no_compiler)
    frame = pd.DataFrame(bench.bench_fusion("cpu", side=8, batch_size=4, repeats=1))
    failed = frame[frame["layout"].str.startswith("compile")]
    assert len(failed) == 3 and failed["error"].str.contains("no C\\+\\+ compiler").all() and failed["ms"].isna().all()
    assert (frame.loc[frame["layout"] == "eager", "ms"] > 0).all()  # the rest is still measured


def test_saved_fusion_table_reads_back_into_the_books_table(tmp_path):
    rows = bench.bench_fusion("cpu", side=8, batch_size=4, repeats=1, compile=False)
    bench_tables.save_fusion(rows, "a machine", tmp_path / "fusion.csv")
    block = bench_tables.fusion_markdown(pd.read_csv(tmp_path / "fusion.csv"))
    assert "| bn | channels-last |" in block and "| no norm | eager |" in block and "Measured on: a machine" in block


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="instruction sets are x86's")
def test_isa_rows_time_every_instruction_set_the_machine_can_run_against_its_own(tmp_path):
    from bnlib import machine

    native = machine.native_capability()
    rows = bench_cells.bench_isa(sizes=(4,), steps=3, repeats=1)
    assert [r["kernels"] for r in rows] == [c for c in machine.X86_LEVELS if machine.can_run(c, native)]
    own = next(r for r in rows if r["kernels"] == native)
    assert own["time_vs_native"] == 1.0 and own["same_numbers_as_native"] and all(r["train_s"] > 0 for r in rows)
    bench_tables.save_isa(rows, "a machine", tmp_path / "isa.csv")
    block = bench_tables.isa_markdown(pd.read_csv(tmp_path / "isa.csv"))
    assert f"| {native} | 4 | 3 |" in block and "| 1.00x | yes |" in block and "Measured on: a machine" in block


def test_long_rows_compare_the_paths_whole_cells_and_their_numbers(tmp_path):
    """``bench long``'s plumbing on a tiny cell: three paths, training and evaluation apart, ratios against the
    old path, the new path's numbers judged against the old path's, the saved table the book shows."""
    from bnlib.train import compiling

    rows = bench_cells.bench_long(
        dataset="digits", sizes=(8,), steps={8: 6}, evals={8: 2}, eval_samples=50, methods=["bn", "gn"]
    )
    frame = pd.DataFrame(rows)
    assert list(frame["path"]) == list(bench_cells.LONG_PATHS)
    old = frame.iloc[0]
    assert old["train_vs_old"] == old["eval_vs_old"] == old["total_vs_old"] == 1.0 and not old["compiled"]
    assert (frame["train_s"] > 0).all() and (frame["eval_s"] > 0).all() and (frame["train_of_peak"] > 0).all()
    assert (frame["total_s"] >= frame["train_s"]).all()
    new = frame.iloc[1]
    assert new["compiled"] == (compiling.unavailable(__import__("torch").device("cpu")) is None)
    assert new["vs_old_numbers"].split(":")[0].split(" (")[0] in ("bit-identical", "within tolerance", "differs")
    assert new["vs_no_norm"] > 0
    bench_tables.save_long(rows, "a machine", tmp_path / "long.csv")
    block = bench_tables.long_markdown(pd.read_csv(tmp_path / "long.csv"))
    assert block.startswith("Measured on: a machine") and "new path (compiled)" in block
    assert "numbers against the old path's" in block and "without norm layers" in block


def test_bench_traces_plumbing():
    """Tiny: digits, a few steps, eager only; every interval gets a row, the reference's overhead is 0."""
    rows = bench.bench_traces(
        dataset="digits", batch_size=8, steps=6, methods=("bn", "bnrs"), repeats=1, compiles=("off",)
    )
    assert [r["trace_every"] for r in rows] == ["off", 25, 10]
    assert rows[0]["overhead"] == 0 and all(r["train_s"] > 0 for r in rows)
