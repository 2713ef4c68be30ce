"""The book builds from the smoke grid's results, its numbers match summary.csv, and it renders in a browser."""

import html
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from browser import CHROMIUM_FLAGS, chromium, needs_chromium, probe  # tests/browser.py

from bnlib import grid, paper, plots

pytestmark = pytest.mark.slow


REPOSITORY = "https://github.com/example-org/bnlib"  # as a fork's CI would set it


@pytest.fixture(scope="module")
def site(smoke_results, tmp_path_factory, book_build_lock) -> Path:
    # -W: any warning fails the build; into a temporary folder, never over the user's _build/;
    # with a repository URL, so the launch and repository buttons are built too
    old = os.environ.get("BNLIB_REPOSITORY_URL")
    os.environ["BNLIB_REPOSITORY_URL"] = REPOSITORY
    try:
        with book_build_lock:
            index = paper.site.build("smoke", smoke_results, strict=True, output=tmp_path_factory.mktemp("book"))
    finally:
        os.environ.pop("BNLIB_REPOSITORY_URL") if old is None else os.environ.__setitem__("BNLIB_REPOSITORY_URL", old)
    assert index.exists()
    return index.parent


def _text(path: Path) -> str:
    # tags removed without a space: highlighted code and glued numbers are split across <span>s
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text()))


def test_every_page_is_built(site):
    for page in (
        "intro",
        "methods",
        "setup",
        "results",
        "controls",
        "summary",
        "more-figures",
        "reproducibility",
        "operations",
        "runs/index",
    ):
        assert (site / "book" / f"{page}.html").exists(), page
    cells = list((site / "book" / "runs" / "cells").glob("*.html"))
    assert len(cells) == len(grid.load("smoke").cells)


def test_summary_numbers_match_summary_csv(site, smoke_results):
    text = _text(site / "book" / "summary.html")
    summary = pd.read_csv(smoke_results / "smoke" / "summary.csv")
    assert len(summary) == 3 * 9  # conditions x methods
    for row in summary.itertuples():  # an interval from 3 seeds on, below that 'n = 2, no interval'
        expected = paper.words.percent_interval(row.mean, row.ci_low, row.ci_high, n=row.n_seeds)
        assert expected in text, (row.method, row.batch_size, expected)
        if row.method != "bn":
            diff = (row.diff_vs_bn, row.diff_ci_low, row.diff_ci_high)
            assert paper.words.percent_interval(*diff, signed=True, n=row.n_pairs) in text
    # the glued answer: BN's accuracy and BNRS's paired difference at the smallest i.i.d. batch
    iid = summary[(summary.sampler == "iid") & (summary.norm_placement == "all")]
    small = iid[iid.batch_size == iid.batch_size.min()].set_index("method")
    intro = _text(site / "book" / "intro.html")
    assert f"{100 * small.loc['bn', 'mean']:.1f}%" in intro
    assert f"{100 * small.loc['bnrs', 'diff_vs_bn']:+.1f} points" in intro
    assert "glue" not in intro.lower() or "{glue" not in intro  # every glue reference resolved


def test_methods_page_shows_the_code_that_ran(site):
    text = _text(site / "book" / "methods.html") + _text(site / "book" / "other-methods.html")  # and its appendix
    for cls in (
        "class BatchNorm(",
        "class RunningStatsBatchNorm(",
        "class BatchRenorm(",
        "class UnsyncedBatchNorm(",
        "class MovingAverageBatchNorm(",
        "class BatchlessNorm(",
        "def recompute_statistics(",
    ):
        assert cls in text, cls


def test_no_page_references_a_missing_file(site):
    checked = 0
    for page in site.rglob("*.html"):
        for src in re.findall(r'<img[^>]+src="([^"]+)"', page.read_text()):
            if src.startswith("data:"):
                continue
            assert (page.parent / src.split("#")[0]).resolve().exists(), (page, src)
            checked += 1
    assert checked >= 5  # the results page has figures


