"""The published grid: committed results checked for integrity, re-executable with `bnlib verify`, judged
against the original study's claims, and a plain `jupyter-book build .` that builds the book from them."""

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from browser import LAYOUT_SCRIPT, needs_chromium, on_phone, probe  # tests/browser.py

from bnlib import analysis, cli, grid, paper, paths, published, runner, stats, tables, verify
from bnlib.record import read_run

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "results" / "study"
HAS_STUDY = any(STUDY.glob("runs/*.json"))


def _copy_grid(smoke_results, tmp_path) -> Path:
    """A copy of the finished smoke grid as it would be committed: runs and aggregated tables."""
    dst = tmp_path / "res" / "smoke"
    shutil.copytree(smoke_results / "smoke", dst)
    tables.aggregate(dst)
    return dst


# --- integrity of a committed folder --------------------------------------------------------------


def test_published_check_passes_on_a_finished_grid(smoke_results, tmp_path):
    folder = _copy_grid(smoke_results, tmp_path)
    assert published.check(folder) == len(grid.load("smoke").cells)


def test_truncated_metrics_file_is_named(smoke_results, tmp_path):
    folder = _copy_grid(smoke_results, tmp_path)
    victim = sorted((folder / "runs").glob("*.json"))[1]
    victim.write_text(victim.read_text()[:200])  # half a file, as a broken copy leaves it
    with pytest.raises(published.PublishedError, match=re.escape(str(victim))):
        published.check(folder)


def test_missing_notebook_and_stale_summary_are_named(smoke_results, tmp_path):
    folder = _copy_grid(smoke_results, tmp_path)
    notebook = sorted((folder / "runs").glob("*.ipynb"))[0]
    notebook.unlink()
    with pytest.raises(published.PublishedError, match=re.escape(str(notebook))):
        published.check(folder)
    folder = _copy_grid(smoke_results, tmp_path / "again")
    summary = pd.read_csv(folder / "summary.csv")
    summary.loc[0, "mean"] += 0.01  # a number edited by hand, or a CSV not re-aggregated
    summary.to_csv(folder / "summary.csv", index=False)
    with pytest.raises(published.PublishedError, match="summary.csv: differs from a fresh aggregation"):
        published.check(folder)


