"""The seams of the package: one paths module, one run-record schema, the registry's traits, the notebook's
parameters generated from Config, commands that work from any folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from bnlib import analysis, norms, paths, plots, provenance, record, runner, train

ROOT = Path(__file__).resolve().parent.parent
STUDY_RUNS = ROOT / "results" / "study" / "runs"


def test_only_paths_computes_the_repository_root():
    offenders = [
        f"{p.name}:{i}"
        for p in sorted((ROOT / "bnlib").glob("*.py"))
        if p.name != "paths.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "parent.parent" in line or "Path(__file__)" in line
    ]
    assert offenders == []
    assert paths.ROOT == ROOT and paths.NOTEBOOK.exists() and paths.GRIDS.is_dir()


def test_results_folder_defaults_to_the_repository_wherever_the_command_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("BNLIB_RESULTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert paths.results_root() == ROOT / "results"
    assert paths.results_root("res") == tmp_path / "res"  # an override is taken from the working folder
    monkeypatch.setenv("BNLIB_RESULTS", "elsewhere")
    assert paths.results_root() == tmp_path / "elsewhere"


def _bnlib(*args, cwd, env=None, timeout=600):
    return subprocess.run(
        [str(Path(sys.executable).with_name("bnlib")), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_commands_work_from_any_folder(tmp_path):
    """The smoke grid run from a temporary folder (results into it by --results, relative), and `bnlib status
    study` there reports the committed cells; a closed pipe ends quietly."""
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    done = _bnlib(
        "run",
        "smoke",
        "--results",
        "res",
        "-j",
        "2",
        "--threads",
        "1",
        "--no-progress",
        "--only",
        "seed=0",
        cwd=elsewhere,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (
        list((elsewhere / "res" / "smoke" / "runs").glob("*.json"))
        and (elsewhere / "res" / "smoke" / "summary.csv").exists()
    )
    if any(STUDY_RUNS.glob("*.json")):
        status = _bnlib("status", "study", cwd=elsewhere, env={"BNLIB_RESULTS": ""}, timeout=300)
        assert status.returncode == 0, status.stderr
        assert f"done     {len(list(STUDY_RUNS.glob('*.json')))}" in status.stdout
    piped = subprocess.run(
        f"'{Path(sys.executable).with_name('bnlib')}' status smoke -v --results res | head -1",
        shell=True,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        piped.stdout.startswith("grid smoke") and "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr
    )


def test_every_committed_metrics_file_reads_and_writes_back_unchanged():
    """One schema for every metrics file, the older ones included: read and written back, each is the same JSON."""
    files = sorted(STUDY_RUNS.glob("*.json"))
    if not files:
        pytest.skip("no committed study cells in this checkout")
    for path in files:
        run = record.read_run(path)
        assert json.loads(json.dumps(run.to_dict())) == json.loads(path.read_text()), path.name


def test_a_record_with_an_unknown_key_is_corrupt(tmp_path):
    files = sorted(STUDY_RUNS.glob("*.json"))
    if not files:
        pytest.skip("no committed study cells in this checkout")
    payload = json.loads(files[0].read_text())
    payload["methods"][next(iter(payload["methods"]))]["surprise"] = 1  # a cell need not train BN
    bad = tmp_path / files[0].name
    bad.write_text(json.dumps(payload))
    with pytest.raises(record.CorruptRun, match="surprise"):
        record.read_run(bad)


def test_absent_fields_of_older_files_stay_absent():
    rec = record.MethodRecord.from_dict(
        {
            "train_step": [1],
            "train_loss": [2.0],
            "eval_step": [],
            "eval_size": [],
            "test_acc": [],
            "test_loss": [],
            "test_acc_recomputed": [],
            "test_loss_recomputed": [],
            "diverged": False,
            "diverged_step": None,
            "final": {"test_acc": None},
        }
    )
    assert not rec.test_acc_batchstats and rec.test_acc_batchstats is record.ABSENT
    assert "test_acc_batchstats" not in rec.to_dict() and "test_acc_batchstats" not in rec.to_dict()["final"]


def test_the_notebook_parameters_cell_is_generated_from_config():
    nb = nbformat.read(paths.NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert cell.source == runner.parameters_cell(), "run `python -m bnlib.runner` to regenerate it"
    namespace: dict = {}
    exec(cell.source, namespace)  # noqa: S102 - our own notebook
    for name in train.Config.__dataclass_fields__:  # same names, same defaults (the hand-run budget aside)
        default = getattr(train.Config(), name)
        assert namespace[name] == runner.INTERACTIVE.get(name, default), name
    assert set(runner.RUNNER_PARAMETERS) <= set(namespace)


def test_the_training_fingerprint_covers_every_module_of_the_training_packages_and_nothing_else(tmp_path, monkeypatch):
    files = provenance.training_files()
    assert provenance.code_fingerprint(files) == provenance.TRAINING_SHA256
    assert {f.relative_to(paths.PACKAGE).parts[0] for f in files} == set(provenance.TRAINING_PACKAGES)
    assert paths.PACKAGE / "train" / "loop.py" in files and paths.PACKAGE / "norms" / "batch.py" in files
    assert not any(f.parent == paths.PACKAGE for f in files)  # paper/, grid.py, ... change no number
    # a module added deep inside a training package changes the fingerprint; the same bytes elsewhere do not
    package = tmp_path / "bnlib"
    for f in files:
        (package / f.relative_to(paths.PACKAGE)).parent.mkdir(parents=True, exist_ok=True)
        (package / f.relative_to(paths.PACKAGE)).write_bytes(f.read_bytes())
    monkeypatch.setattr(paths, "PACKAGE", package)
    copied = provenance.code_fingerprint(provenance.training_files())
    assert copied == provenance.TRAINING_SHA256  # keyed by the path relative to bnlib/, not where it lies
    (package / "train" / "deeper").mkdir()
    (package / "train" / "deeper" / "new.py").write_text("X = 1\n")
    assert provenance.code_fingerprint(provenance.training_files()) != copied
    (package / "train" / "deeper" / "new.py").rename(package / "new.py")
    assert provenance.code_fingerprint(provenance.training_files()) == copied


def test_the_training_code_imports_only_its_packages_and_the_allowed_contracts():
    """The fingerprint covers train/ and norms/; whatever else the training code imports from bnlib could change a
    number without making a cell stale, so only the contracts of provenance.TRAINING_CONTRACTS are allowed."""
    import ast

    allowed = set(provenance.TRAINING_PACKAGES) | set(provenance.TRAINING_CONTRACTS)
    outside = []
    for path in provenance.training_files():
        module = path.relative_to(paths.PACKAGE).with_suffix("").parts  # e.g. ("train", "loop")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # from .x / from .. import y
                anchor = module[: len(module) - node.level]  # the package the dots name (without "bnlib")
                if path.name == "__init__.py":
                    anchor = module[: len(module) - node.level + 1]
                target = [*anchor, *(node.module.split(".") if node.module else [])]
                names = [target[0]] if target else [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnlib"):
                parts = node.module.split(".")[1:]
                names = parts[:1] or [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("bnlib.")]
            else:
                continue
            outside += [f"{path.relative_to(paths.PACKAGE)}: {name}" for name in names if name not in allowed]
    assert not outside, f"the training code imports modules outside its fingerprint: {outside}"


def test_the_registry_states_what_each_method_needs():
    assert norms.REGISTRY["bn"].min_batch()[0] == 2 and norms.REGISTRY["gn"].min_batch()[0] == 1
    assert norms.REGISTRY["bnwos"].min_batch()[0] == 2 and norms.REGISTRY["bnwos"].min_batch({"devices": 4})[0] == 4
    running = {m for m, spec in norms.REGISTRY.items() if spec.keeps_running_stats}
    assert {"bn", "bnrs", "brn", "mabn", "bnwos", "gbn"} <= running and not running & {"gn", "bln", "frn", "none"}
    for m, spec in norms.REGISTRY.items():  # the trait says what the layers do
        assert norms.keeps_running_statistics(norms.make(m, 4)) == spec.keeps_running_stats, m
    with pytest.raises(train.ConfigError, match="bnwos splits every batch over 4 devices: use a batch of at least 4"):
        train.validate(train.Config(methods=["bnwos"], batch_size=2, steps=1, norm_options={"bnwos": {"devices": 4}}))


def test_the_methods_table_has_one_row_per_registered_method_and_no_other():
    """bnlib.methods (no torch) is what a method is for the reader; bnlib.norms what it computes. Every registered id
    has a row, in the registry's order, and every row a registered method; the sets the analysis and the training
    name are the table's."""
    from bnlib import analysis, methods, train

    assert list(methods.METHODS) == list(norms.METHODS)
    assert all(m.family in methods.FAMILY_LINES and m.colour in methods.OKABE_ITO for m in methods.TABLE)
    assert methods.ORIGINAL == tuple(train.ORIGINAL_METHODS)
    assert set(analysis.CORNERS) | set(methods.HEADLINE) <= set(methods.METHODS)
    assert {m.id for m in methods.TABLE if m.forward_uses_batch is not None} >= set(analysis.CORNERS)
    # the momentum the book reads off a running-statistics method's id is the one its layers are built with
    swept = {*methods.PANELS["BNRS's momentum"], *methods.PANELS["the original's BNRS, its momentum"]}
    for m in swept:
        assert methods.momentum(m) == norms.make(m, 4).momentum, m
    # the 2x2's corners are what their rows say: batch statistics in the forward pass, and the gradient through them
    for method, (forward, gradient) in analysis.CORNERS.items():
        row = methods.METHODS[method]
        assert (row.forward_uses_batch, row.gradient_through_batch) == (forward == "batch", gradient == "with")