@needs_chromium
def test_summary_and_results_render_in_a_browser_without_broken_images(site, tmp_path):
    for page in ("summary", "results"):
        source = site / "book" / f"{page}.html"
        probe = source.with_name(f"_probe_{page}.html")
        # after load, the page titles itself with the images that failed to load
        script = (
            "<script>window.addEventListener('load',()=>{const bad=[...document.images]"
            ".filter(i=>!(i.complete&&i.naturalWidth>0)).map(i=>i.src);"
            "document.title='IMAGES '+document.images.length+' BROKEN '+bad.length+' '+bad.join(' ');});</script>"
        )
        probe.write_text(source.read_text().replace("</body>", script + "</body>"))
        try:
            dom = subprocess.run(
                [
                    chromium(),
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={tmp_path / 'profile'}",
                    "--virtual-time-budget=10000",
                    "--dump-dom",
                    probe.as_uri(),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
            title = re.search(r"<title>(IMAGES[^<]*)</title>", dom)
            assert title, dom[:500]
            images, broken = map(int, re.match(r"IMAGES (\d+) BROKEN (\d+)", title.group(1)).groups())
            assert broken == 0, title.group(1)
            if page == "results":
                assert images >= 5
            shot = tmp_path / f"{page}.png"
            subprocess.run(
                [
                    chromium(),
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1280,2400",
                    f"--screenshot={shot}",
                    source.as_uri(),
                ],
                capture_output=True,
                timeout=120,
            )
            assert shot.exists() and shot.stat().st_size > 20_000
        finally:
            probe.unlink(missing_ok=True)


@needs_chromium
def test_equations_typeset_offline(site, tmp_path):
    """MathJax ships with the site (no CDN): the methods page's equations are typeset without a network."""
    dom = subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            (site / "book" / "methods.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert dom.count("<mjx-container") >= 10


def test_citations_link_to_the_references_page(site):
    intro = (site / "book" / "intro.html").read_text()
    targets = set(re.findall(r'href="references\.html#([^"]+)"', intro))
    assert len(targets) >= 5  # the original study, BN, BRN, MABN, BLN, GN, ...
    refs = (site / "book" / "references.html").read_text()
    for target in targets:
        assert f'id="{target}"' in refs, target
    text = _text(site / "book" / "references.html")
    for needle in ("Ioffe", "Batch renormalization", "Group normalization", "Batchless", "enhuiz/batchnorms"):
        assert needle.lower() in text.lower(), needle


@needs_chromium
def test_runs_table_sorts_by_a_clicked_column(site, tmp_path):
    script = (
        "const t=document.querySelector('table.bnlib-sortable');const hs=[...t.querySelectorAll('thead th')];"
        "const col=hs.findIndex(h=>h.textContent.trim()==='seed');"
        "const seeds=()=>[...t.tBodies[0].rows].map(r=>r.cells[col].textContent.trim()).join(',');"
        "hs[col].click();const up=seeds();hs[col].click();document.title='PROBE '+up+' | '+seeds();"
    )
    up, down = probe(site, "book/runs/index.html", script, tmp_path).split(" | ")
    up, down = [int(v) for v in up.split(",")], [int(v) for v in down.split(",")]
    assert up == sorted(up) and down == sorted(up, reverse=True) and len(set(up)) > 1


@needs_chromium
def test_result_figures_fill_the_content_column(site, tmp_path):
    script = (
        "const main=document.querySelector('main article')||document.querySelector('article');"
        "const w=main.getBoundingClientRect().width;"
        "const figs=[...document.images].filter(i=>i.naturalWidth>600);"
        "document.title='PROBE '+figs.map(i=>(i.getBoundingClientRect().width/w).toFixed(3)).join(',');"
    )
    ratios = [float(v) for v in probe(site, "book/results.html", script, tmp_path).split(",") if v]
    assert ratios and min(ratios) >= 0.9, ratios


def test_pages_offer_their_source_and_cell_pages_their_notebook_for_download(site):
    """The theme's download menu: every computed page its MyST source, every cell page its executed .ipynb."""
    for page in [site / "book" / "results.html", *sorted((site / "book" / "runs" / "cells").glob("*.html"))[:2]]:
        links = re.findall(r'href="([^"]*_sources/[^"]*)"[^>]*>', page.read_text())
        assert links, f"{page.name}: no download link"
        target = (page.parent / links[0]).resolve()
        assert target.exists() and target.stat().st_size > 0, target
        if "cells" in page.parts:
            assert target.suffix == ".ipynb" and '"outputs"' in target.read_text()  # the notebook as it ran


def test_cell_pages_launch_their_committed_notebook_on_binder_and_colab(site):
    cell = sorted((site / "book" / "runs" / "cells").glob("*.html"))[0]
    committed = f"results/smoke/runs/{cell.stem}.ipynb"  # book/runs/cells/ is a build-time copy, not in git
    page = cell.read_text()
    assert f"https://mybinder.org/v2/gh/example-org/bnlib/main?urlpath=lab/tree/{committed}" in page
    assert f"https://colab.research.google.com/github/example-org/bnlib/blob/main/{committed}" in page
    results_page = (site / "book" / "results.html").read_text()
    assert f'href="{REPOSITORY}"' in results_page  # the repository button
    assert (
        "colab.research.google.com" not in results_page and "mybinder.org" not in results_page
    )  # a MyST page is no notebook to them
    assert "download-notebook-button" in results_page  # but it can be downloaded as one


def test_repository_url_comes_from_one_place_at_a_time(monkeypatch):
    for var in ("BNLIB_REPOSITORY_URL", "GITHUB_REPOSITORY", "GITHUB_SERVER_URL"):
        monkeypatch.delenv(var, raising=False)
    assert paper.site.repository_url() is None  # _config.yml names none: a local build has no buttons
    monkeypatch.setenv("GITHUB_REPOSITORY", "someone/fork")
    assert paper.site.repository_url() == "https://github.com/someone/fork"  # a fork's Actions build opens the fork
    monkeypatch.setenv("BNLIB_REPOSITORY_URL", "https://gitlab.com/x/y/")
    assert paper.site.repository_url() == "https://gitlab.com/x/y"


def test_every_method_has_one_family_and_figures_draw_each_family_in_its_own_line_style():
    import numpy as np
    import pandas as pd

    from bnlib import norms, plots

    members = [m for ms, _, _ in plots.FAMILIES.values() for m in ms]
    assert sorted(members) == sorted(norms.METHODS)  # every method in exactly one family
    assert len({p for _, p, _ in plots.FAMILIES.values()}) == len(plots.FAMILIES)  # a pattern per family
    assert (
        plots.style_key().count("\n- ") == len(plots.FAMILIES) - 1
        and "dash-dot: running statistics, the original" in plots.style_key()
    )
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        [
            {"method": m, "samples_seen": x, "test_acc": rng.random(), "seed": s, "batch_size": b}
            for m in norms.METHODS
            for x in (1, 2)
            for s in (0, 1)
            for b in (2, 16)
        ]
    )
    fig = plots.accuracy_over_training(frame)
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert [lg.get_title().get_text() for lg in legends] == list(plots.PANELS)  # a row per panel, its legend beside it
    by_name = {plots.display_name(m): m for m in norms.METHODS}
    listed = []
    for legend, (title, methods) in zip(legends, plots.panels(norms.METHODS)):
        drawn = {by_name[t.get_text().replace("\n", " ")]: h for t, h in zip(legend.texts, legend.legend_handles)}
        assert list(drawn) == methods and len(drawn) <= 6 and methods[0] == "bn", title
        listed += methods
        for m, handle in drawn.items():
            assert handle.get_color() == plots.colour(m)
            pattern = handle._unscaled_dash_pattern[1]  # matplotlib keeps the on/off lengths as given
            assert tuple(pattern or ()) == plots.dashes(m), m
    assert set(listed) == set(norms.METHODS)
    for ax in fig.axes[:2]:  # the first row: BN and its variants, one line (and band) per method per batch size
        assert [line.get_color() for line in ax.get_lines()] == [
            plots.colour(m) for m in plots.panels(norms.METHODS)[0][1]
        ]
    summary = pd.DataFrame(
        [
            {"method": m, "batch_size": b, "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}
            for m in norms.METHODS
            for b in (2, 16)
        ]
    )
    containers = [
        c for ax in plots.final_vs_batch(summary).axes for c in ax.containers
    ]  # one errorbar per method and panel
    assert sorted({c.get_label() for c in containers}) == sorted(norms.METHODS)
    for c in containers:
        assert tuple(c.lines[0]._unscaled_dash_pattern[1] or ()) == plots.dashes(c.get_label()), c.get_label()


def _summary_with_verdicts():
    """A summary of two samplers x two batch sizes whose verdicts are known: BNRS below BN at i.i.d. batch 2,
    GroupNorm above BN at non-i.i.d. batch 2, everything else cannot tell."""
    rows = []
    for sampler in ("iid", "noniid"):
        for b in (2, 16):
            for m in ("bn", "bnrs", "gn"):
                d = {
                    "bnrs": -0.10 if (sampler, b) == ("iid", 2) else -0.01,
                    "gn": 0.05 if (sampler, b) == ("noniid", 2) else 0.0,
                }.get(m)
                verdict = None if m == "bn" else ("below" if d == -0.10 else "above" if d == 0.05 else "cannot tell")
                rows.append(
                    {
                        "dataset": "fashionmnist",
                        "sampler": sampler,
                        "budget": "6400 samples",
                        "norm_placement": "all",
                        "batch_size": b,
                        "method": m,
                        "n_seeds": 5,
                        "mean": 0.8 + (d or 0),
                        "ci_low": 0.7,
                        "ci_high": 0.9,
                        "diff_vs_bn": d,
                        "diff_ci_low": None if d is None else d - 0.02,
                        "diff_ci_high": None if d is None else d + 0.02,
                        "verdict": verdict,
                        "p_holm": None if d is None else (0.001 if verdict != "cannot tell" else 0.5),
                        "wins": None if d is None else (5 if (d or 0) > 0 else 0),
                        "n_pairs": None if d is None else 5,
                    }
                )
    return pd.DataFrame(rows)


def test_results_by_question_state_each_verdict_from_the_summary():
    from bnlib import plots

    summary = _summary_with_verdicts()
    iid = paper.tables.headline_condition(summary, "iid")
    assert set(iid["sampler"]) == {"iid"} and set(paper.tables.headline_condition(summary, "noniid")["sampler"]) == {
        "noniid"
    }
    table = paper.study.versus_bn(iid, ["bnrs", "gn", "bn"])
    assert list(table.index) == [
        ("BN, running stats (BNRS)", 2),
        ("BN, running stats (BNRS)", 16),
        ("GroupNorm (GN)", 2),
        ("GroupNorm (GN)", 16),
    ]
    assert list(table["verdict"]) == ["below", "cannot tell", "cannot tell", "cannot tell"]
    assert table.loc[("BN, running stats (BNRS)", 2), "vs BN (points)"] == "-10.0 [-12.0, -8.0]"
    assert table.loc[("BN, running stats (BNRS)", 2), "wins"] == "0/5"
    assert paper.study.verdict_sentence(iid, "bnrs") == (
        "BN, running stats (BNRS) against BN: -10.0 [-12.0, -8.0] points at batch 2 (below); "
        "-1.0 [-3.0, +1.0] points at batch 16 (cannot tell)."
    )
    advice = paper.study.advice(summary)
    assert advice.loc["i.i.d., 2", "use (above BN)"] == "BN: nothing is above it"
    assert advice.loc["i.i.d., 2", "avoid (below BN)"] == "BN, running stats (BNRS)"
    assert (
        advice.loc["non-i.i.d., 2", "use (above BN)"] == "GroupNorm (GN)"
        and advice.loc["non-i.i.d., 2", "avoid (below BN)"] == "none"
    )
    assert advice.loc["i.i.d., 16", "cannot tell from BN"] == 2
    fig = plots.differences(paper.tables.headline_condition(summary, "noniid"), ["bnrs", "gn"])
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["batch 2", "batch 16"]
    colours = [c.lines[0].get_color() for c in panels[0].containers]  # BNRS cannot tell, GroupNorm above, at batch 2
    assert colours == [plots.VERDICT_COLOURS["cannot tell"], plots.VERDICT_COLOURS["above"]]


def test_every_figure_of_the_book_has_alt_text(site):
    """A figure's alt text says what it draws (plots.describe, via the SVG's title) - never its file name."""
    pages = [*sorted((site / "book").glob("*.html")), sorted((site / "book" / "runs" / "cells").glob("*.html"))[0]]
    seen = 0
    for page in pages:
        for alt in re.findall(r'<img alt="([^"]*)"', page.read_text()):
            assert alt.strip() and not alt.endswith((".svg", ".png")), (page.name, alt)
            seen += 1
    assert seen >= 5


def test_a_figure_describes_itself_from_its_labels_panels_and_legends():
    import numpy as np

    from bnlib import plots

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        [
            {"method": m, "samples_seen": x, "test_acc": rng.random(), "seed": s, "batch_size": b}
            for m in ("bn", "bnrs", "gn")
            for x in (1, 2)
            for s in (0, 1)
            for b in (2, 16)
        ]
    )
    text = plots.describe(plots.accuracy_over_training(frame))
    assert text.startswith("test accuracy (%) against samples seen; panels: batch 2, batch 16;")
    assert (
        "running statistics in training: BN, BN, running stats (BNRS)" in text
        and "batch-independent: BN, GroupNorm (GN)" in text
    )


def test_figure_text_stays_readable_at_the_book_column_width():
    """Every figure function, drawn with every method: scaled to the article column (a wider SVG is shrunk),
    its smallest text is at least plots.MIN_TEXT_PT."""
    import io

    import matplotlib
    import numpy as np
    from matplotlib.text import Text

    from bnlib import norms, plots

    matplotlib.use("Agg")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        [
            {
                "method": m,
                "samples_seen": x,
                "test_acc": rng.random(),
                "train_loss": rng.random() + 0.1,
                "seed": s,
                "batch_size": b,
            }
            for m in norms.METHODS
            for x in (1000, 6000)
            for s in (0, 1)
            for b in (2, 16, 128)
        ]
    )
    summary = pd.DataFrame(
        [
            {
                "method": m,
                "batch_size": b,
                "sampler": sampler,
                "mean": 0.5,
                "ci_low": 0.4,
                "ci_high": 0.6,
                "diff_vs_bn": 0.01,
                "diff_ci_low": 0.0,
                "diff_ci_high": 0.02,
                "verdict": "cannot tell",
            }
            for m in norms.METHODS
            for b in (2, 16, 128)
            for sampler in ("iid", "noniid")
        ]
    )
    traces = pd.DataFrame(
        [
            {"condition": c, "method": m, "seed": s, "step": st, **{k: rng.random() + 0.1 for k in plots.TRACE_LABELS}}
            for c in ("i.i.d., 16", "i.i.d., 2", "non-i.i.d., 2")
            for m in ("bn", "bn_detached", "brn", "bnrs")
            for s in (0, 1)
            for st in (10, 20)
        ]
    )
    halfwidths = pd.DataFrame(
        [{"method": m, "n_seeds": n, "halfwidth_points": 1.0 / n} for m in norms.METHODS if m != "bn" for n in (2, 3)]
    )
    iid = summary[summary["sampler"] == "iid"]
    figures = {
        "accuracy": plots.accuracy_over_training(frame),
        "loss": plots.loss_over_training(frame),
        "final": plots.final_vs_batch(summary, col="sampler"),
        "headline": plots.headline_figure(iid, paper.study.HEADLINE_METHODS),
        "differences": plots.differences(iid, [m for m in norms.METHODS if m != "bn"][:7]),
        "seeds": plots.seeds_needed(halfwidths),
        "traces": plots.traces_over_training(traces, ["bn", "bn_detached", "brn", "bnrs"]).figure,
    }
    for name, fig in figures.items():
        svg = io.StringIO()
        fig.savefig(svg, format="svg", bbox_inches="tight")
        width = float(re.search(r'width="([\d.]+)pt"', svg.getvalue()).group(1))
        smallest = min(t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip())
        assert smallest * min(1.0, plots.COLUMN_PT / width) >= plots.MIN_TEXT_PT, (name, width, smallest)


def test_the_2x2_answer_reads_out_each_effect_with_its_verdict_and_family():
    from bnlib import analysis

    rows = [
        {
            "comparison": f"2x2: {name}",
            "outcome": outcome,
            "batch_size": 16,
            "sampler": "iid",
            "n_seeds": 5,
            "mean": mean,
            "ci_low": mean - 0.01,
            "ci_high": mean + 0.01,
            "verdict": verdict,
            "family": "primary",
        }
        for (name, mean, verdict) in zip(analysis.EFFECTS, (0.0, -0.2, 0.005), ("equivalent", "below", "cannot tell"))
        for outcome in ("accuracy", "training loss")
    ]
    text = paper.mechanism.twobytwo_answer(pd.DataFrame(rows))
    assert text.count("\n") == 0 and text.startswith("- **i.i.d. batch 16** (5 seeds): ")
    assert "normalising with running instead of batch statistics +0.0 [-1.0, +1.0] points (equivalent, primary)" in text
    assert "leaving out the normalising backward pass -20.0 [-21.0, -19.0] points (below, primary)" in text


def _rows(**effects) -> pd.DataFrame:
    """Comparison rows at i.i.d. batch 2 and non-i.i.d. batch 2: name -> (mean, verdict), interval +-1 point."""
    return pd.DataFrame(
        [
            {
                "comparison": name,
                "outcome": "accuracy",
                "batch_size": 2,
                "sampler": sampler,
                "n_seeds": 5,
                "mean": mean,
                "ci_low": mean - 0.01,
                "ci_high": mean + 0.01,
                "verdict": verdict,
                "family": "exploratory",
            }
            for key, (mean, verdict) in effects.items()
            for sampler in ("iid", "noniid")
            for name in [
                key.replace("__", " - ")
                .replace("_FWD", "2x2: forward statistics (running - batch)")
                .replace("_GRAD", "2x2: gradient through the statistics (without - with)")
            ]
        ]
    )


def _traces(weights: dict) -> pd.DataFrame:
    """A traces_summary with the given end-of-training weight norms per method (one layer, both conditions)."""
    return pd.DataFrame(
        [
            {
                "batch_size": 2,
                "sampler": s,
                "method": m,
                "layer": 1,
                "phase": phase,
                "step": 1,
                "n_seeds": 5,
                "log_r_p90": 0.1,
                "d_p90": 0.1,
                "conv_weight_norm": w if phase == "last" else 3.0,
                "gamma_norm": 1.0,
                "input_rms": 1.0,
                "conv_grad_norm": 1.0,
            }
            for m, w in weights.items()
            for s in ("iid", "noniid")
            for phase in ("first", "last")
        ]
    )


def test_textbook_checks_read_each_account_by_its_rule():
    rows = _rows(_GRAD=(-0.2, "below"), _FWD=(0.0, "equivalent"), brn__bn=(0.0, "cannot tell"))
    grown = paper.mechanism.textbook_checks(rows, _traces({"bn": 5.0, "bn_detached": 30.0, "bnrs": 20.0}))
    assert list(grown["the data"]) == ["agrees", "agrees", "contradicts", "contradicts", "cannot tell", "cannot tell"]
    assert "bn_detached 6x BN's, BNRS 4x BN's" in grown["what the data say"].iloc[0]
    # the gradient's effect without the weights' growth is not the account's mechanism: it cannot tell
    flat = paper.mechanism.textbook_checks(rows, _traces({"bn": 5.0, "bn_detached": 4.0, "bnrs": 20.0}))
    assert flat["the data"].iloc[0] == "cannot tell"
    # an account of small batches is not read at a large i.i.d. batch
    large = rows.assign(batch_size=16)
    assert "Batch Renormalization beats BN with small or non-i.i.d. batches" in set(
        paper.mechanism.textbook_checks(large)["account"]
    )
    assert set(paper.mechanism.textbook_checks(large[large.sampler == "iid"])["account"]) == {
        c["account"] for c in paper.mechanism.TEXTBOOK[:2]
    }
    text = paper.mechanism.textbook_answer(grown)
    assert text.count("\n  - ") == 6 and "**contradicts**" in text


def test_sweep_and_reversal_read_outs_quote_their_rows():
    summary = pd.DataFrame(
        [
            {"batch_size": 2, "sampler": s, "method": m, "mean": acc, "n_seeds": 1 if m == "bnrs_m001" else 5}
            for s in ("iid", "noniid")
            for m, acc in (("bn", 0.2), ("bnrs", 0.6), ("bnrs_m001", 0.5), ("bnrs_m100", 0.7), ("brn", 0.65))
        ]
    )
    rows = _rows(
        bnrs_m001__bnrs=(-0.1, "below"),
        bnrs_m100__bnrs=(0.1, "above"),
        bnrs_orig_m100__bn_detached=(0.0, "equivalent"),
        bnrs__bn=(0.4, "above"),
    )
    sweep = paper.mechanism.sweep_answer(summary, rows).splitlines()
    # each value says its seeds: a sweep value can have fewer than its base
    assert sweep[0] == (
        "- **i.i.d. batch 2**: momentum 0.01 50.0% (1 seed), -10.0 [-11.0, -9.0] points (below, exploratory) "
        "against 0.1; momentum 0.1 (BNRS) 60.0% (5 seeds); momentum 1 70.0% (5 seeds), +10.0 [+9.0, +11.0] "
        "points (above, exploratory) "
        "against 0.1. The original's BNRS at momentum 1 against bn_detached: +0.0 [-1.0, +1.0] points "
        "(equivalent, exploratory)."
    )
    # with evaluations: the same network is judged with recomputed statistics, where inference statistics cannot differ
    evals = pd.DataFrame(
        [
            {"seed": seed, "method": m, "batch_size": 2, "sampler": "iid", "final": True, "test_acc_recomputed": a}
            for seed, pair in enumerate(((0.5, 0.5), (0.6, 0.6)))
            for m, a in zip(("bnrs_orig_m100", "bn_detached"), pair)
        ]
    )
    same = paper.mechanism.sweep_answer(summary, rows, evals).splitlines()[0]
    assert same.endswith(
        "(equivalent, exploratory); with recomputed population statistics the two get the same number of "
        "test images right in 2 of 2 seeds: what they train is the same, and the gap is in what momentum 1 "
        "keeps for inference, the last batch's statistics."
    )
    apart = paper.mechanism.sweep_answer(
        summary, rows, evals.assign(test_acc_recomputed=[0.5, 0.5, 0.6, 0.61])
    ).splitlines()[0]
    assert apart.endswith("in 1 of 2 seeds (the largest difference 1.00 points).")
    losses = pd.DataFrame(
        [
            {"cell": f"c{m}", "method": m, "step": 10, "batch_size": 2, "sampler": "noniid", "train_loss": loss}
            for m, loss in (("bn", 0.2), ("bnrs", 0.8), ("brn", 1.0))
        ]
    )
    text = paper.reversal.reversal_answer(summary, summary, losses, rows)
    assert text.startswith(
        "- **non-i.i.d. batch 2** (5 seeds): BNRS - BN +40.0 [+39.0, +41.0] points (above, exploratory)."
    )
    assert "BN: training loss 0.20, test accuracy 20.0%" in text and "train/test mismatch" in text
    worse = paper.reversal.reversal_answer(summary, summary, losses.assign(train_loss=[2.0, 0.8, 1.0]), rows)
    assert "fails to train" in worse
    # with traces: BRN's gap between batch and running statistics, first and last trace, beside i.i.d. batches
    traces = pd.DataFrame(
        [
            {
                "batch_size": 2,
                "sampler": s,
                "method": "brn",
                "layer": layer,
                "phase": phase,
                "n_seeds": 5,
                "log_r_p90": (0.3 if phase == "first" else (0.9 if s == "noniid" else 0.4)) + 0.01 * layer,
                "d_p90": 0.5,
            }
            for s in ("iid", "noniid")
            for phase in ("first", "half", "last")
            for layer in (1, 2)
        ]
    )
    traced = paper.reversal.reversal_answer(summary, summary, losses, rows, trace_summary=traces)
    assert traced.endswith(
        "measured in BRN (its traced r = sigma_B / sigma_running and d, 90th percentiles over channels): "
        "|log r| 0.32 at the first trace and 0.92 at the last, |d| 0.50 and 0.50; with i.i.d. batches of "
        "2: |log r| 0.32 at the first trace and 0.42 at the last, |d| 0.50 and 0.50."
    )
    assert (
        paper.reversal.reversal_answer(summary, summary, losses, rows, trace_summary=traces[traces.sampler == "iid"])
        == text
    )


def _condition_rows(budgets: dict, methods=("bn", "bnrs", "brn")) -> pd.DataFrame:
    """Summary rows of Fashion-MNIST i.i.d. at the given batch size -> budget, BN at 80%, the others +1 point."""
    return pd.DataFrame(
        [
            {
                "dataset": "fashionmnist",
                "sampler": "iid",
                "norm_placement": "all",
                "batch_size": b,
                "budget": budget,
                "method": m,
                "n_seeds": 5,
                "mean": 0.8,
                "ci_low": 0.79,
                "ci_high": 0.81,
                "p_value": 0.01,
                "diff_vs_bn": None if m == "bn" else 0.01,
                "diff_ci_low": None if m == "bn" else 0.005,
                "diff_ci_high": None if m == "bn" else 0.015,
                "wins": 5,
                "n_pairs": 5,
                "verdict": None if m == "bn" else "above",
            }
            for b, budget in budgets.items()
            for m in methods
        ]
    )


def test_a_grid_that_gives_each_batch_size_its_own_budget_answers_at_every_batch_size():
    summary = _condition_rows({2: "40000 steps", 16: "8000 steps", 128: "2000 steps"})
    assert sorted(paper.tables.headline_condition(summary)["batch_size"].unique()) == [2, 16, 128]
    facts = paper.study.headline(summary)
    assert facts["budget"] == "40,000 steps at batch 2, 8,000 at batch 16 and 2,000 at batch 128"
    assert "gn_small_text" not in facts  # not run: left out
    assert paper.words.condition_words(summary) == (
        "Fashion-MNIST, i.i.d. batches, budget 40,000 steps at batch 2, 8,000 at "
        "batch 16 and 2,000 at batch 128, 5 seeds"
    )
    assert (facts["bnrs_small_text"], facts["bnrs_small_verdict"], facts["bnrs_large_verdict"]) == (
        "+1.0 [+0.5, +1.5] points",
        "above",
        "above",
    )
    # its figures: one per dataset, every batch size a column
    assert [(d, b, len(p)) for d, b, p in paper.words.by_budget(summary)] == [
        ("fashionmnist", "40,000 steps at batch 2, 8,000 at batch 16 and 2,000 at batch 128", len(summary))
    ]
    # two budgets at one batch size (the old study): the equal-samples one
    two = pd.concat([_condition_rows({2: "6400 samples", 128: "6400 samples"}), _condition_rows({128: "50 steps"})])
    assert set(paper.tables.headline_condition(two)["budget"]) == {"6400 samples"}
    assert [(d, b) for d, b, _ in paper.words.by_budget(two)] == [
        ("fashionmnist", "50 steps"),
        ("fashionmnist", "6400 samples"),
    ]


def test_the_correction_is_named_as_the_grid_applied_it():
    summary = _condition_rows({2: "40000 steps", 16: "8000 steps"})
    assert "Holm-corrected over the grid's 6 comparisons" in paper.study.correction_sentence(
        summary
    )  # p_value on BN's rows too
    planned = summary.assign(family=["primary", "primary", "exploratory"] * 2)
    said = paper.study.correction_sentence(planned)
    assert "Holm over its 4 primary comparisons" in said and "Benjamini-Hochberg over the 2 exploratory" in said


def test_the_readme_tells_a_planned_grids_answer_by_its_plan(tmp_path):
    """A summary with the re-run study's plan (family): the README tells the intro's answer, held to the same claims;
    without the plan, the short study's caveat."""
    summary = _condition_rows({2: "40000 steps", 16: "8000 steps"}).assign(family="primary")
    summary.loc[summary["method"] == "bn", "family"] = None
    pd.DataFrame(
        {
            "dataset": "fashionmnist",
            "sampler": "iid",
            "norm_placement": "all",
            "batch_size": [2, 16],
            "budget": ["40000 steps", "8000 steps"],
            "method": "bn",
            "n_seeds": 5,
            "plateaued": [True, False],
        }
    ).to_csv(tmp_path / "plateau.csv", index=False)
    # a planned grid's README tells the intro's answer, and stops where the tables no longer support it (this
    # constructed grid has no one-class cell and no mechanism grid)
    with pytest.raises(paper.guards.UnsupportedSentence, match="README's answer no longer holds: .*one-class"):
        paper.readme.readme_findings(summary, 10, ["abc1234"], folder=tmp_path)
    assert "not trained to a plateau" in paper.readme.readme_findings(summary.drop(columns="family"), 10)


def test_samples_seen_ticks_read_in_thousands():
    from bnlib import plots

    assert [plots._thousands(v) for v in (0, 500, 25000, 1500000)] == ["0", "500", "25k", "1.5M"]
    frame = pd.DataFrame(
        {"method": "bn", "batch_size": 2, "seed": 0, "samples_seen": [20000, 40000, 80000], "test_acc": [0.5, 0.6, 0.7]}
    )
    fig = plots.accuracy_over_training(frame)
    fig.canvas.draw()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()][-1].endswith("k")