def _full_colour_png(seed: int = 0) -> str:
    """A matplotlib figure as the inline backend stores it: a full-colour (RGBA) PNG, base64."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.5))
    rng = np.random.default_rng(seed)
    for k in range(4):
        ax.plot(rng.normal(size=200).cumsum(), label=f"seed {k}")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_runner_writes_compact_figures_and_a_full_colour_one_is_named_then_compacted(smoke_results, tmp_path):
    """The runner stores its notebooks' figures as palette PNGs; a full-colour figure (a notebook run by older
    code, or edited) fails the check naming the notebook; `bnlib compact` rewrites it once, nearly pixel-equal."""
    import base64
    import io

    import nbformat
    from PIL import Image

    folder = _copy_grid(smoke_results, tmp_path)
    notebooks = sorted((folder / "runs").glob("*.ipynb"))
    figures = [
        o["data"]["image/png"] for nb in notebooks for o in published._png_outputs(nbformat.read(nb, as_version=4))
    ]
    assert figures and all(published._is_palette_png(f) for f in figures)
    assert published.compact(folder) == (0, 0)  # nothing to do: the runner did it

    victim = notebooks[0]
    nb = nbformat.read(victim, as_version=4)
    original = _full_colour_png()
    nb.cells[-1].setdefault("outputs", []).append(nbformat.v4.new_output("display_data", data={"image/png": original}))
    nbformat.write(nb, victim)
    with pytest.raises(published.PublishedError, match=re.escape(str(victim)) + ".*bnlib compact smoke"):
        published.check(folder)
    assert cli.main(["compact", "smoke", "--results", str(folder.parent)]) == 0
    published.check(folder)
    assert published.compact(folder) == (0, 0)  # idempotent: a finished cell's files change once
    stored = [o["data"]["image/png"] for o in published._png_outputs(nbformat.read(victim, as_version=4))][-1]
    assert len(stored) < 0.6 * len(original)
    before, after = (
        np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"), dtype=float) for b in (original, stored)
    )
    assert before.shape == after.shape and np.abs(before - after).mean() < 1.0  # out of 255: the same picture

    # a path of the machine that ran it (papermill's parameters, a warning's source file): named, then made relative
    nb = nbformat.read(victim, as_version=4)
    printed = "wrote /home/someone/study/results/smoke/runs/x.json; /tmp/venv/lib/site-packages/tqdm/auto.py:21"
    nb.cells[-1]["outputs"].append(nbformat.v4.new_output("stream", name="stderr", text=printed))
    nb.metadata.setdefault("papermill", {})["input_path"] = "/tmp/wt-x/book/notebooks/run.ipynb"
    nbformat.write(nb, victim)
    with pytest.raises(published.PublishedError, match="prints a path of the machine that ran it"):
        published.check(folder)
    assert cli.main(["compact", "smoke", "--results", str(folder.parent)]) == 0
    published.check(folder)
    nb = nbformat.read(victim, as_version=4)
    assert nb.cells[-1]["outputs"][-1]["text"] == "wrote results/smoke/runs/x.json; site-packages/tqdm/auto.py:21"
    assert nb.metadata["papermill"]["input_path"] == "book/notebooks/run.ipynb"
    assert stored in {o["data"]["image/png"] for o in published._png_outputs(nb)}  # figures untouched


def test_no_committed_file_names_a_path_of_the_machine_that_wrote_it():
    """Committed results and book sources hold no absolute path of a machine (/home, /tmp, /work ...): a notebook's
    are made relative by `bnlib compact`, and no table or page types one."""
    import nbformat

    tracked = subprocess.run(
        ["git", "ls-files", "--", "results", "book"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    found = {}
    for name in tracked:
        path = ROOT / name
        if path.suffix == ".ipynb":
            hits = published.machine_paths(nbformat.read(path, as_version=4))
        elif path.suffix in (".md", ".csv", ".json", ".jsonl", ".yaml", ".yml", ".txt", ".bib"):
            hits = published.MACHINE_PATH.findall(path.read_text(errors="replace"))
        else:
            continue
        if hits:
            found[name] = hits[:2]
    assert not found, found


COMMITTED = sorted(
    p.parent.parent.name
    for p in (ROOT / "results").glob("*/runs/*.json")
    if p.parent.parent.name not in ("smoke", "default")
)


@pytest.mark.parametrize("name", sorted(set(COMMITTED)) or ["study"])
def test_committed_results_are_intact(name):
    """Every committed grid folder (the study, the mechanism grids and their pilot): files and fresh aggregates."""
    folder = ROOT / "results" / name
    if not any(folder.glob("runs/*.json")):
        pytest.skip(f"results/{name} holds no finished cell in this checkout")
    assert published.check(folder) >= 1


# --- re-running a grid whose cells are all done, and verify ----------------------------------------


def test_readme_findings_match_the_committed_study():
    """The README's tables are the committed summary's numbers (`bnlib aggregate study --readme`), never typed."""
    if not HAS_STUDY:
        pytest.skip("results/study holds no finished cell in this checkout")
    text = (ROOT / "README.md").read_text()
    start, end = paper.readme.README_MARKERS
    committed = text.split(start, 1)[1].split(end, 1)[0].strip()
    done = len(list(STUDY.glob("runs/*.json")))
    checked = paper.tables.mechanism_tables(grid=paper.tables.BATCHSTATS_GRID)
    expected = paper.readme.readme_findings(
        pd.read_csv(STUDY / "summary.csv"),
        done,
        paper.tables.run_commits(STUDY / "runs"),
        folder=STUDY,
        mechanism=pd.read_csv(ROOT / "results" / paper.tables.MECHANISM_GRID / "analysis.csv"),
        batchstats=checked.summary_batchstats if checked else None,
    )
    assert committed == expected.strip(), (
        "README findings are out of date: run `bnlib aggregate study --readme` and commit"
    )


def test_readme_headline_figure_draws_the_committed_summary():
    """The README's PNG is drawn from the committed summary: the fingerprint of its numbers, kept in the PNG, is
    the committed summary's (`bnlib aggregate study --readme` redraws it)."""
    from PIL import Image

    if not HAS_STUDY:
        pytest.skip("results/study holds no finished cell in this checkout")
    assert f"]({paths.README_FIGURE.relative_to(ROOT).as_posix()})" in (ROOT / "README.md").read_text()
    digest, _ = paper.readme.headline_digest(pd.read_csv(STUDY / "summary.csv"))
    assert Image.open(paths.README_FIGURE).info.get("Description") == f"bnlib headline {digest}", (
        "the README's figure is out of date: run `bnlib aggregate study --readme` and commit"
    )


