"""The Slurm executor against a real one-node Slurm cluster (with accounting) started for this session."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from bnlib import grid, runner

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the test cluster's daemons must start as root"
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing); scripts/install-test-deps.sh installs it as root"
        )
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    script = ROOT / "scripts" / "slurm-cluster.sh"
    started = subprocess.run(["bash", str(script), "start", str(folder)], capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        conf = started.stdout.strip().splitlines()[-1]
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = conf
        yield {**os.environ, "SLURM_CONF": conf}
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
    finally:  # stop exactly the daemons this fixture started, even when a test failed
        subprocess.run(["bash", str(script), "stop", str(folder)], timeout=120)


def _bnlib(args, env, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "bnlib.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


TINY = """
methods: [bn, brn]
settings: {dataset: digits, steps: 10, eval_every: 5, log_every: 5}
axes:
  batch_size: [4, 8]
  seed: [0, 1]
"""


def test_smoke_grid_runs_as_an_array_with_results_like_a_local_run(cluster, tmp_path, smoke_results):
    started = time.perf_counter()
    # seed 0's cells (every batching and placement of the smoke grid): an array of several tasks, half the cost
    done = _bnlib(
        [
            "run",
            "smoke",
            "--only",
            "seed=0",
            "--results",
            str(tmp_path),
            "--executor",
            "slurm",
            "--poll-s",
            "1",
            "--no-progress",
        ],
        cluster,
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted Slurm job array" in done.stdout
    runs = tmp_path / "smoke" / "runs"
    array_ids = set()
    cells = grid.select(grid.load("smoke"), ["seed=0"]).cells
    assert len(cells) > 1 and sorted(p.stem for p in runs.glob("*.json")) == sorted(c.id for c in cells)
    for cell in cells:
        payload = json.loads((runs / f"{cell.id}.json").read_text())
        local = json.loads((smoke_results / "smoke" / "runs" / f"{cell.id}.json").read_text())
        assert payload["provenance"]["slurm_array_task_id"] is not None  # it really ran as an array task
        array_ids.add(payload["provenance"]["slurm_array_job_id"])
        assert set(payload) == set(local) and set(payload["methods"]) == set(local["methods"])
        assert payload["methods"]["bn"]["train_loss"] == local["methods"]["bn"]["train_loss"]  # same numbers
    assert len(array_ids) == 1  # ONE job array
    logs = list((tmp_path / "smoke" / "slurm").rglob("*_log.out"))
    assert len(logs) == len(cells)
    assert (tmp_path / "smoke" / "summary.csv").exists()
    print(f"\nsmoke grid via Slurm: {seconds:.1f} s")


def _failing_notebook(tmp_path, condition):
    nb = nbformat.read(runner.NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "train.train_seeds(" in c.source)
    nb.cells.insert(index, nbformat.v4.new_code_cell(f'if {condition}:\n    raise RuntimeError("boom on the cluster")'))
    path = tmp_path / "failing.ipynb"
    nbformat.write(nb, path)
    return path


def test_failing_cell_is_recorded_and_rerun_submits_only_missing_cells(cluster, tmp_path):
    from bnlib.slurm import SlurmExecutor, _merge_options

    g = grid.load(_write(tmp_path, TINY))
    ex = SlurmExecutor(tmp_path / "res" / "tiny" / "slurm", _merge_options({}, None), poll_s=1)
    report = runner.run(
        g, tmp_path / "res", ex, progress=False, notebook=_failing_notebook(tmp_path, "seed == 1 and batch_size == 8")
    )
    assert len(report.finished) == 3 and len(report.failed) == 1
    (failed,) = report.failed
    assert "boom on the cluster" in report.failed[failed]
    runs = tmp_path / "res" / "tiny" / "runs"
    assert (runs / f"{failed}.ipynb").exists() and not (runs / f"{failed}.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    jobs_file = tmp_path / "res" / "tiny" / "slurm" / "jobs.json"
    first = json.loads(jobs_file.read_text())["cells"]
    again = runner.run(g, tmp_path / "res", ex, progress=False)
    assert again.ok and again.finished == [failed] and again.skipped == 3
    second = json.loads(jobs_file.read_text())["cells"]  # every cell's latest task
    changed = {c for c in second if second[c] != first[c]}
    assert (
        changed == {failed} and second[failed].split("_")[0] != first[failed].split("_")[0]
    )  # only it went out, in a new array
    assert all((runs / name).stat().st_mtime_ns == mtime for name, mtime in before.items())


def test_a_task_that_wrote_its_result_is_not_live_while_squeue_still_lists_it(tmp_path, monkeypatch):
    # Seen on a busy machine: a re-run found the failed cell's finished task still COMPLETING in squeue,
    # waited for it and reported its old failure instead of submitting the cell again.
    from bnlib import slurm

    ex = object.__new__(slurm.SlurmExecutor)  # no cluster needed: squeue is faked
    ex.folder = tmp_path / "slurm"
    first, second = grid.load(_write(tmp_path, TINY)).cells[:2]
    record = {first.id: "7_0", second.id: "7_1"}
    result = ex._job("7_0").paths.result_pickle
    result.parent.mkdir(parents=True)
    result.write_bytes(b"")
    monkeypatch.setattr(
        slurm.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout="7_0|COMPLETING\n7_1|COMPLETING\n")
    )
    assert ex._live([first, second], record) == {second.id: "7_1"}


def test_stacked_seeds_are_one_array_task_writing_every_cell(cluster, tmp_path):
    from bnlib.slurm import SlurmExecutor, _merge_options

    g = grid.load(_write(tmp_path, TINY + "stack_seeds: true\n"))
    ex = SlurmExecutor(tmp_path / "res" / "tiny" / "slurm", _merge_options({}, None), poll_s=1)
    report = runner.run(g, tmp_path / "res", ex, progress=False)
    assert report.ok and sorted(report.finished) == sorted(c.id for c in g.cells)
    tasks = json.loads((tmp_path / "res" / "tiny" / "slurm" / "jobs.json").read_text())["cells"]
    assert len(set(tasks.values())) == 2  # batch 4 and batch 8, each with seeds 0 and 1 stacked
    for group in runner.groups(g.cells, True):
        assert len({tasks[c.id] for c in group}) == 1
        for c in group:
            payload = json.loads((tmp_path / "res" / "tiny" / "runs" / f"{c.id}.json").read_text())
            assert payload["stacked_seeds"] == [0, 1] and payload["stacked_in"] == group[0].id


def _write(tmp_path, text):
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_cancelled_task_is_recorded_as_failed_in_bounded_time(cluster, tmp_path):
    slow = (
        TINY.replace("steps: 10", "steps: 100000")
        .replace("seed: [0, 1]", "seed: [0]")
        .replace("batch_size: [4, 8]", "batch_size: [4]")
    )
    path = _write(tmp_path, slow)
    env = {**cluster, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bnlib.cli",
            "run",
            str(path),
            "--results",
            str(tmp_path / "res"),
            "--executor",
            "slurm",
            "--poll-s",
            "1",
            "--no-progress",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    jobs_file = tmp_path / "res" / "tiny" / "slurm" / "jobs.json"
    deadline = time.time() + 120
    job = None
    while time.time() < deadline and job is None:
        if jobs_file.exists():
            (job,) = json.loads(jobs_file.read_text())["cells"].values()
        time.sleep(0.5)
    assert job, "the array was not submitted"
    # wait until the task runs, then cancel it as a user (or the time limit) would
    while time.time() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=cluster
        ).stdout.strip()
        if state == "RUNNING":
            break
        time.sleep(0.5)
    time.sleep(3)  # inside the notebook by now
    subprocess.run(["scancel", job], check=True, env=cluster)
    cancelled_at = time.time()
    out, _ = proc.communicate(timeout=180)
    waited = time.time() - cancelled_at
    assert proc.returncode == 1, out
    assert "CANCELLED" in out and waited < 120, (waited, out)
    (error,) = (tmp_path / "res" / "tiny" / "runs").glob("*.error")
    assert "CANCELLED" in error.read_text()
    status = _bnlib(["status", str(path), "--results", str(tmp_path / "res")], cluster)
    assert "failed   1" in status.stdout


def _wait_running(job, env, deadline):
    while time.time() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=env
        ).stdout.strip()
        if state == "RUNNING":
            return
        time.sleep(0.5)
    raise AssertionError(f"Slurm task {job} never ran")


def test_rerun_while_tasks_live_waits_for_them_instead_of_submitting_again(cluster, tmp_path):
    slow = (
        TINY.replace("steps: 10", "steps: 100000")
        .replace("seed: [0, 1]", "seed: [0]")
        .replace("batch_size: [4, 8]", "batch_size: [4]")
    )
    path = _write(tmp_path, slow)
    args = [
        sys.executable,
        "-m",
        "bnlib.cli",
        "run",
        str(path),
        "--results",
        str(tmp_path / "res"),
        "--executor",
        "slurm",
        "--poll-s",
        "1",
        "--no-progress",
    ]
    env = {**cluster, "PYTHONUNBUFFERED": "1"}
    # Ctrl-C must reach the runner even when these tests run in a background job (whose shell ignores SIGINT)
    first = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    jobs_file = tmp_path / "res" / "tiny" / "slurm" / "jobs.json"
    deadline = time.time() + 120
    while time.time() < deadline and not jobs_file.exists():
        time.sleep(0.5)
    (job,) = json.loads(jobs_file.read_text())["cells"].values()
    second = None
    try:
        _wait_running(job, cluster, deadline)
        first.send_signal(signal.SIGINT)  # Ctrl-C: the runner stops, its task keeps running
        out, _ = first.communicate(timeout=60)
        assert "keep running" in out and "waits for them" in out, out
        second = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        said = second.stdout.readline()  # it waits for the live task or submits: either way it says so first
        # (cancelling after a fixed sleep raced with a slow start on a busy machine: the task was gone before
        # the second runner looked, so it rightly submitted the cell again)
        assert "still pending or running in Slurm" in said, said
        subprocess.run(["scancel", job], check=True, env=cluster)
        out, _ = second.communicate(timeout=180)
        out = said + out
        assert "submitted Slurm job array" not in out, out
        assert json.loads(jobs_file.read_text())["cells"] == {
            grid.load(path).cells[0].id: job
        }  # the same task, not a second one
        assert second.returncode == 1 and "CANCELLED" in out, out  # its outcome is recorded like the runner's own
    finally:  # a failed assertion must not leave a task (and its kernel) running: every recorded one goes
        subprocess.run(["scancel", *set(json.loads(jobs_file.read_text())["cells"].values()), job], env=cluster)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    status = _bnlib(["status", str(path), "--results", str(tmp_path / "res")], cluster)
    assert "failed   1" in status.stdout


def test_cell_at_its_time_limit_is_requeued_with_retries_and_finishes(cluster, tmp_path):
    """The first attempt sleeps past the point where Slurm warns of the time limit; submitit requeues the task
    (--retries 1); the second attempt runs the cell to the end."""
    from bnlib.slurm import SlurmExecutor, _merge_options

    nb = nbformat.read(runner.NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "train.train_seeds(" in c.source)
    nb.cells.insert(
        index,
        nbformat.v4.new_code_cell(
            "import pathlib, time\n"
            "attempt = pathlib.Path(output_path).with_suffix('.attempt')\n"
            "if not attempt.exists():\n"
            "    attempt.write_text('1')\n"
            "    time.sleep(600)"
        ),
    )
    notebook = tmp_path / "slow_once.ipynb"
    nbformat.write(nb, notebook)
    g = grid.load(
        _write(tmp_path, TINY.replace("seed: [0, 1]", "seed: [0]").replace("batch_size: [4, 8]", "batch_size: [4]"))
    )
    # time limit 3 min, warned 110 s before: the first attempt is signalled ~70 s in (slurmctld checks every
    # ~30 s; earlier, the signal could land before submitit's handler is installed) and requeued
    options = _merge_options({"time_min": 3, "signal_delay_s": 110, "retries": 1}, None)
    ex = SlurmExecutor(tmp_path / "res" / "tiny" / "slurm", options, poll_s=1)
    started = time.time()
    report = runner.run(g, tmp_path / "res", ex, progress=False, notebook=notebook)
    assert report.ok and report.finished == [g.cells[0].id], report.failed
    runs = tmp_path / "res" / "tiny" / "runs"
    assert (runs / f"{g.cells[0].id}.attempt").exists() and (runs / f"{g.cells[0].id}.json").exists()
    (job,) = json.loads((tmp_path / "res" / "tiny" / "slurm" / "jobs.json").read_text())["cells"].values()
    log = "".join(p.read_text() for p in (tmp_path / "res" / "tiny" / "slurm").rglob("*_log.err"))
    assert "timed-out" in log and "requeu" in log.lower(), log[-3000:]
    print(f"\nrequeued after the time limit warning and finished in {time.time() - started:.0f} s")


def test_retries_option_is_checked_and_reaches_sbatch(tmp_path):
    from bnlib.slurm import SlurmExecutor, _merge_options

    with pytest.raises(grid.GridError, match="retries"):
        _merge_options({"retries": -1}, None)
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not installed")
    ex = SlurmExecutor(tmp_path, _merge_options({"retries": 2}, None))._executor()
    assert ex.max_num_timeout == 2 and ex.parameters["additional_parameters"]["requeue"] is True