def test_the_2x2_read_out_by_optimiser_names_each_setting_and_counts_the_verdicts():
    """The robustness checks' read-out: conditions told apart by optimiser and learning rate, and per effect how
    many settings give the most common verdict, naming the ones that do not."""
    from bnlib import analysis

    settings = [("adam", 0.001), ("adam", 0.0003), ("sgd", 0.03)]
    rows = [
        {
            "comparison": f"2x2: {name}",
            "outcome": "accuracy",
            "batch_size": 16,
            "sampler": "iid",
            "optimizer": o,
            "lr": lr,
            "n_seeds": 3,
            "mean": -0.2,
            "ci_low": -0.21,
            "ci_high": -0.19,
            "family": "exploratory",
            "verdict": "cannot tell" if (name.startswith("gradient") and o == "sgd") else "below",
        }
        for name in analysis.EFFECTS
        for o, lr in settings
    ]
    comparisons = pd.DataFrame(rows)
    text = paper.mechanism.twobytwo_answer(comparisons, by=paper.words.BY_OPTIMISATION)
    assert text.splitlines()[2].startswith("- **SGD with momentum 0.9, lr 0.03** (3 seeds): ")
    summary = pd.DataFrame(
        [
            {
                "batch_size": 16,
                "sampler": "iid",
                "optimizer": o,
                "lr": lr,
                "method": m,
                "mean": 0.8,
                "ci_low": 0.79,
                "ci_high": 0.81,
            }
            for o, lr in settings
            for m in analysis.CORNERS
        ]
    )
    assert list(paper.mechanism.twobytwo(summary, comparisons, by=paper.words.BY_OPTIMISATION).index) == [
        "Adam, lr 0.001",
        "Adam, lr 0.0003",
        "SGD with momentum 0.9, lr 0.03",
    ]
    answer = paper.mechanism.robustness_answer(comparisons)
    assert answer.startswith("Across the 3 optimiser settings:")
    assert (
        "- gradient through the statistics (without - with): below in 2 of the 3 settings (cannot tell with SGD with "
        "momentum 0.9, lr 0.03)." in answer
    )
    assert "- interaction: below in 3 of the 3 settings." in answer