def test_readme_findings_write_between_the_markers(smoke_results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n" + "\n".join(paper.readme.README_MARKERS) + "\nrest\n")
    summary = pd.read_csv(_copy_grid(smoke_results, tmp_path) / "summary.csv")
    paper.readme.write_readme_findings(summary, 3, readme=readme, commits=["abc1234"])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "(3 cells committed, run with the code" in text
    assert "code of commit abc1234" in text
    assert "BN ends at" in text and ("below" in text or "cannot tell" in text)
    from PIL import Image  # the figure beside the README, with the fingerprint of what it draws

    png = tmp_path / paths.README_FIGURE.relative_to(ROOT)
    assert (
        f"![{paper.readme.HEADLINE_ALT}]" in text
        and Image.open(png).info["Description"] == f"bnlib headline {paper.readme.headline_digest(summary)[0]}"
    )
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        paper.readme.write_readme_findings(summary, 3, readme=readme)


def test_run_on_a_finished_grid_does_nothing_and_says_so(smoke_results, tmp_path, capsys):
    folder = _copy_grid(smoke_results, tmp_path)

    def files():  # every result file (the runner's lock is not a result)
        return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != ".runner.lock"}

    before = files()
    assert cli.main(["run", "smoke", "--results", str(folder.parent), "--no-progress"]) == 0
    n = len(grid.load("smoke").cells)
    assert f"all {n} cells are done; nothing to run" in capsys.readouterr().out
    assert files() == before  # nothing rewritten, nothing re-aggregated


@pytest.mark.slow
def test_verify_reexecutes_a_committed_cell_bit_identically_and_catches_a_changed_number(
    smoke_results, tmp_path, capsys
):
    folder = _copy_grid(smoke_results, tmp_path)
    g = grid.load("smoke")
    chosen = verify.choose([c.id for c in g.cells], 1, seed=1)
    assert chosen == verify.choose(list(reversed([c.id for c in g.cells])), 1, seed=1)  # the same for everyone
    assert cli.main(["verify", "smoke", "--results", str(folder.parent), "--cells", "1"]) == 0
    out = capsys.readouterr().out
    assert chosen[0] in out and "verdict: bit-identical" in out and "1 cell(s) re-executed: 1 bit-identical" in out
    # the same machine and kernels: a committed number the code does not reproduce fails verify, however small
    path = folder / "runs" / f"{chosen[0]}.json"
    payload = json.loads(path.read_text())
    payload["methods"]["bn"]["train_loss"][2] *= 1.0001
    path.write_text(json.dumps(payload))
    assert cli.main(["verify", "smoke", "--results", str(folder.parent), "--cell", chosen[0]]) == 1
    out = capsys.readouterr().out
    assert "verdict: differs: the same kernels, threads and software" in out and "bn train_loss at step 15" in out


MAX_STEPS_IN_CI = 200  # a prefix of the cell, however long the committed cells get


@pytest.mark.slow
def test_the_current_code_reproduces_the_cheapest_committed_study_cell():
    """The committed study counts as run by the current code only while the current code reproduces it
    (``provenance.REPRODUCED_TRAINING_CODE``): re-execute the start of its cheapest cell (`bnlib verify --steps`),
    with the kernels it recorded where this machine has them. Verify's rules decide: bit-identical where the
    kernels and software are the recorded ones, within the measured tolerance elsewhere (another CPU generation,
    or a file that predates the record of its kernels)."""
    if not HAS_STUDY:
        pytest.skip("results/study holds no finished cell in this checkout")
    g = grid.load("study")
    runs = STUDY / "runs"
    done = [
        c
        for c in g.cells
        if runner.state(runs, c) == "done" and "same_training_as" not in json.loads((runs / f"{c.id}.json").read_text())
    ]
    assert done, (
        "no committed study cell counts as run by the current code: re-run them or register a verified fingerprint"
    )
    cell = min(done, key=lambda c: json.loads((runs / f"{c.id}.json").read_text())["wall_seconds"])
    committed = read_run(runs / f"{cell.id}.json")
    steps = min(MAX_STEPS_IN_CI, min(rec.eval_step[0] for rec in committed.methods.values() if rec.eval_step))
    recorded = sorted({s for rec in committed.methods.values() for s in (*rec.train_step, *rec.eval_step)})
    if sum(s <= steps for s in recorded) < 2:  # a long run logs sparsely: a prefix with two recorded numbers a method
        steps = recorded[1]
    [check] = verify.verify(g, ROOT / "results", cells=[cell.id], steps=steps, progress=False)
    assert check.steps_compared == steps and check.compared > len(committed.methods), check.explain()
    assert check.ok, f"{cell.id}: {check.explain()}"


