"""Re-execution on any machine: what decides the bits is recorded (bnlib.machine), a re-execution forces the
kernels a cell recorded where the machine has them, a prefix re-execution (`--steps`) is the start of the full
run, and verify's one verdict per cell follows its rules (bnlib.verify)."""

import copy
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
import yaml

from bnlib import cli, grid, machine, runner, train, verify
from bnlib.record import MethodRecord, RunRecord, read_run, write_json

X86 = platform.machine() in ("x86_64", "AMD64")
needs_x86 = pytest.mark.skipif(not X86, reason="instruction-set forcing is for x86 CPUs")


# --- the machine's identity ----------------------------------------------------------------------------


def test_numerics_record_the_kernels_threads_and_versions():
    import torch

    n = machine.numerics("cpu")
    assert n["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert n["threads"] == torch.get_num_threads() and n["torch"] == torch.__version__
    assert set(machine.SAME_BITS_KEYS) <= set(n) | {
        "cuda_device",
        "cuda_capability",
        "cudnn_version",
        "cudnn_deterministic",
        "cudnn_benchmark",
    }
    assert machine.same_bits(n, dict(n)) and not machine.same_bits(n, {**n, "threads": n["threads"] + 1})
    assert not machine.same_bits(None, n)  # an older file without the record: bit-identity cannot be required
    assert machine.differences(n, {**n, "torch_cpu_capability": "X"}) == [
        f"torch_cpu_capability: {n['torch_cpu_capability']} -> X"
    ]
    if X86 and torch.backends.mkldnn.is_available():
        assert n["onednn_isa"] and n["onednn_version"]


@needs_x86
def test_forcing_an_instruction_set_reaches_a_new_process():
    """All three libraries together: ATen's capability and oneDNN's ISA (forcing only ATen's leaves oneDNN's
    convolutions on their own)."""
    env = {**os.environ, **machine.force_env("default")}
    probe = (
        "from bnlib import machine; import json; n = machine.numerics(); "
        "print(json.dumps([n['torch_cpu_capability'], n['onednn_isa'], n['env']]))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    capability, onednn, recorded_env = json.loads(proc.stdout.strip().splitlines()[-1])
    assert capability == "DEFAULT" and "SSE4.1" in onednn
    assert recorded_env["ATEN_CPU_CAPABILITY"] == "default" and recorded_env["ONEDNN_MAX_CPU_ISA"] == "SSE41"
    assert machine.native_capability() in machine.X86_LEVELS  # whatever this process was started with


def test_kernels_of_a_re_execution_follow_the_record():
    avx2 = {"torch_cpu_capability": "AVX2", "env": {}}
    assert verify.plan_kernels(avx2, "recorded", "AVX512")[0] == machine.force_env(
        "AVX2"
    )  # a newer CPU runs the old kernels
    assert verify.plan_kernels(avx2, "recorded", "AVX2") == ({}, "this machine's own, as recorded (AVX2)")
    env, how = verify.plan_kernels({"torch_cpu_capability": "AVX512"}, "recorded", "AVX2")
    assert env == {} and "cannot run the recorded AVX512" in how  # an older CPU: its own kernels, and a tolerance
    forced = {"torch_cpu_capability": "DEFAULT", "env": {**machine.force_env("DEFAULT"), "OMP_NUM_THREADS": "1"}}
    assert verify.plan_kernels(forced, "recorded", "AVX512")[0] == machine.force_env("DEFAULT")  # forced as it was
    env, how = verify.plan_kernels(None, "recorded", "AVX2")
    assert env == {} and "does not record its kernels" in how
    assert verify.plan_kernels(avx2, "native", "AVX512")[0] == {}
    assert verify.plan_kernels(None, "DEFAULT", "AVX2")[0] == machine.force_env("DEFAULT")
    with pytest.raises(grid.GridError, match="widest CPU capability is AVX2; it cannot run AVX512"):
        verify.plan_kernels(None, "AVX512", "AVX2")
    with pytest.raises(ValueError, match="unknown CPU capability"):
        machine.force_env("sse9")


# --- verdicts --------------------------------------------------------------------------------------


def _record(loss=(2.0, 1.5, 1.0, 0.8), acc=(0.5, 0.7), cell="c") -> RunRecord:
    rec = MethodRecord(
        train_step=[5, 10, 15, 20],
        train_loss=list(loss),
        eval_step=[10, 20],
        eval_size=[100, 300],
        test_acc=list(acc),
        test_loss=[1.2, 0.9],
        test_acc_recomputed=[None, None],
        test_loss_recomputed=[None, None],
        test_acc_batchstats=[None, None],
        test_loss_batchstats=[None, None],
    )
    rec.final.test_acc, rec.final.test_loss, rec.final.train_loss = acc[-1], 0.9, loss[-1]
    return RunRecord(
        config={},
        device="cpu",
        steps=20,
        samples_per_step=4,
        train_size=100,
        test_size=300,
        num_classes=10,
        wall_seconds=1.0,
        eval_seconds=0.1,
        methods={"bn": rec},
        cell=cell,
    )


def test_one_verdict_per_cell_and_never_bit_identical_when_a_number_differs():
    base = _record()
    assert verify.compare(base, copy.deepcopy(base)).verdict == "bit-identical"
    rounding = _record(loss=(2.0, 1.5, 1.0000001, 0.8))
    check = verify.compare(base, rounding)
    assert check.verdict == "within tolerance" and check.ok
    assert "largest difference a relative 1e-07 on bn train_loss at step 15" in check.explain()
    assert "bit-identical: all 11 recorded numbers" in verify.compare(base, base).explain()
    # the same kernels, threads and software: any difference is a change of the code, however small
    same = verify.compare(base, rounding, same_bits=True)
    assert same.verdict == "differs" and not same.ok and "must be identical" in same.explain()
    moved = verify.compare(base, _record(acc=(0.5, 0.71)))  # one point: beyond 0.5
    assert moved.verdict == "differs" and "1.00 points on bn test_acc at step 20" in moved.explain()
    assert (
        verify.compare(base, _record(acc=(0.5, 0.71)), tolerance=verify.Tolerance(accuracy_points=2)).verdict
        == "within tolerance"
    )
    lost = _record()
    lost.methods["bn"].eval_step, lost.methods["bn"].test_acc = [10], [0.5]
    assert "eval_step" in verify.compare(base, lost).explain() and verify.compare(base, lost).verdict == "differs"
    diverged = _record()
    diverged.methods["bn"].mark_diverged(15)
    assert "diverged" in verify.compare(base, diverged).explain()
    # the report: per cell its verdict, and overall whether none differs
    text, ok = verify.report([verify.compare(base, rounding), moved])
    assert not ok and "2 cell(s) re-executed: 1 within tolerance, 1 differs" in text
    rows = verify.rows([check])
    assert rows[0]["quantity"] == "train_loss" and rows[0]["verdict"] == "within tolerance"


def test_a_prefix_run_is_the_start_of_the_full_run_and_never_a_finished_cell(tmp_path):
    config = train.Config(
        dataset="digits", methods=["bn", "brn"], steps=24, eval_every=8, log_every=5, batch_size=4, width=8, depth=2
    )
    full = train.train(config, progress=False)
    prefix = train.train(config, progress=False, stop_after=13)
    assert (
        prefix.stopped_at_step == 13
        and prefix.methods["bn"].train_step == [5, 10]
        and prefix.methods["bn"].eval_step == [8]
    )
    full.cell = prefix.cell = "c"
    check = verify.compare(full, prefix, upto=13)
    assert (
        check.verdict == "bit-identical" and check.steps_compared == 13 and check.finals[0][:3] == ("bn", "test_acc", 8)
    )
    assert not train.train(config, progress=False, stop_after=24).stopped_at_step  # the whole run: no marker
    with pytest.raises(train.ConfigError, match="stop_after=0"):
        train.train(config, progress=False, stop_after=0)
    # a prefix's metrics file in a results folder is never taken for a finished cell
    g = grid.load("smoke")
    cell = g.cells[0]
    write_json(tmp_path / f"{cell.id}.json", {**prefix.to_dict(), "cell": cell.id, "provenance": {}})
    assert runner.state(tmp_path, cell) == "corrupt"


# --- re-executing real cells ------------------------------------------------------------------------


def _copy_smoke(smoke_results, tmp_path):
    dst = tmp_path / "res" / "smoke"
    shutil.copytree(smoke_results / "smoke", dst)
    return dst


def test_a_prefix_that_records_nothing_is_refused_before_anything_runs(smoke_results, tmp_path, capsys):
    """`--steps K` shorter than a cell's first recorded number would compare nothing and still read 'bit-identical':
    it is refused, naming the cell and the smallest K that compares something."""
    folder = _copy_smoke(smoke_results, tmp_path)
    cell = grid.load("smoke").cells[0].id
    first = verify._first_recorded_step(read_run(folder / "runs" / f"{cell}.json"))
    assert first > 1
    assert (
        cli.main(["verify", "smoke", "--results", str(folder.parent), "--cell", cell, "--steps", str(first - 1)]) == 2
    )
    assert f"cell {cell} records nothing in its first {first - 1} steps" in capsys.readouterr().err


@needs_x86
@pytest.mark.slow
def test_a_re_execution_with_other_kernels_is_within_tolerance_and_a_changed_number_differs(
    smoke_results, tmp_path, capsys
):
    """The measured tolerance in use: a committed cell re-executed with no-SIMD kernels (another 'CPU generation'
    on this machine) passes verify; the same with one committed number moved by 2 points fails it."""
    if machine.native_capability() == "DEFAULT":
        pytest.skip("this machine has no wider kernels than DEFAULT to compare with")
    folder = _copy_smoke(smoke_results, tmp_path)
    cell = grid.load("smoke").cells[0].id
    args = ["verify", "smoke", "--results", str(folder.parent), "--cell", cell, "--isa", "default"]
    save = tmp_path / "cross.csv"
    assert cli.main(args + ["--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "CPU kernels forced to DEFAULT" in out and "verdict: within tolerance (largest difference" in out
    assert "1 cell(s) re-executed: 1 within tolerance" in out and "bit-identical" not in out.split("verdict:")[1]
    assert save.exists() and "within tolerance" in save.read_text()
    path = folder / "runs" / f"{cell}.json"
    payload = json.loads(path.read_text())
    payload["methods"]["bn"]["test_acc"][0] -= 0.02
    path.write_text(json.dumps(payload))
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "verdict: differs: beyond the tolerance" in out and "2.00 points on bn test_acc at step 15" in out


@needs_x86
@pytest.mark.slow
def test_a_cell_run_with_narrower_kernels_is_re_executed_with_them_bit_identically(tmp_path, capsys, monkeypatch):
    """A cell run under DEFAULT kernels (as if on an older CPU) records them; verify on this (wider) machine forces
    them again and reproduces the cell bit for bit -- a cell from an AVX2 machine on an AVX-512 one, likewise."""
    spec = {
        "methods": ["bn", "brn"],
        "settings": {"dataset": "digits", "steps": 12, "eval_every": 6, "log_every": 3, "width": 8, "depth": 2},
        "axes": {"batch_size": [4]},
    }
    path = tmp_path / "narrow.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "res"
    for key in machine.ISA_ENV["AVX2"]:  # `bnlib run --isa` sets them in this process: undone after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    assert cli.main(["run", str(path), "--results", str(results), "--isa", "default", "--no-progress", "-j", "1"]) == 0
    cell = grid.load(path).cells[0].id
    recorded = read_run(results / "narrow" / "runs" / f"{cell}.json").provenance.numerics
    assert recorded["torch_cpu_capability"] == "DEFAULT" and recorded["env"]["ONEDNN_MAX_CPU_ISA"] == "SSE41"
    for key in machine.ISA_ENV["AVX2"]:
        monkeypatch.delenv(key)  # verify must force the recorded kernels itself
    capsys.readouterr()
    assert cli.main(["verify", str(path), "--results", str(results), "--cell", cell]) == 0
    out = capsys.readouterr().out
    assert "CPU kernels forced as the committed run was (DEFAULT" in out and "verdict: bit-identical" in out


def test_the_saved_measurement_reads_as_a_table_judged_by_the_current_tolerance():
    base = _record()
    checks = [
        verify.compare(base, _record(loss=(2.0, 1.5, 1.0005, 0.8), acc=(0.5, 0.703)), kernels="forced"),
        verify.compare(base, copy.deepcopy(base)),
    ]
    checks[0].cell, checks[1].cell = "long", "short"
    for check in checks:
        check.recorded, check.rerun_capability, check.seconds = "AVX2", "DEFAULT", 12.0
    import pandas as pd

    frame = pd.DataFrame(verify.rows(checks))
    table = verify.cross_isa_markdown(frame)
    assert (
        "| long | 20 of 20 | AVX2 -> DEFAULT | 12 | 0.30 points (bn test_acc at step 20) | "
        "0.0005 (bn train_loss at step 15) | yes |" in table
    )
    assert "| short | 20 of 20 | AVX2 -> DEFAULT | 12 | none | none | yes |" in table
    assert "| no |" in verify.cross_isa_markdown(frame, verify.Tolerance(accuracy_points=0.1))


@needs_x86
def test_run_refuses_kernels_wider_than_the_machine_before_anything_runs(tmp_path, capsys):
    native = machine.native_capability()
    if native == machine.X86_LEVELS[-1]:
        pytest.skip("no instruction set wider than this machine's")
    wider = machine.X86_LEVELS[machine.X86_LEVELS.index(native) + 1]
    assert cli.main(["run", "smoke", "--results", str(tmp_path), "--isa", wider, "--no-progress"]) == 2
    assert f"it cannot run {wider} kernels" in capsys.readouterr().err and not any(tmp_path.iterdir())