def test_converges_slower_or_to_less_is_read_from_the_levels():
    """BNRS never within the margin of BN's level: 'converges to less'; reaching it later: 'converges slower'."""

    def rows(bnrs_reaches):
        return pd.DataFrame(
            [
                {
                    "dataset": "fashionmnist",
                    "sampler": "iid",
                    "batch_size": b,
                    "method": m,
                    "level": level,
                    "steps_to_bn_level": reach,
                    "steps_to_own_level": own,
                }
                for b in (2, 16)
                for m, level, reach, own in (
                    ("bn", 0.88, 1000, 1000),
                    ("bnrs", 0.66 if bnrs_reaches is None else 0.875, bnrs_reaches, 800),
                )
            ]
        )

    less = paper.original.slower_answer(rows(None))
    assert (
        "at batch 2 it ends at 66.0% (first within 1 point of that at step 800) and never comes within 1 point of "
        "BN's 88.0% (BN: step 1,000)" in less
    )
    assert less.endswith("On these curves it does not converge slower, it converges to less.")
    slower = paper.original.slower_answer(rows(3000))
    assert "comes within 1 point of BN's 88.0% at step 3,000 (BN: 1,000)" in slower and slower.endswith(
        "it converges slower."
    )
    assert paper.original.slower_answer(rows(None).assign(dataset="mnist5k")) == ""
    assert "losing accuracy" not in less  # no plateau columns: nothing said about a decline
    # a curve whose gain over the last quarter is below zero with its whole interval passes the plateau criterion
    # while declining: said where it is so, and only there
    status = rows(None).assign(gain_last_quarter=0.001, gain_ci_high=0.004)
    status.loc[(status["method"] == "bnrs") & (status["batch_size"] == 2), ["gain_last_quarter", "gain_ci_high"]] = (
        -0.012,
        -0.004,
    )
    declining = paper.original.slower_answer(status)
    assert "still losing accuracy at the end (-1.2 points over the last quarter, 95% upper bound -0.4)" in declining
    assert declining.count("losing accuracy") == 1