# --- the original study's claims -----------------------------------------------------------------


def _summary(diffs: dict, n: int = 5) -> pd.DataFrame:
    """A summary with given paired differences (points: mean, low, high) per (dataset, batch, method)."""
    rows = []
    for (ds, b, m), (mean, low, high) in diffs.items():
        rows.append(
            {
                "dataset": ds,
                "batch_size": b,
                "sampler": "iid",
                "norm_placement": "all",
                "budget": "50 steps",
                "method": m,
                "n_seeds": n,
                "mean": 0.8,
                "ci_low": 0.7,
                "ci_high": 0.9,
                "diff_vs_bn": mean / 100,
                "diff_ci_low": low / 100,
                "diff_ci_high": high / 100,
            }
        )
    return pd.DataFrame(rows)


def test_original_claims_follow_the_intervals():
    ds = "fashionmnist"
    diffs = {
        (ds, 2, "brn"): (3, 1, 5),
        (ds, 2, "brnc"): (2, -1, 5),
        (ds, 16, "brn"): (0, -1, 1),
        (ds, 16, "brnc"): (0, -1, 1),
        (ds, 2, "bnrs"): (-20, -25, -15),
        (ds, 16, "bnrs"): (-10, -12, -8),
        (ds, 2, "bnwos"): (-60, -70, -50),
        (ds, 16, "bnwos"): (0.1, -0.5, 0.7),
    }
    verdicts = [c["verdict"] for c in paper.original.original_claims(_summary(diffs), ds)]
    assert verdicts == ["holds", "holds", "holds", "holds"]
    flipped = {
        **diffs,
        (ds, 16, "brn"): (2, 0.5, 3.5),
        (ds, 16, "bnrs"): (2, 1, 3),
        (ds, 2, "bnwos"): (1, 0.2, 2),
        (ds, 16, "bnwos"): (-3, -4, -2),
    }
    assert [c["verdict"] for c in paper.original.original_claims(_summary(flipped), ds)] == ["does not hold"] * 4
    unsure = {
        **diffs,
        (ds, 2, "brn"): (1, -1, 3),
        (ds, 2, "brnc"): (1, -1, 3),
        (ds, 16, "bnrs"): (-1, -3, 1),
        (ds, 2, "bnwos"): (-1, -3, 1),
        (ds, 16, "bnwos"): (0, -2, 2),
    }
    assert [c["verdict"] for c in paper.original.original_claims(_summary(unsure), ds)] == ["cannot tell"] * 4
    assert [c["verdict"] for c in paper.original.original_claims(_summary(diffs), "mnist5k")] == [
        "cannot tell"
    ] * 4  # not run


