"""Grid files, the papermill runner (end to end, resume, failure isolation), aggregation, the CLI."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from bnlib import cli, grid, norms, provenance, record, runner, stats, tables, train

ROOT = Path(__file__).resolve().parent.parent
TINY = """
methods: [bn, brn, gn]
settings: {dataset: digits, steps: 12, eval_every: 6, log_every: 3}
axes:
  batch_size: [4, 8]
  seed: [0, 1]
"""


def _write(tmp_path, text, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- grid files -----------------------------------------------------------------------------------


def test_shipped_grids_load_and_match_the_notebook():
    for path in sorted((ROOT / "grids").glob("*.yaml")):
        g = grid.load(path)
        assert g.cells, path
        runner.check_notebook(g)
        assert len({c.id for c in g.cells}) == len(g.cells)


def test_notebook_declares_every_config_key_and_runner_parameter():
    declared = runner.notebook_parameters()
    assert declared == set(train.Config.__dataclass_fields__) | set(runner.RUNNER_PARAMETERS)


def test_default_grid_covers_the_study():
    g = grid.load("default")
    cfgs = [c.config() for c in g.cells]
    assert {c.batch_size for c in cfgs} >= {2, 16, 128}
    assert len({c.seed for c in cfgs}) >= 3 and {c.sampler for c in cfgs} == {"iid", "noniid"}
    assert set(cfgs[0].methods) == set(norms.METHODS)
    paper = [c.config() for c in grid.load("paper").cells]
    assert {c.dataset for c in paper} == {"mnist", "cifar100"} and len({c.seed for c in paper}) >= 5
    assert {c.steps is not None for c in paper} == {True, False}  # both budgets


def test_cell_ids_are_stable_and_distinct(tmp_path):
    a = grid.load(_write(tmp_path, TINY))
    b = grid.load(_write(tmp_path, TINY, "copy.yaml"))
    assert [c.id for c in a.cells] == [c.id for c in b.cells]
    assert len({c.id for c in a.cells}) == 4 and a.cells[0].id.startswith("digits-b4-iid-s0-")
    # the id covers the resolved configuration: a default written out is the same cell, a changed one is not
    assert grid.cell_id({"steps": 5}) == grid.cell_id({"steps": 5, "lr": 0.001, "init_samples": 1000})
    assert grid.cell_id({"steps": 5}) != grid.cell_id({"steps": 5, "init_samples": 0})
    assert grid.cell_id({"steps": 5}) == grid.cell_id({"steps": 5, "device": "cpu", "data_dir": "/elsewhere"})
    # an option added later keeps old ids at its neutral value only
    assert grid.cell_id({"steps": 5}) == grid.cell_id({"steps": 5, "eval_batch_stats": False})
    # pinned: the same id on every machine and in every process (update it only with a deliberate Config change)
    assert grid.cell_id({"steps": 5}) == "digits-b16-iid-s0-575b0a071e"
    assert grid.cell_id({"steps": 5}) != grid.cell_id({"steps": 5, "eval_batch_stats": True})
    for key, default, other in (
        ("compile", "off", "on"),
        ("recompute_evals", "all", "last"),
        ("eval_batch_composition", "iid", "training"),
    ):
        assert grid.cell_id({"steps": 5}) == grid.cell_id({"steps": 5, key: default})
        assert grid.cell_id({"steps": 5}) != grid.cell_id({"steps": 5, key: other})


@pytest.mark.parametrize(
    "text,needle",
    [
        ("methods: [bn]\nsetings: {steps: 3}\n", "unknown top-level key(s) setings"),
        ("methods: [bn]\nsettings: {stepz: 3}\n", "settings: unknown key 'stepz'"),
        (
            "methods: [bn]\nsettings: {steps: 3}\naxes: {batching: [{batch_size: 4, sampler: iid, colour: red}]}\n",
            "axes.batching[0]: unknown key 'colour'",
        ),
        ("methods: [bn]\nsettings: {steps: 3}\naxes: {batching: [4, 8]}\n", "axes.batching"),
        ("methods: [bn, bogus]\nsettings: {steps: 3}\n", "unknown method 'bogus'"),
        ("methods: [bn]\nsettings: {steps: 3}\naxes: {batch_size: [1]}\n", "batch_size=1"),
        ("methods: [bn]\nsettings: {steps: 3}\naxes: {seed: []}\n", "axes.seed must be a non-empty list"),
        ("methods: [bn]\nsettings: {steps: 3\n", "not valid YAML"),
    ],
)
def test_bad_grid_files_are_rejected_naming_file_and_key(tmp_path, text, needle):
    path = _write(tmp_path, text, "bad.yaml")
    with pytest.raises(grid.GridError) as err:
        grid.load(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_cli_reports_bad_grid_with_exit_status_2(tmp_path, capsys):
    path = _write(tmp_path, "methods: [bn]\nsettings: {stepz: 3}\n", "bad.yaml")
    assert cli.main(["run", str(path), "--results", str(tmp_path / "r")]) == 2
    assert "stepz" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing ran
    assert cli.main(["status", "no-such-grid"]) == 2


def test_grid_key_missing_from_notebook_is_an_error(tmp_path):
    nb = nbformat.read(runner.NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = "\n".join(line for line in params.source.splitlines() if not line.startswith("sampler ="))
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(grid.GridError, match="sampler"):
        runner.check_notebook(grid.load(_write(tmp_path, TINY + "  sampler: [iid]\n")), path)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    capsys.readouterr()
    subcommands = next(a for a in cli.parser()._actions if a.dest == "command").choices
    assert {"run", "status", "aggregate", "bench", "book", "verify"} <= set(subcommands)
    for command in subcommands:  # every verb has its own help
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0 and f"usage: bnlib {command}" in capsys.readouterr().out


# --- running ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_grid_end_to_end(smoke_results):
    tmp_path = smoke_results
    g = grid.load("smoke")
    assert runner.status(g, tmp_path)["done"] == [c.id for c in g.cells]
    for cell in g.cells:
        payload = json.loads((tmp_path / "smoke" / "runs" / f"{cell.id}.json").read_text())
        assert payload["cell"] == cell.id and set(payload["methods"]) == set(cell.parameters["methods"])
        assert payload["provenance"]["versions"]["torch"] and payload["provenance"]["git_commit"]
        nb = nbformat.read(tmp_path / "smoke" / "runs" / f"{cell.id}.ipynb", as_version=4)
        assert any(
            o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
            for c in nb.cells
            for o in c.get("outputs", [])
        )
    written = tables.aggregate(tmp_path / "smoke")
    summary = pd.read_csv(written["summary"])
    assert set(summary["method"]) == set(g.cells[0].parameters["methods"])
    seeds = {c.parameters["seed"] for c in g.cells}  # sizes from the grid file, so changing it cannot pass by luck
    assert len(seeds) > 1 and (summary["n_seeds"] == len(seeds)).all()
    assert summary.loc[summary.method != "bn", "diff_vs_bn"].notna().all()
    evals = pd.read_csv(written["evaluations"])
    cfg = g.cells[0].config()
    per_method = len(
        set(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every)) | {cfg.steps}
    )  # every eval_every steps and the last
    assert (
        len(evals) == sum(len(c.parameters["methods"]) for c in g.cells) * per_method
    )  # cells x methods x evaluations
    assert set(evals["step"]) == set(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every)) | {cfg.steps}
    # a second run skips everything
    again = runner.run(g, tmp_path, runner.LocalExecutor(jobs=2, threads=1), progress=False)
    assert again.skipped == len(g.cells) and not again.finished


@pytest.mark.slow
def test_failing_cell_is_isolated(tmp_path):
    nb = nbformat.read(runner.NOTEBOOK, as_version=4)
    index = next(
        i for i, c in enumerate(nb.cells) if "train.train_seeds(" in c.source
    )  # after papermill's injected parameters
    nb.cells.insert(
        index, nbformat.v4.new_code_cell('if seed == 1 and batch_size == 8:\n    raise RuntimeError("boom in cell")')
    )
    path = tmp_path / "failing.ipynb"
    nbformat.write(nb, path)
    g = grid.load(_write(tmp_path, TINY))
    report = runner.run(g, tmp_path / "res", runner.LocalExecutor(jobs=2, threads=1), progress=False, notebook=path)
    assert len(report.finished) == 3 and len(report.failed) == 1
    (failed,) = report.failed
    assert "boom in cell" in report.failed[failed]
    runs = tmp_path / "res" / "tiny" / "runs"
    assert (runs / f"{failed}.ipynb").exists() and "RuntimeError" in (runs / f"{failed}.error").read_text()
    assert not (runs / f"{failed}.json").exists()
    assert runner.status(g, tmp_path / "res")["failed"] == [failed]


@pytest.mark.slow
def test_interrupted_run_resumes_without_redoing_finished_cells(tmp_path):
    path = _write(tmp_path, TINY)
    runs = tmp_path / "res" / "tiny" / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "bnlib.cli",
        "run",
        str(path),
        "--results",
        str(tmp_path / "res"),
        "-j",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("*.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its kernel, mid-grid
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    assert 1 <= len(done) < 4
    for p in runs.glob("*.json"):
        json.loads(p.read_text())  # whatever is there is whole
    assert not list(runs.glob("*.tmp"))
    status = runner.status(grid.load(path), tmp_path / "res")
    assert len(status["done"]) == len(done)
    completed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert f"{len(done)} already done" in completed.stdout
    after = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    assert len(after) == 4 and all(after[name] == mtime for name, mtime in done.items())


@pytest.mark.slow
def test_a_cell_killed_mid_training_resumes_from_its_checkpoint(tmp_path):
    """kill -9 of the runner and its kernel in the middle of a cell; the re-run resumes the cell from its
    checkpoint and writes the metrics of an uninterrupted run (timings aside); the checkpoint is then removed."""
    text = """