def test_a_fix_s_cost_is_a_multiple_of_a_reference_trained_in_the_same_cells():
    """Per-step cost compares methods on the same machine and batches only: against BN where it shares the cells,
    else against GroupNorm in them (the fixes group ran in other cells, perhaps on another machine)."""
    evals = pd.DataFrame(
        [
            {
                "cell": cell,
                "batch_size": 16,
                "sampler": "iid",
                "method": m,
                "final": True,
                "steps_total": 100,
                "train_seconds": secs,
            }
            for cell, m, secs in (("a", "bn", 10.0), ("a", "brn", 11.0), ("b", "online", 30.0), ("b", "gn", 20.0))
        ]
    )
    summary = pd.DataFrame(
        [{"batch_size": 16, "sampler": "iid", "method": m, "mean": 0.8} for m in ("bn", "brn", "online", "gn")]
    )
    text = paper.mechanism.fixes_answer(
        summary, pd.DataFrame(columns=["comparison", "batch_size", "sampler", "outcome"]), evals
    )
    assert "BRN 80.0%, 1.1x BN's time per step in its cells" in text
    assert "Online Norm 80.0%, 1.5x GN's time per step in its cells" in text


def test_cost_per_step_keeps_machines_apart():
    """Milliseconds per step from two machines never share a column: a median over both would compare machines."""
    evals = pd.DataFrame(
        [
            {
                "cell": c,
                "batch_size": 16,
                "method": m,
                "final": f,
                "steps_total": 100,
                "train_seconds": s,
                "device_name": d,
            }
            for c, m, f, s, d in (
                ("a", "bn", True, 1.0, "AMD EPYC"),
                ("a", "bn", False, 9.0, "AMD EPYC"),
                ("b", "bn", True, 3.0, "Intel(R) Xeon(R) Processor"),
                ("b", "gn", True, 5.0, "Intel(R) Xeon(R) Processor"),
            )
        ]
    )
    table = paper.tables.cost_per_step(evals)
    assert list(table.columns) == ["batch 16, AMD EPYC", "batch 16, Intel Xeon Processor"]
    assert table.loc["BN", "batch 16, AMD EPYC"] == 10.0 and table.loc["BN", "batch 16, Intel Xeon Processor"] == 30.0
    gn = plots.display_name("gn")
    assert pd.isna(table.loc[gn, "batch 16, AMD EPYC"]) and table.loc[gn, "batch 16, Intel Xeon Processor"] == 50.0