def test_a_planned_grids_claims_follow_the_plans_verdicts_not_the_intervals():
    """On a grid with the re-run study's plan (its summary carries family and verdict), the claims are read from the
    plan's verdicts: BNWoS at batch 16 is *below* by the plan (Holm) though its interval lies within +-1 point, so
    "matches BN at larger batches" does not hold; a dataset without primary rows is judged on its exploratory
    verdicts and labelled so; the page's words name the plan's budgets."""
    ds = "fashionmnist"
    diffs = {
        (d, b, m): (-0.7, -0.8, -0.5)
        for d in (ds, "mnist5k")
        for b in (2, 16, 128)
        for m in ("brn", "brnc", "bnrs", "bnwos")
    }
    summary = _summary(diffs)
    summary["budget"] = summary["batch_size"].map({2: "40000 steps", 16: "8000 steps", 128: "2000 steps"})
    summary["family"] = np.where(summary["dataset"] == ds, "primary", "exploratory")
    summary["verdict"] = "below"
    claims = paper.original.original_claims(summary, ds)
    assert [c["verdict"] for c in claims] == ["does not hold", "holds", "holds", "does not hold"]
    assert {c["family"] for c in claims} == {"primary"}
    assert "bnwos at batch 16: -0.7 [-0.8, -0.5] points, below" in claims[3]["evidence"]
    table = paper.original.claims_table(summary)
    digits = "MNIST (5,000 digits) (exploratory)"
    assert list(table.columns) == [
        "Fashion-MNIST",
        "Fashion-MNIST: amended 2026-12-07",
        digits,
        f"{digits}: amended 2026-12-07",
    ]
    # the amended reading of claim 4: BNWoS at batch 16 is below, but within the margin (TOST) -- unless the summary
    # carries no amended verdict, when the amended reading falls back on the pre-registered one
    assert table.loc[analysis.CLAIMS[3], "Fashion-MNIST"] == "does not hold"
    # the short study (no plan): the same rules off the intervals, labelled exploratory, no amended column
    assert list(paper.original.claims_table(_summary(diffs)).columns) == ["Fashion-MNIST (exploratory)", digits]
    words = paper.original.original_page_budget(summary)
    assert "40,000 steps at batch 2, 8,000 at batch 16 and 2,000 at batch 128" in words["our_budget"]
    assert "Holm over its 12 primary" in paper.study.questions_preamble(summary)
    assert "pre-registered" in paper.study.intro_design(summary)["design_tests"]
    # the short study (no plan): its own rule and words
    assert "Holm-corrected over the grid's" in paper.study.questions_preamble(_summary(diffs))
    assert "equal budget of *samples*" in paper.study.intro_design(_summary(diffs))["design_budget"]


def test_original_numbers_name_their_source():
    orig = paper.tables.original_results()
    assert set(orig["dataset"]) == {"mnist", "cifar100"} and set(orig["batch_size"]) == {2, 16, 128}
    assert set(orig["method"]) == {"bn", "bnrs", "brn", "brnc", "bnwos"} and len(orig) == 30
    assert orig["source"].str.contains("enhuiz/batchnorms").all()
    assert orig.set_index(["dataset", "batch_size", "method"]).loc[("cifar100", 128, "brn"), "final_acc"] == 39.5


# --- the published book, built the way a reader's clone builds it ----------------------------------


def _text(path: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text()))


@pytest.fixture(scope="module")
def published_site(tmp_path_factory, book_build_lock) -> Path:
    """A plain `jupyter-book build .` of the repository (the committed study), into a temporary folder."""
    if not HAS_STUDY:
        pytest.skip("results/study holds no finished cell in this checkout")
    exe = Path(sys.executable).with_name("jupyter-book")
    out = tmp_path_factory.mktemp("published") / "site"  # never the user's _build/
    with book_build_lock:
        proc = subprocess.run(
            [str(exe), "build", str(ROOT), "--path-output", str(out), "--all", "-W", "-n", "--keep-going"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out / "_build" / "html"


def _nan_shown(page: Path) -> list[str]:
    """Where a page's article shows a NaN as a number: 'nan' anywhere a reader reads (code blocks, scripts and
    figures aside), or 'NaN' in a table cell (the Methods page's prose about NaN is not a number)."""
    body = page.read_text()
    body = body[body.find("<article") : body.rfind("</article>")]
    printed = html.unescape(re.sub(r"<[^>]+>", " ", body))  # code output included: where a warning would show
    body = re.sub(r"<(script|style|svg|pre|code)\b.*?</\1>", " ", body, flags=re.S | re.I)
    cells = re.findall(r"<td[^>]*>\s*NaN\s*</td>", body)
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))
    nans = [text[max(0, m.start() - 60) : m.end()] for m in re.finditer(r"(?<![\w-])[+-]?nan(?![\w-])", text)]
    return cells + nans + re.findall(r"\w*Warning: .{0,80}", printed)  # a page's code printing a Python warning