methods: [bn, brnc, mabn]
settings: {dataset: digits, steps: 600, evals: 3, log_every: 50, recompute: true, recompute_samples: 64, \
checkpoint_minutes: 0}
axes:
  batch_size: [4]
"""
    path = _write(tmp_path, text)
    g = grid.load(path)
    (cell,) = g.cells
    runs = tmp_path / "res" / "tiny" / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "bnlib.cli",
        "run",
        str(path),
        "--results",
        str(tmp_path / "res"),
        "-j",
        "1",
        "--threads",
        "1",
        "--no-progress",
    ]  # one thread, as the uninterrupted run below: the same reductions
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = runs / f"{cell.id}.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.2)
    time.sleep(1.0)  # some steps in
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (runs / f"{cell.id}.json").exists(), "the kill came too late: make the cell longer"
    status = subprocess.run(
        [sys.executable, "-m", "bnlib.cli", "status", str(path), "--results", str(tmp_path / "res"), "-v"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "1 unfinished cells have a checkpoint" in status and f"started: {cell.id} (has a checkpoint)" in status
    completed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    resumed = json.loads((runs / f"{cell.id}.json").read_text())
    assert resumed["resumed_at_steps"] and 0 < resumed["resumed_at_steps"][0] < 600
    assert not ckpt.exists()
    runner.run(g, tmp_path / "whole", runner.LocalExecutor(jobs=1, threads=1), progress=False)
    whole = json.loads((tmp_path / "whole" / "tiny" / "runs" / f"{cell.id}.json").read_text())
    timing = ("train_seconds", "samples_per_second")
    for m in cell.parameters["methods"]:
        assert {k: v for k, v in resumed["methods"][m].items() if k not in timing} == {
            k: v for k, v in whole["methods"][m].items() if k not in timing
        }, m


# --- statistics --------------------------------------------------------------------------------------


def _fake_run(cell, seed, batch, accs, diverged=()):
    methods = {}
    for m, acc in accs.items():
        div = m in diverged
        methods[m] = {
            "train_step": [1],
            "train_loss": [1.0],
            "eval_step": [] if div else [10],
            "test_acc": [] if div else [acc],
            "test_loss": [] if div else [0.5],
            "test_acc_recomputed": [] if div else [None],
            "test_loss_recomputed": [] if div else [None],
            "diverged": div,
            "diverged_step": 5 if div else None,
            "train_seconds": 1.0,
            "samples_per_second": 10.0,
        }
    config = {**train.Config(steps=10, batch_size=batch, seed=seed).__dict__}
    return {
        "cell": cell,
        "config": config,
        "steps": 10,
        "samples_per_step": batch,
        "train_size": 100,
        "test_size": 10,
        "num_classes": 10,
        "device": "cpu",
        "wall_seconds": 1.0,
        "eval_seconds": 0.1,
        "provenance": {"device_name": "cpu"},
        "methods": methods,
    }


def test_summary_statistics_are_paired_with_t_intervals():
    runs = [
        _fake_run(
            f"c{s}",
            s,
            4,
            {"bn": 0.9 + 0.01 * s, "brn": 0.8 + 0.02 * s, "bnrs": 0.5},
            diverged=("bnrs",) if s == 0 else (),
        )
        for s in range(4)
    ]
    summary = stats.summarise(tables.evaluations([record.RunRecord.from_dict(r) for r in runs])).set_index("method")
    assert summary.loc["bn", "mean"] == pytest.approx(0.915)
    assert summary.loc["bn", "ci_low"] < 0.915 < summary.loc["bn", "ci_high"]
    assert summary.loc["brn", "diff_vs_bn"] == pytest.approx(0.83 - 0.915)
    # paired: the differences are -0.1, -0.09, -0.08, -0.07: mean -0.085 +- t(0.975, 3) * s / 2, by hand
    half = 3.182446305284263 * 0.012909944487358056 / 2
    assert summary.loc["brn", "diff_ci_low"] == pytest.approx(-0.085 - half)
    assert summary.loc["brn", "diff_ci_high"] == pytest.approx(-0.085 + half)
    assert (
        summary.loc["brn", "wins"] == 0 and summary.loc["brn", "verdict"] == "below"
    )  # paired t-test p < 0.001, Holm over 2 comparisons
    # a diverged run scores chance and is counted
    assert summary.loc["bnrs", "diverged"] == 1 and summary.loc["bnrs", "mean"] == pytest.approx((0.1 + 3 * 0.5) / 4)
    assert summary.loc["bn", "n_seeds"] == 4


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "cell.json"

    def broken(tmp):  # interrupted half-way through writing
        tmp.write_text('{"a": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record.atomic_write(target, broken)
    assert not target.exists() and not list(tmp_path.iterdir())
    record.write_json(target, {"a": 1})
    with pytest.raises(KeyboardInterrupt):  # an existing file survives an interrupted rewrite
        record.atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["cell.json"]


@pytest.mark.slow
def test_ctrl_c_stops_promptly_and_resumes(tmp_path):
    path = _write(
        tmp_path, TINY.replace("steps: 12", "steps: 400").replace("batch_size: [4, 8]", "batch_size: [4]")
    )  # two cells
    runs = tmp_path / "res" / "tiny" / "runs"
    cmd = [
        sys.executable,
        "-m",
        "bnlib.cli",
        "run",
        str(path),
        "--results",
        str(tmp_path / "res"),
        "-j",
        "1",
        "--threads",
        "1",
        "--no-progress",
    ]
    # a new session, with SIGINT's default restored (a background shell running the tests ignores it)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("*.json")):
        time.sleep(0.2)
    time.sleep(2)  # the next cell's kernel is running
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the foreground group
    interrupted = time.time()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - interrupted < 30, out
    assert "run the same command again to resume" in out
    status = runner.status(grid.load(path), tmp_path / "res")
    assert not status["failed"] and len(status["done"]) >= 1  # the interrupted cell is unfinished, not failed
    completed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0 and len(list(runs.glob("*.json"))) == 2, completed.stdout + completed.stderr


def test_a_learning_rate_written_1e_3_is_the_float_it_means(tmp_path):
    path = _write(tmp_path, TINY.replace("steps: 12", "steps: 12, lr: 1e-3"))
    g = grid.load(path)
    assert all(c.parameters["lr"] == 0.001 and isinstance(c.parameters["lr"], float) for c in g.cells)
    assert g.cells[0].config().lr == 0.001


@pytest.mark.parametrize(
    "setting,needle",
    [
        ("recompute_samples: lots", "recompute_samples='lots' must be an integer"),
        ("aux_weight: x", "aux_weight='x' must be a number"),
        ("lr: [0.1, 0.2]", "lr=[0.1, 0.2] must be a number"),
        ("recompute: yes please", "recompute='yes please' must be true or false"),
        ("eval_samples: 2.5", "eval_samples=2.5 must be an integer or null"),
    ],
)
def test_wrongly_typed_values_are_rejected_before_anything_runs(tmp_path, setting, needle):
    path = _write(tmp_path, TINY.replace("log_every: 3}", "log_every: 3, " + setting + "}"))
    with pytest.raises(grid.GridError) as err:
        grid.load(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_one_runner_per_grid_the_second_refuses_naming_the_first_or_waits(tmp_path, capsys):
    path = _write(tmp_path, TINY)
    res = tmp_path / "res"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from bnlib import runner\n"
                f"with runner.runner_lock(Path({str(res / 'tiny')!r})):\n"
                "    print('locked', flush=True); time.sleep(6)\n"
            ),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    assert cli.main(["run", str(path), "--results", str(res), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"PID {holder.pid}" in err and "--wait" in err and not (res / "tiny" / "runs").exists()  # nothing ran
    started = time.time()
    assert cli.main(["run", str(path), "--results", str(res), "--no-progress", "-j", "2", "--wait"]) == 0
    assert time.time() - started > 2 and holder.wait(timeout=30) == 0  # it waited for the holder
    assert "waiting for host" in capsys.readouterr().out and len(list((res / "tiny" / "runs").glob("*.json"))) == 4
    holder.kill()  # a lock whose holder is dead is free at once: the kernel dropped it
    assert cli.main(["run", str(path), "--results", str(res), "--no-progress"]) == 0


def test_a_truncated_metrics_file_is_corrupt_named_and_redone(tmp_path, capsys):
    path = _write(tmp_path, TINY)
    res = tmp_path / "res"
    assert cli.main(["run", str(path), "--results", str(res), "--no-progress", "-j", "2"]) == 0
    runs = res / "tiny" / "runs"
    victim = sorted(runs.glob("*.json"))[0]
    good = victim.read_text()
    victim.write_text(good[: len(good) // 2])  # copied half: a disk full, a broken merge
    capsys.readouterr()
    assert cli.main(["aggregate", str(path), "--results", str(res)]) == 2
    assert str(victim) in capsys.readouterr().err  # aggregate names the file it cannot read
    assert cli.main(["status", str(path), "--results", str(res)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"corrupt\s+1", out) and str(victim) in out and re.search(r"done\s+3", out)
    assert cli.main(["run", str(path), "--results", str(res), "--no-progress"]) == 0
    assert "1 cells run, 3 already done" in capsys.readouterr().out
    assert victim.with_suffix(".json.corrupt").read_text() == good[: len(good) // 2]  # kept aside
    assert json.loads(victim.read_text())["cell"] == victim.stem  # redone


def test_cells_of_other_training_code_are_stale_kept_and_redone_on_request(tmp_path, capsys, monkeypatch):
    path = _write(tmp_path, TINY)
    res = tmp_path / "res"
    assert cli.main(["run", str(path), "--results", str(res), "--no-progress", "-j", "2"]) == 0
    runs = res / "tiny" / "runs"
    payload = json.loads(sorted(runs.glob("*.json"))[0].read_text())
    assert payload["provenance"]["training_code_sha256"] == provenance.TRAINING_SHA256
    old = sorted(runs.glob("*.json"))[1]
    run = json.loads(old.read_text())
    run["provenance"]["training_code_sha256"] = "0" * 64  # as if trained by an earlier norms.py
    old.write_text(json.dumps(run))
    capsys.readouterr()
    assert cli.main(["status", str(path), "--results", str(res)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"stale\s+1", out) and re.search(r"done\s+3", out)
    # earlier code that the current code is registered to reproduce exactly is not stale
    monkeypatch.setitem(provenance.REPRODUCED_TRAINING_CODE, "0" * 64, "reproduced (a test)")
    assert runner.status(grid.load(path), res)["stale"] == []
    monkeypatch.delitem(provenance.REPRODUCED_TRAINING_CODE, "0" * 64)
    assert cli.main(["run", str(path), "--results", str(res), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "keeping 1 stale cells" in out and "nothing to run" in out  # kept, and said so
    assert cli.main(["run", str(path), "--results", str(res), "--no-progress", "--stale"]) == 0
    assert "1 cells run, 3 already done" in capsys.readouterr().out
    assert json.loads(old.read_text())["provenance"]["training_code_sha256"] == provenance.TRAINING_SHA256
    # the fingerprint covers the training modules and the notebook, not the book or the runner
    assert provenance.code_fingerprint(provenance.training_files()) == provenance.TRAINING_SHA256
    assert not {"study.py", "grid.py"} & {f.name for f in provenance.training_files()}


def test_provenance_names_the_gpu_a_cuda_cell_ran_on(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Fake GPU {device.index}")
    assert provenance.device_name("cuda:1") == "Fake GPU 1"
    assert provenance.device_name("cpu") != "Fake GPU 1"


def test_set_overrides_a_setting_with_its_own_ids_and_folder(tmp_path, capsys):
    path = _write(tmp_path, TINY)
    plain, tuned = grid.load(path), grid.load(path, grid.parse_overrides(["lr=3e-4", "eval_every=3"]))
    assert tuned.name == "tiny+eval_every=3+lr=0.0003" and len(tuned.cells) == len(plain.cells)
    assert all(c.parameters["lr"] == 0.0003 and c.parameters["eval_every"] == 3 for c in tuned.cells)
    assert not {c.id for c in tuned.cells} & {c.id for c in plain.cells}
    res = tmp_path / "res"
    assert (
        cli.main(
            [
                "run",
                str(path),
                "--results",
                str(res),
                "--no-progress",
                "--set",
                "lr=3e-4",
                "--only",
                "seed=0",
                "--only",
                "batch_size=4",
            ]
        )
        == 0
    )
    assert len(list((res / "tiny+lr=0.0003" / "runs").glob("*.json"))) == 1 and not (res / "tiny").exists()
    capsys.readouterr()
    assert cli.main(["status", str(path), "--results", str(res), "--set", "lr=3e-4"]) == 0
    assert re.search(r"done\s+1", capsys.readouterr().out)
    with pytest.raises(grid.GridError, match="--set 'learning_rate=1'"):
        grid.parse_overrides(["learning_rate=1"])
    with pytest.raises(grid.GridError, match="lr='fast' must be a number"):
        grid.load(path, grid.parse_overrides(["lr=fast"]))


def test_dry_run_and_only_select_cells_without_running(tmp_path, capsys):
    path = _write(tmp_path, TINY)
    res = tmp_path / "res"
    assert cli.main(["run", str(path), "--results", str(res), "--dry-run", "--only", "batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert out.count("would run tiny") == 0 and out.count("would run digits-b4-") == 2 and "b8" not in out
    assert "2 of 2 cells would run" in out and not (res / "tiny" / "runs").exists()  # nothing ran
    assert (
        cli.main(
            ["run", str(path), "--results", str(res), "--no-progress", "--only", "batch_size=4", "--only", "seed=1"]
        )
        == 0
    )
    assert len(list((res / "tiny" / "runs").glob("*.json"))) == 1
    assert cli.main(["run", str(path), "--results", str(res), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 of 4 cells would run" in out and "min)" in out  # estimated from the finished cell
    assert cli.main(["run", str(path), "--results", str(res), "--dry-run", "--only", "seed=7"]) == 2


def test_time_estimates_follow_the_steps_and_samples_a_cell_trains(tmp_path):
    """Same kind of cell: its mean; another budget or batch size of the same dataset: the fitted linear model."""
    path = _write(
        tmp_path,
        """