def test_split_answer_says_how_much_of_the_cut_each_kept_gradient_wins_back():
    summary = pd.DataFrame(
        [
            {"batch_size": 16, "sampler": "iid", "method": m, "mean": a, "n_seeds": 5}
            for m, a in (("bn", 0.9), ("bn_detached", 0.5), ("bn_detached_mean", 0.6), ("bn_detached_var", 0.8))
        ]
    )
    comparisons = pd.DataFrame(
        [
            {
                "comparison": "bn_detached_var - bn_detached",
                "batch_size": 16,
                "sampler": "iid",
                "outcome": "accuracy",
                "mean": 0.3,
                "ci_low": 0.2,
                "ci_high": 0.4,
                "verdict": "above",
                "family": "exploratory",
            }
        ]
    )
    text = paper.mechanism.split_answer(summary, comparisons)
    assert "leaving out both terms costs 40.0 points" in text
    assert "(bn_detached_mean) 60.0%, winning back 25% of those points" in text
    assert (
        "(bn_detached_var) 80.0%, +30.0 [+20.0, +40.0] points (above, exploratory) against bn_detached, "
        "winning back 75%" in text
    )
    # where cutting both gains, there is nothing to win back
    flipped = summary.assign(mean=summary["mean"].where(summary["method"] != "bn", 0.4))
    assert "gains 10.0 points" in paper.mechanism.split_answer(flipped, comparisons)
    assert "winning back" not in paper.mechanism.split_answer(flipped, comparisons)