def test_no_chapter_page_shows_a_nan(published_site):
    """No number on the book's chapter pages is NaN: a number without an interval says so ("n = 1, no interval"),
    a setting a cell does not have is a dash; and no page's code prints a Python warning into the page. (The run
    pages show their committed notebooks' own output.)"""
    pages = sorted((published_site / "book").glob("*.html"))
    assert len(pages) >= 8
    shown = {page.stem: found for page in pages if (found := _nan_shown(page))}
    assert not shown, shown


# a placeholder row, a cell pandas cut short ("cann...") or elided ("..."), a truncated frame's "95 rows x 7 columns"
PLACEHOLDERS = re.compile(r"not run yet|not re-run|(?:\.\.\.|…)\s*</t[dh]>|rows × \d+ columns")


def test_no_page_shows_a_placeholder_or_a_cut_off_cell(published_site):
    """Complete grid or not, no published page shows a per-row placeholder ("not run yet", "not re-run") or a table
    pandas cut short (a cell ending in "...", an elided row or column, "95 rows x 7 columns"): an incomplete grid
    says in one line how far it is."""
    pages = [*sorted((published_site / "book").glob("*.html")), published_site / "book" / "runs" / "index.html"]
    shown = {}
    for page in pages:
        body = page.read_text()
        body = body[body.find("<article") : body.rfind("</article>")]
        if found := PLACEHOLDERS.findall(body):
            shown[page.stem] = found[:5]
    assert not shown, shown


# The pages a reader reads through: no table there may need sideways scrolling (the others' may, in a container)
READ_THROUGH = ("intro", "results", "summary")


@pytest.mark.slow
@needs_chromium
def test_published_pages_fit_a_1400_px_window_and_show_the_headline_figure(published_site, tmp_path):
    pages = [
        *sorted(
            p.relative_to(published_site).as_posix()
            for p in (published_site / "book").glob("*.html")
            if not p.name.startswith(("_probe_", "genindex", "search"))
        ),
        "book/runs/index.html",
        sorted(
            p.relative_to(published_site).as_posix()
            for p in (published_site / "book" / "runs" / "cells").glob("*.html")
        )[0],
    ]
    problems = {}
    for page in pages:
        seen = json.loads(probe(published_site, page, LAYOUT_SCRIPT, tmp_path, width=1400))
        bad = {k: seen[k] for k in ("wide", "broken") if seen[k]}
        if seen["page"] > 0:
            bad["page wider than the window (px)"] = seen["page"]
        if Path(page).stem in READ_THROUGH and seen["scrolling"]:
            bad["tables scrolling sideways"] = seen["scrolling"]
        if Path(page).stem == "intro" and not seen["headline"]:
            bad["headline figure"] = "missing or not loaded"
        if Path(page).stem == "intro" and seen["headline"] and seen["headlineBottom"] > 1000:
            bad["headline figure below the first screen (px)"] = seen["headlineBottom"]
        if bad:
            problems[page] = bad
    assert not problems, json.dumps(problems, indent=1)


@pytest.mark.slow
@needs_chromium
def test_published_pages_fit_a_390_px_phone(published_site):
    """On a 390 x 844 phone no published page is wider than the screen (nothing scrolls the page sideways: tables
    scroll in their own container, long ids wrap, the theme's contents drawer stays off the page)."""
    pages = [
        p
        for p in sorted((published_site / "book").glob("*.html"))
        if not p.name.startswith(("_probe_", "genindex", "search"))
    ]
    pages += [
        published_site / "book" / "runs" / "index.html",
        *sorted((published_site / "book/runs/cells").glob("*.html"))[:2],
    ]
    width = "document.documentElement.scrollWidth"
    wider = {p.relative_to(published_site).as_posix(): w for p in pages if (w := on_phone(p, width)) > 390}
    assert not wider, wider