methods: [bn]
settings: {dataset: digits}
axes:
  budget: [{steps: 10}, {steps: 20}, {steps: 40}, {samples: 160}]
  batch_size: [4, 8]
""",
    )
    g = grid.load(path)
    cell = {(grid.train.total_steps(c.config(), 0), c.config().batch_size, c.config().samples): c for c in g.cells}
    log = tmp_path / "res" / g.name / "cells.jsonl"
    log.parent.mkdir(parents=True)

    def truth(steps, batch):  # 10 s fixed + 0.2 s per step + 0.5 s per sample
        return 10 + 0.2 * steps + 0.5 * steps * batch

    log.write_text(
        "\n".join(json.dumps({"cell": cell[(n, 4, None)].id, "ok": True, "seconds": truth(n, 4)}) for n in (10, 20))
    )
    est = runner.estimate_seconds(g, tmp_path / "res", g.cells)
    assert est[cell[(10, 4, None)].id] == pytest.approx(truth(10, 4))  # its own kind
    # one batch size so far: steps and samples go together, the model is fixed + per sample
    assert est[cell[(40, 4, None)].id] == pytest.approx(truth(40, 4))
    assert est[cell[(40, 4, 160)].id] == pytest.approx(truth(40, 4))  # a samples budget lands on the same line
    with log.open("a") as f:  # a second batch size separates the cost per step from the cost per sample
        f.write("\n" + json.dumps({"cell": cell[(10, 8, None)].id, "ok": True, "seconds": truth(10, 8)}))
    est = runner.estimate_seconds(g, tmp_path / "res", g.cells)
    assert est[cell[(40, 8, None)].id] == pytest.approx(truth(40, 8))
    assert est[cell[(20, 8, 160)].id] == pytest.approx(truth(20, 8))


@pytest.mark.slow
def test_cells_that_train_the_same_run_once_and_share_the_results(tmp_path, capsys):
    """12 steps at batch 4 and 48 samples at batch 4 are one training: run once, aggregated under both budgets."""
    path = _write(
        tmp_path,
        """