def test_failure_answer_reads_the_loss_beside_the_recomputed_accuracy():
    def row(effect, outcome, mean, verdict):
        return {
            "comparison": f"2x2: {effect}",
            "batch_size": 16,
            "sampler": "iid",
            "outcome": outcome,
            "mean": mean,
            "ci_low": mean - 0.01,
            "ci_high": mean + 0.01,
            "verdict": verdict,
            "family": "exploratory",
        }

    forward, gradient = "forward statistics (running - batch)", "gradient through the statistics (without - with)"
    comparisons = pd.DataFrame(
        [
            row(gradient, "training loss", 0.6, "above"),
            row(gradient, "recomputed accuracy", -0.2, "below"),
            row(forward, "training loss", -0.02, "cannot tell"),
            row(forward, "recomputed accuracy", -0.05, "below"),
        ]
    )
    text = paper.mechanism.failure_answer(comparisons)
    assert (
        "leaving out the normalising backward pass: training loss +0.600 [+0.590, +0.610] (above), accuracy with "
        "recomputed statistics -20.0 [-21.0, -19.0] points (below, exploratory) - a failure to train"
    ) in text
    assert (
        "(cannot tell), accuracy with recomputed statistics -5.0 [-6.0, -4.0] points (below, exploratory) - no reading"
        in text
    )
    flipped = comparisons.assign(verdict=["above", "above", "below", "below"])
    assert "- a worse fit of the training batches that tests better" in paper.mechanism.failure_answer(flipped)
    assert "- a train/test mismatch" in paper.mechanism.failure_answer(flipped)


def test_why_sentence_reads_the_primary_2x2_and_concludes_only_when_every_condition_agrees():
    def rows(batch, forward, gradient, family="primary"):
        return [
            {
                "comparison": f"2x2: {name}",
                "batch_size": batch,
                "sampler": "iid",
                "outcome": "accuracy",
                "mean": m,
                "ci_low": m - 0.01,
                "ci_high": m + 0.01,
                "verdict": v,
                "family": family,
            }
            for name, (m, v) in zip(
                ("forward statistics (running - batch)", "gradient through the statistics (without - with)"),
                (forward, gradient),
            )
        ]

    both = pd.DataFrame(
        rows(16, (0.0, "equivalent"), (-0.2, "below"))
        + rows(2, (0.05, "above"), (-0.3, "below"))
        + rows(4, (-0.5, "below"), (0.0, "cannot tell"), family="exploratory")
    )
    text = paper.study.why_sentence(both)
    assert (
        "normalising with running instead of batch statistics changes the final accuracy by +0.0 [-1.0, +1.0] points "
        "at i.i.d. batch 16 (equivalent) and +5.0 [+4.0, +6.0] points at i.i.d. batch 2 (above); leaving out the "
        "normalising backward pass by -20.0 [-21.0, -19.0] points at i.i.d. batch 16 (below) and -30.0"
    ) in text
    assert "batch 4" not in text  # exploratory effects are not the abstract's
    assert text.endswith(
        "The accuracy is lost by leaving out the normalising backward pass, not by normalising with running statistics."
    )
    split = pd.DataFrame(rows(16, (0.0, "equivalent"), (-0.2, "below")) + rows(2, (-0.05, "below"), (-0.3, "below")))
    assert "The accuracy is lost" not in paper.study.why_sentence(split)
    assert paper.study.why_sentence(both[both["family"] == "exploratory"]) == ""