@pytest.mark.slow
def test_plain_jupyter_book_build_shows_the_committed_study(published_site):
    site = published_site
    summary = pd.read_csv(STUDY / "summary.csv")
    text = _text(site / "book" / "summary.html")
    for row in summary.itertuples():
        if not pd.isna(row.ci_low):
            assert f"{100 * row.mean:.1f} [{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}]" in text, row
        if row.method != "bn" and not pd.isna(getattr(row, "diff_ci_low", float("nan"))):
            assert (
                f"{100 * row.diff_vs_bn:+.1f} [{100 * row.diff_ci_low:+.1f}, {100 * row.diff_ci_high:+.1f}]" in text
            ), row
    checked = paper.tables.mechanism_tables(grid=paper.tables.BATCHSTATS_GRID)
    facts = paper.answer.facts(
        paper.tables.tables("study", STUDY),
        pd.read_csv(ROOT / "results" / "mechanism" / "analysis.csv"),
        checked.summary_batchstats if checked else None,
    )
    intro, summary_page = _text(site / "book" / "intro.html"), text
    # one number, one rendering: the numbers the intro and the Summary both state are the same strings
    both = ["bnrs_small_text", "bnrs_large_text", "gn_small_text", "oc_bn_text", "oc_bnrs_text", "oc_gn_text"]
    both += ["oc_bn_own_stats_text"]
    for key in both + ["no_backward_at_text"]:
        assert facts[key] != "–" and facts[key] in intro, key
    for key in both + ["brn_small_text", "brn_large_text"]:
        assert facts[key] in summary_page, key
    assert "Not so for this grid" not in intro + summary_page  # every guarded sentence holds on the published study
    runs = [read_run(p) for p in sorted((STUDY / "runs").glob("*.json"))]  # the evaluation's share of training time
    share = sum(round(r.eval_seconds, 1) for r in runs) / sum(round(r.wall_seconds, 1) for r in runs)
    assert f"evaluation took {share:.0%} of the training time" in _text(site / "book" / "setup.html")
    article = html.unescape(re.sub(r"<[^>]+>", "", (site / "book" / "intro.html").read_text().split("<article", 1)[1]))
    first_screen = article.split("What the original study found", 1)[0]  # the answer, the figure, the abstract first
    assert "Abstract." in first_screen
    assert facts["bnrs_small_text"] in first_screen and facts["oc_bn_text"] in first_screen
    assert 'id="headline-figure"' in (site / "book" / "intro.html").read_text()
    if not (yaml.safe_load(paths.BOOK_CONFIG.read_text()).get("repository") or {}).get("url"):  # a plain build without
        # a repository URL in _config.yml: no launch or repository button that leads nowhere
        for page in [site / "book" / "intro.html", sorted((site / "book" / "runs" / "cells").glob("*.html"))[0]]:
            assert not re.search(r"mybinder\.org|colab\.research|launch-buttons|repository-button", page.read_text()), (
                page.name
            )
    cells = {p.stem for p in (STUDY / "runs").glob("*.json")}
    shown = {p.stem for p in (site / "book" / "runs" / "cells").glob("*.html")}
    assert shown == cells
    runs_page = _text(site / "book" / "runs" / "index.html")
    assert all(c in runs_page for c in cells)
    reproducibility = (site / "book" / "reproducibility.html").read_text()  # printed Markdown tables are tables
    assert (
        re.search(r"<th[^>]*><p>kernels: committed -&gt; re-executed</p></th>", reproducibility)
        or not verify.SAVED_CROSS_ISA.exists()
    )
    original = _text(site / "book" / "original.html")
    assert "This study has no CIFAR-100 cells" in original and re.search(r"holds|does not hold|cannot tell", original)
    slower = paper.original.slower_answer(
        paper.tables.convergence(STUDY)
    )  # "converges slower" read from the committed curves
    if slower:
        assert re.sub(r"\s+", " ", slower) in re.sub(r"\s+", " ", original.replace("\u2019", "'"))