methods: [bn, brn]
settings: {dataset: digits, eval_every: 6, log_every: 3}
axes:
  budget: [{samples: 48}, {steps: 12}]
  batch_size: [4, 8]
""",
    )
    g = grid.load(path)
    twins = {c.id: c.same_as for c in g.cells if c.same_as}
    ((alias, primary),) = twins.items()  # only batch 4: 12 steps x 4 = 48 samples; at batch 8, 48 samples are 6 steps
    assert g.cells[0].id == primary and grid.cell_id(next(c for c in g.cells if c.id == alias).parameters) == alias
    assert cli.main(["status", str(path), "--results", str(tmp_path / "res"), "-v"]) == 0
    out = capsys.readouterr().out
    assert (
        "1 of the pending cells train what another cell trains" in out
        and f"pending: {alias} (same training as {primary})" in out
    )
    report = runner.run(g, tmp_path / "res", runner.LocalExecutor(jobs=1, threads=1), progress=False)
    assert (
        report.ok
        and sorted(report.finished) == sorted(c.id for c in g.cells if c.id != alias)
        and report.copied == [alias]
    )
    runs = tmp_path / "res" / "tiny" / "runs"
    a, p = (json.loads((runs / f"{c}.json").read_text()) for c in (alias, primary))
    assert a["cell"] == alias and a["same_training_as"] == primary and a["methods"] == p["methods"]
    assert a["config"]["steps"] == 12 and a["config"]["samples"] is None and p["config"]["samples"] == 48
    assert "trains exactly what cell" in nbformat.read(runs / f"{alias}.ipynb", as_version=4).cells[0].source
    assert runner.status(g, tmp_path / "res")["done"] == [c.id for c in g.cells]
    summary = pd.read_csv(tables.aggregate(tmp_path / "res" / "tiny")["summary"])
    at4 = summary[summary["batch_size"] == 4]
    assert set(at4["budget"]) == {"48 samples", "12 steps"}  # counted under both budgets
    before = (runs / f"{alias}.json").stat().st_mtime_ns
    again = runner.run(g, tmp_path / "res", runner.LocalExecutor(jobs=1, threads=1), progress=False)
    assert not again.finished and not again.copied and (runs / f"{alias}.json").stat().st_mtime_ns == before
    # selected without its twin, a cell trains itself
    (solo,) = grid.select(g, ["steps=12", "batch_size=4"]).cells
    assert solo.id == alias and solo.same_as is None


def test_a_grid_reuses_the_cells_another_grid_trained_instead_of_training_them_again(tmp_path, capsys):
    """``reuse``: a cell that trains exactly what a cell of another grid trains is copied from there once that grid
    has it (its traces left behind); the rest train as usual; selecting it never makes it train."""
    first = _write(
        tmp_path,
        """