def test_one_class_answer_groups_methods_by_where_the_current_batch_enters_only_when_the_data_do():
    def row(method, mean, verdict):
        return {
            "batch_size": 2,
            "comparison": f"{method}: noniid - iid",
            "method": method,
            "n_seeds": 5,
            "mean": mean,
            "ci_low": mean - 0.01,
            "ci_high": mean + 0.01,
            "verdict": verdict,
            "family": "exploratory",
        }

    cost = pd.DataFrame(
        [
            row("bn", -0.6, "below"),
            row("brn", -0.1, "below"),
            row("bnrs", 0.02, "cannot tell"),
            row("online", 0.0, "equivalent"),
            {**row(None, 0.4, "above"), "comparison": "2x2: forward statistics (running - batch)"},
        ]
    )
    text = paper.reversal.one_class_answer(cost)
    assert "cost BN -60.0 [-61.0, -59.0] (below), BRN -10.0 [-11.0, -9.0] (below)." in text
    assert "not shown to hurt BNRS +2.0 [+1.0, +3.0] (cannot tell), Online Norm +0.0 [-1.0, +1.0] (equivalent)." in text
    assert (
        "normalising with running instead of batch statistics changes that cost by +40.0 [+39.0, +41.0] (above)" in text
    )
    assert (
        "in its forward pass (BN) or only in its gradient (BRN), and none of those where the current batch enters "
        "neither (BNRS, Online Norm)." in text
    )
    # a method the grouping spares that one-class batches hurt: no grouping sentence
    assert "Read together" not in paper.reversal.one_class_answer(
        cost.assign(verdict=cost["verdict"].replace("equivalent", "below"))
    )
    # a method the grouping does not know: no grouping sentence
    assert "Read together" not in paper.reversal.one_class_answer(
        pd.concat([cost, pd.DataFrame([row("frn", -0.2, "below")])])
    )


def test_plateau_answer_reads_bns_row_per_condition_or_setting():
    plateau = pd.DataFrame(
        [
            {
                "method": "bn",
                "batch_size": 2,
                "sampler": "iid",
                "optimizer": "sgd",
                "lr": 0.01,
                "n_seeds": 3,
                "gain_last_quarter": 0.004,
                "gain_ci_high": 0.008,
                "plateaued": True,
            },
            {
                "method": "bn",
                "batch_size": 2,
                "sampler": "noniid",
                "optimizer": "adam",
                "lr": 0.001,
                "n_seeds": 1,
                "gain_last_quarter": 0.02,
                "gain_ci_high": float("nan"),
                "plateaued": False,
            },
            {
                "method": "bnrs",
                "batch_size": 2,
                "sampler": "iid",
                "optimizer": "sgd",
                "lr": 0.01,
                "n_seeds": 3,
                "gain_last_quarter": 0.05,
                "gain_ci_high": 0.09,
                "plateaued": False,
            },
        ]
    )
    text = paper.mechanism.plateau_answer(plateau)
    assert (
        "below 1 point): i.i.d. batch 2: plateaued (+0.40 points, upper bound +0.80, 3 seeds); non-i.i.d. batch 2: "
        "not plateaued (+2.00 points, 1 seed)" in text
    )  # no bound from one seed
    assert "+5.00" not in text  # BN's rows only
    assert "SGD with momentum 0.9, lr 0.01: plateaued" in paper.mechanism.plateau_answer(
        plateau, by=paper.words.BY_OPTIMISATION
    )


def test_batchstats_answer_reads_the_check_as_the_plan_wrote_it():
    def runs(sampler, method, running, batch):
        return [
            {
                "final": True,
                "batch_size": 2,
                "sampler": sampler,
                "method": method,
                "seed": s,
                "test_acc": running + 0.01 * s,
                "test_acc_recomputed": running,
                "test_acc_batchstats": batch + 0.01 * s,
            }
            for s in range(3)
        ]

    evaluations = pd.DataFrame(runs("noniid", "bn", 0.15, 0.85) + runs("iid", "bn", 0.85, 0.80))

    def gap(verdict):
        return pd.DataFrame(
            [
                {
                    "comparison": "bn: test_acc_batchstats - test_acc",
                    "batch_size": 2,
                    "sampler": s,
                    "mean": m,
                    "ci_low": m - 0.01,
                    "ci_high": m + 0.01,
                    "verdict": v,
                }
                for s, m, v in (("noniid", 0.7, verdict), ("iid", -0.05, "below"))
            ]
        )

    text = paper.reversal.batchstats_answer(evaluations, gap("above"))
    assert (
        "**Trained on one-class batches of 2** (3 seeds, tested on one-class batches of 2): BN: accuracy (%) 16.0 "
        "[13.5, 18.5] with its running statistics, 15.0 [15.0, 15.0] with recomputed ones, 86.0 [83.5, 88.5] with the "
        "test batches' own, +70.0 [+69.0, +71.0] points (above)."
    ) in text
    assert "not a failure to learn" in text and "i.i.d. batches of 2): BN: accuracy" in text
    # above BN's best i.i.d. seed (87.0%) with one-class test batches (86.0% on average): no such reading
    assert "Read after the cells were seen" not in text
    better = evaluations.assign(
        test_acc_batchstats=evaluations["test_acc_batchstats"].where(evaluations["sampler"] == "iid", 0.95)
    )
    assert (
        "its 95.0% is above BN trained and tested on i.i.d. batches here (at most 87.0% in any seed)"
        in paper.reversal.batchstats_answer(better, gap("above"))
    )
    assert text.count("As the plan reads it") == 1  # the reading is of one-class training only
    assert "it failed to learn" in paper.reversal.batchstats_answer(evaluations, gap("equivalent"))
    assert "cannot tell whether" in paper.reversal.batchstats_answer(evaluations, gap("cannot tell"))