@pytest.mark.slow
def test_plain_jupyter_book_build_shows_the_committed_mechanism_grid(published_site):
    """The mechanism chapter's numbers are the committed results/mechanism/ CSVs': the 2x2 table, its read-outs and
    the textbook checks."""
    folder = ROOT / "results" / "mechanism"
    if not (folder / "summary.csv").exists():
        pytest.skip("results/mechanism holds no finished cell in this checkout")
    text = _text(published_site / "book" / "mechanism.html").replace("\u2019", "'")  # smart quotes back to plain
    text = re.sub(r"\s+", " ", text)
    comparisons, summary = pd.read_csv(folder / "analysis.csv"), pd.read_csv(folder / "summary.csv")
    corners = summary[summary["method"].isin(["bn", "bn_detached", "brn", "bnrs"])]
    for row in corners.itertuples():
        assert paper.words.percent_interval(row.mean, row.ci_low, row.ci_high) in text, row
    accuracy = comparisons[comparisons["outcome"] == "accuracy"]
    effects = accuracy[accuracy["comparison"].str.startswith("2x2: ")]
    assert len(effects)
    for row in effects.itertuples():
        assert (
            f"{paper.words.percent_interval(row.mean, row.ci_low, row.ci_high, signed=True)} "
            f"{row.verdict} ({row.family})" in text
        ), row
    simple = accuracy[accuracy["comparison"].str.startswith("2x2 simple: ")]  # the amended read-out's table
    assert len(simple)
    for row in simple.itertuples():
        assert f"{paper.words.percent_interval(row.mean, row.ci_low, row.ci_high, signed=True)} {row.verdict}" in text
    traces = pd.read_csv(folder / "traces_summary.csv")
    t = paper.tables.mechanism_tables(folder)
    readouts = [
        paper.mechanism.twobytwo_answer(comparisons),
        paper.mechanism.trace_answer(traces),
        paper.mechanism.textbook_answer(paper.mechanism.textbook_checks(comparisons, traces)),
        paper.mechanism.split_answer(summary, comparisons),
        paper.mechanism.failure_answer(comparisons),
        paper.mechanism.sweep_answer(t.summary, comparisons, t.evaluations),
        paper.mechanism.fixes_answer(t.summary, comparisons, t.evaluations),
        paper.reversal.one_class_answer(analysis.sampler_cost(t.evaluations)),
        paper.mechanism.plateau_answer(pd.read_csv(folder / "plateau.csv")),
    ]
    robust = ROOT / "results" / paper.tables.ROBUSTNESS_GRID / "plateau.csv"
    readouts += (
        [paper.mechanism.plateau_answer(pd.read_csv(robust), by=paper.words.BY_OPTIMISATION)] if robust.exists() else []
    )
    if (checked := paper.tables.mechanism_tables(grid=paper.tables.BATCHSTATS_GRID)) is not None:
        readouts.append(
            paper.reversal.batchstats_answer(checked.evaluations, analysis.evaluation_gap(checked.evaluations))
        )
    for line in "\n".join(readouts).splitlines():
        assert re.sub(r"\s+", " ", line.replace("**", "").strip().removeprefix("- ")) in text, line


@pytest.mark.parametrize("name", sorted(analysis.PLANS))
def test_every_claim_of_a_planned_grid_stands_where_bn_plateaued(name):
    """A planned grid's primary comparisons (the book's claims) are only where its committed plateau.csv says BN
    plateaued by the plan's criterion; a primary comparison where BN did not is counted as exploratory, with a note."""
    folder = ROOT / "results" / name
    if not (folder / "analysis.csv").exists():
        pytest.skip(f"results/{name} holds no analysed cell in this checkout")
    comparisons, plateau = pd.read_csv(folder / "analysis.csv"), pd.read_csv(folder / "plateau.csv")
    bn = plateau[plateau["method"] == "bn"].set_index(["batch_size", "sampler"])["plateaued"]
    primary = comparisons[comparisons["family"] == "primary"]
    for row in primary.itertuples():
        assert bool(bn.get((row.batch_size, row.sampler), False)), row
    demoted = comparisons[comparisons["note"].fillna("").str.contains("BN not plateaued")]
    for row in demoted.itertuples():
        assert not bn.get((row.batch_size, row.sampler), False) and row.family == "exploratory", row


ANALYSED = sorted({p.parent.name for p in (ROOT / "results").glob("*/analysis.csv")})


@pytest.mark.parametrize("name", ANALYSED or ["study"])
def test_no_family_counts_a_comparison_twice(name):
    """Each committed analysis.csv holds every comparison once per condition and outcome, so a family's size and its
    adjusted p-values are those of the comparisons it names (a method against BN that is also an exploratory pair,
    such as cbn - bn, was once counted twice)."""
    path = ROOT / "results" / name / "analysis.csv"
    if not path.exists():
        pytest.skip(f"results/{name} holds no analysed cell in this checkout")
    comparisons = pd.read_csv(path)
    keys = [k for k in stats.CONDITION_KEYS if k in comparisons] + ["comparison", "outcome"]
    assert not comparisons.duplicated([k for k in keys if k in comparisons]).any()