def test_every_method_has_a_style_from_one_colour_blind_safe_palette_and_a_panel():
    from bnlib import analysis, paper

    assert list(plots.STYLES) == list(norms.METHODS)
    assert {colour for _, colour in plots.STYLES.values()} <= set(plots.OKABE_ITO.values())
    assert [m for m, (_, c) in plots.STYLES.items() if c == plots.OKABE_ITO["black"]] == ["bn"]  # the reference's alone
    assert {m for members in plots.PANELS.values() for m in members} | {"bn"} == set(norms.METHODS)
    shown_together = [ms for _, ms in plots.panels(norms.METHODS)] + [paper.study.HEADLINE_METHODS, analysis.CORNERS]
    for methods in shown_together:  # never two lines of one colour in a panel
        assert len(methods) <= 6 and len({plots.colour(m) for m in methods}) == len(methods), methods


@pytest.mark.parametrize("grid_name", sorted(analysis.PLANS))
def test_a_grid_with_a_plan_committed_its_plan_before_its_first_cell(grid_name):
    """Pre-registration, checked from git: the first commit of book/analysis-plan.md that names the plan's grid file
    (as it was named then: ``Plan.grid_file``) is an ancestor of the commit that first added each metrics file now
    under results/<grid>/runs/, followed through renames (a grid moved to another folder keeps its history; cells
    an earlier grid of the same name once had, and no longer has, do not count)."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=paths.ROOT, capture_output=True, text=True, check=True).stdout.strip()

    if git("rev-parse", "--is-shallow-repository") == "true":
        pytest.skip("a shallow clone has no history to check the order in (fetch it with fetch-depth: 0)")
    files = git("ls-files", "--", f"results/{grid_name}/runs/*.json").splitlines()
    if not files:
        return  # no cell committed yet: nothing can precede the plan
    grid_file = analysis.PLANS[grid_name].grid_file
    plans = git("log", f"-S{grid_file}", "--format=%H", "--reverse", "--", "book/analysis-plan.md").splitlines()
    assert plans, f"results/{grid_name}/ has committed cells but book/analysis-plan.md never named {grid_file}"
    for path in files:
        added = git("log", "--follow", "--diff-filter=A", "--format=%H", "--", path).splitlines()[-1]
        ordered = (
            subprocess.run(["git", "merge-base", "--is-ancestor", plans[0], added], cwd=paths.ROOT).returncode == 0
        )
        assert ordered and plans[0] != added, (
            f"the plan for {grid_file} ({plans[0][:10]}) does not precede {path}'s first commit ({added[:10]})"
        )


def test_the_study_plan_lists_exactly_what_was_seen_before_it():
    """The re-run study's plan names what had been seen when it was committed (its first commit naming
    grids/plateau.yaml): the mechanism cells, the short study's and the pilots', by count; git says the same."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=paths.ROOT, capture_output=True, text=True, check=True).stdout.strip()

    if git("rev-parse", "--is-shallow-repository") == "true":
        pytest.skip("a shallow clone has no history to check against (fetch it with fetch-depth: 0)")
    plan = git("log", f"-S{analysis.STUDY.grid_file}", "--format=%H", "--reverse", "--", "book/analysis-plan.md")
    commit = plan.splitlines()[0]

    def cells(grid):
        listed = git("ls-tree", "--name-only", commit, f"results/{grid}/runs/").splitlines()
        return sorted(Path(p).stem for p in listed if p.endswith(".json"))

    mechanism = cells("mechanism")
    assert [c.rsplit("-", 1)[0] for c in mechanism] == [f"fashionmnist-b16-iid-s{s}" for s in range(5)] + [
        f"fashionmnist-b2-iid-s{s}" for s in range(4)
    ]
    said = (paths.BOOK / "analysis-plan.md").read_text().split("(plan-study-seen)=", 1)[1].split("\n\n", 1)[0]
    said = " ".join(said.split())
    assert "Nine cells of the mechanism grid" in said and len(mechanism) == 9
    assert "batch 16 with seeds 0-4 and batch 2 with seeds 0-3" in said
    assert f"The short study's {len(cells('study'))} cells" in said
    assert f"`results/study-pilot/`, {len(cells('study-pilot'))} cells" in said
    assert f"`results/mechanism-pilot/`, {len(cells('mechanism-pilot'))} cells" in said


def test_the_code_passes_the_linter_and_the_formatter():
    """ruff, configured in pyproject.toml (line length 120; pyflakes, pycodestyle, import order, bugbear's bug-prone
    patterns), and ruff's formatter: `ruff check --fix . && ruff format .` mends most of what this finds."""
    ruff = [sys.executable, "-m", "ruff"]
    lint = subprocess.run([*ruff, "check", "--no-cache", "."], cwd=paths.ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-4000:] + lint.stderr[-2000:]
    fmt = subprocess.run(
        [*ruff, "format", "--check", "--no-cache", "."], cwd=paths.ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout[-4000:] + fmt.stderr[-2000:]
    noqa = subprocess.run(
        ["git", "grep", "-nE", r"noqa(: ?E501)?\s*$|noqa: ?E501", "--", "*.py"],
        cwd=paths.ROOT,
        capture_output=True,
        text=True,
    ).stdout
    assert not noqa, f"no blanket or line-length noqa:\n{noqa}"