methods: [bn, brn]
settings: {dataset: digits, steps: 12, eval_every: 6, log_every: 3, trace_every: 4}
axes:
  batch_size: [4]
""",
        "first.yaml",
    )
    second = _write(
        tmp_path,
        f"""
reuse: [{first}]
settings: {{dataset: digits, steps: 12, eval_every: 6, log_every: 3}}
axes:
  part:
    - {{methods: [bn, brn], batch_size: 4, trace_every: 4}}   # what the first grid trains
    - {{methods: [gn], batch_size: 4}}
""",
        "second.yaml",
    )
    g1, g2 = grid.load(first), grid.load(second)
    (source,) = g1.cells
    shared, own = g2.cells
    assert shared.same_as == f"first/{source.id}" and shared.reused == ("first", source.id) and own.same_as is None
    res = tmp_path / "res"
    assert cli.main(["status", str(second), "--results", str(res)]) == 0
    assert "are trained by grid(s) first" in capsys.readouterr().out
    report = runner.run(g2, res, runner.LocalExecutor(jobs=1, threads=1), progress=False)
    assert (
        report.finished == [own.id] and not report.copied
    )  # nothing to copy yet, and the shared cell is not trained here
    assert runner.run(g1, res, runner.LocalExecutor(jobs=1, threads=1), progress=False).finished == [source.id]
    assert cli.main(["status", str(second), "--results", str(res)]) == 0
    assert "1 of the pending cells can be copied now" in capsys.readouterr().out
    assert runner.run(g2, res, runner.LocalExecutor(jobs=1, threads=1), progress=False).copied == [shared.id]
    copied = record.read_run(res / "second" / "runs" / f"{shared.id}.json")
    original = record.read_run(res / "first" / "runs" / f"{source.id}.json")
    assert copied.same_training_as == f"first/{source.id}" and original.methods["bn"].traces
    for m in ("bn", "brn"):
        assert copied.methods[m].traces is record.ABSENT
        assert copied.methods[m].test_acc == original.methods[m].test_acc
    note = nbformat.read(res / "second" / "runs" / f"{shared.id}.ipynb", as_version=4).cells
    assert len(note) == 1 and f"results/first/runs/{source.id}.ipynb" in note[0].source
    assert runner.status(g2, res)["done"] == [shared.id, own.id]
    (selected,) = grid.select(g2, ["methods=[bn, brn]"]).cells
    assert selected.same_as == shared.same_as  # selected alone it still comes from the other grid


@pytest.mark.parametrize(
    "reuse, needle",
    [
        ("mechanism-typo", "no grid named 'mechanism-typo'"),
        ("'self'", "names the grid itself"),
        ("{a: 1}", "must be a list of grid names"),
    ],
)
def test_a_bad_reuse_key_is_an_error_naming_the_file(tmp_path, reuse, needle):
    path = _write(
        tmp_path, f"reuse: [{reuse}]\n" + TINY if reuse != "{a: 1}" else f"reuse: {reuse}\n" + TINY, "self.yaml"
    )
    if reuse == "'self'":
        path.write_text(f"reuse: ['{path}']\n" + TINY)
    with pytest.raises(grid.GridError, match=needle):
        grid.load(path)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"reuse: ['{b}']\n" + TINY)
    b.write_text(f"reuse: ['{a}']\n" + TINY)
    with pytest.raises(grid.GridError, match="in a circle"):
        grid.load(a)


def test_stacked_seeds_run_as_one_notebook_with_each_cell_its_files(tmp_path, capsys):
    """stack_seeds: the cells differing only in seed are one notebook execution (one stacked model); every cell
    still gets its own metrics file (its solo numbers to float tolerance), its notebook and its place in the grid."""
    import math

    from bnlib import verify

    path = _write(tmp_path, TINY.replace("seed: [0, 1]", "seed: [0, 1, 2]") + "stack_seeds: true\n")
    g = grid.load(path)
    assert g.stack_seeds and [len(x) for x in runner.groups(g.cells, True)] == [3, 3]
    assert (
        cli.main(["run", str(path), "--results", str(tmp_path / "res"), "--no-progress", "-j", "1", "--threads", "1"])
        == 0
    )
    runs = tmp_path / "res" / "tiny" / "runs"
    assert len(list(runs.glob("*.kernel.log"))) == 2  # two notebook executions, not six
    assert runner.status(g, tmp_path / "res")["done"] == [c.id for c in g.cells]
    for group in runner.groups(g.cells, True):
        lead = group[0]
        for cell in group:
            payload = json.loads((runs / f"{cell.id}.json").read_text())
            assert payload["stacked_seeds"] == [0, 1, 2] and payload["stacked_in"] == lead.id
            assert payload["config"]["seed"] == payload["parameters"]["seed"] == cell.config().seed
            solo = train.train(train.Config.from_dict({**cell.parameters}), progress=False).to_dict()
            for m, rec in solo["methods"].items():
                assert math.isclose(payload["methods"][m]["final"]["test_acc"], rec["final"]["test_acc"], abs_tol=1e-9)
                assert all(
                    math.isclose(a, b, rel_tol=1e-4)
                    for a, b in zip(payload["methods"][m]["train_loss"], rec["train_loss"])
                )
            if cell is not lead:
                nb = nbformat.read(runs / f"{cell.id}.ipynb", as_version=4)
                assert f"in the notebook of cell `{lead.id}`" in nb.cells[0].source and len(nb.cells) == 1 + len(
                    nbformat.read(runs / f"{lead.id}.ipynb", as_version=4).cells
                )
    # a runner killed between the stack's metrics files and the notebook copies: the next run makes the copies
    member = runner.groups(g.cells, True)[0][2]
    (runs / f"{member.id}.ipynb").unlink()
    capsys.readouterr()
    assert cli.main(["run", str(path), "--results", str(tmp_path / "res"), "--no-progress"]) == 0
    assert "nothing to run" in capsys.readouterr().out and (runs / f"{member.id}.ipynb").exists()
    # verify re-executes a stacked cell in its stack: bit-identical
    [check] = verify.verify(g, tmp_path / "res", cells=[member.id], progress=False)
    assert check.verdict == "bit-identical", check.explain()


def test_aggregate_leaves_out_cells_the_grid_file_no_longer_has(tmp_path, capsys):
    """Results of an earlier version of a grid file (other settings, other ids) never mix into its tables."""
    path = _write(tmp_path, TINY)
    g = grid.load(path)
    runs = tmp_path / "res" / g.name / "runs"
    for c in g.cells:
        record.write_json(
            runs / f"{c.id}.json",
            _fake_run(c.id, c.parameters["seed"], c.parameters["batch_size"], {"bn": 0.9, "brn": 0.8}),
        )
    old = "digits-b4-iid-s0-0123456789"  # a cell of the file before its settings changed: same condition, seed 0
    record.write_json(runs / f"{old}.json", _fake_run(old, 0, 4, {"bn": 0.1, "brn": 0.1}))
    assert cli.main(["aggregate", str(path), "--results", str(tmp_path / "res")]) == 0
    assert "left out 1 finished cells" in capsys.readouterr().out
    summary = pd.read_csv(tmp_path / "res" / g.name / "summary.csv")
    assert (summary["n_seeds"] == 2).all() and summary["mean"].min() > 0.5  # the old cell is in no mean
    everything = pd.read_csv(tables.aggregate(tmp_path / "res" / g.name)["summary"])  # without the grid: all files
    assert everything.loc[everything["batch_size"] == 4, "n_seeds"].max() == 3
