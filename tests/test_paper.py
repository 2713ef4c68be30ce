"""The paper's rendering rules on constructed tables (fast: no build): a number from fewer than three seeds says so and
has no interval, nothing prints NaN, and the intro's key numbers and the README render each shared number as one
string."""

import math

import pandas as pd
import pytest

from bnlib import paper
from bnlib.paper import words


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (5, "-2.5 [-3.0, -2.0] points"),
        (3, "-2.5 [-3.0, -2.0] points"),
        (2, "-2.5 points (n = 2, no interval)"),
        (1, "-2.5 points (n = 1, no interval)"),
    ],
)
def test_a_difference_from_fewer_than_three_seeds_says_so_instead_of_an_interval(n, expected):
    assert words.difference(-0.025, -0.03, -0.02, n) == expected


def test_no_rendering_prints_nan():
    nan = float("nan")
    assert words.difference(-0.025, nan, nan, 1) == "-2.5 points (n = 1, no interval)"
    assert words.difference(nan, nan, nan, 0) == "–"
    assert words.percent_interval(0.885, nan, nan, n=1, unit="%") == "88.5% (n = 1, no interval)"
    assert words.percent_interval(0.885, 0.88, 0.89, n=5, unit="%") == "88.5% [88.0, 89.0]"
    assert words.percent_interval(0.885, nan, nan) == "88.5"  # no seed count given: the number alone
    assert "nan" not in words.percent_interval(0.1, 0.0, nan, signed=True, n=4).lower()


def _summary(gn_seeds_at_128: int) -> pd.DataFrame:
    """A planned summary of the headline condition: BN, BNRS, BRN with 5 seeds at batches 2 and 128, GroupNorm with 5
    at batch 2 and ``gn_seeds_at_128`` at 128 (one seed: no interval, as the published study's GN at 128)."""
    rows = []
    for b in (2, 128):
        for m, d in (("bn", None), ("bnrs", -0.2), ("brn", -0.01), ("gn", 0.03 if b == 2 else -0.025)):
            n = gn_seeds_at_128 if (m, b) == ("gn", 128) else 5
            one = n < 2
            rows.append(
                {
                    "dataset": "fashionmnist",
                    "batch_size": b,
                    "sampler": "iid",
                    "norm_placement": "all",
                    "budget": f"{40000 if b == 2 else 2000} steps",
                    "method": m,
                    "n_seeds": n,
                    "mean": 0.85 + (d or 0),
                    "ci_low": math.nan if one else 0.84 + (d or 0),
                    "ci_high": math.nan if one else 0.86 + (d or 0),
                    "diff_vs_bn": d,
                    "diff_ci_low": math.nan if d is None or one else d - 0.005,
                    "diff_ci_high": math.nan if d is None or one else d + 0.005,
                    "n_pairs": None if d is None else n,
                    "wins": None if d is None else 0,
                    "p_value": None if d is None or one else 0.001,
                    "family": None if d is None else ("exploratory" if m == "gn" else "primary"),
                    "verdict": None if d is None else ("cannot tell" if one else "below" if d < 0 else "above"),
                }
            )
    return pd.DataFrame(rows)


def test_the_intro_s_key_numbers_and_the_readme_say_n_1_and_print_one_string_for_each_shared_number(tmp_path):
    summary = _summary(gn_seeds_at_128=1)
    tables = paper.tables.Tables("study", tmp_path, pd.DataFrame(), pd.DataFrame(), summary, None, None, [], None)
    facts = paper.answer.facts(tables)
    assert facts["gn_large_text"] == "-2.5 points (n = 1, no interval)"
    assert facts["bnrs_small_text"] == "-20.0 [-20.5, -19.5] points"
    key = paper.answer.key_numbers(facts).to_string()
    readme = paper.answer.in_short(facts)  # the intro's and the README's three sentences
    for text in (key, readme):
        assert "nan" not in text.lower()
        assert "-20.0 [-20.5, -19.5]" in text
    assert "-2.5 (n = 1, no interval)" in key
    # a condition the grid has not run (one-class batches, the mechanism grid) is a dash, never a missing glue key
    assert {facts[k] for k in ("oc_bn_text", "oc_gn_text", "no_backward_at_text")} == {"–"}
    assert all(k in facts for k in paper.answer.GLUED)
    assert (
        "-2.5 [-3.0, -2.0] points"
        == paper.answer.facts(
            paper.tables.Tables("study", tmp_path, None, None, _summary(gn_seeds_at_128=5), None, None, [], None)
        )["gn_large_text"]
    )


def _two_by_two(batch, sampler, effects: dict, family="primary", classes=None, note=""):
    """Accuracy rows of one condition: comparison -> (mean, verdict); intervals +-1 point, 5 seeds."""
    return [
        {
            "comparison": name,
            "batch_size": batch,
            "sampler": sampler,
            "classes_per_batch": classes,
            "outcome": "accuracy",
            "mean": m,
            "ci_low": m - 0.01,
            "ci_high": m + 0.01,
            "n_seeds": 5,
            "verdict": v,
            "verdict_amended": v,
            "family": family if not name.startswith("2x2 simple") else "simple effects",
            "note": note,
        }
        for name, (m, v) in effects.items()
    ]


def test_the_why_reads_the_simple_effects_where_the_factors_interact_and_the_one_class_regime_apart():
    from bnlib import analysis

    forward, gradient = (f"2x2: {name}" for name in analysis.EFFECTS if name != "interaction")
    fg, fn, gb, gr = analysis.SIMPLE
    iid2 = {
        forward: (0.075, "above"),
        gradient: (-0.26, "below"),
        "2x2: interaction": (0.165, "above"),
        fg: (-0.008, "cannot tell"),
        fn: (0.157, "above"),
        gb: (-0.344, "below"),
        gr: (-0.179, "below"),
    }
    iid16 = {
        forward: (0.0, "equivalent"),
        gradient: (-0.22, "below"),
        "2x2: interaction": (0.0, "equivalent"),
        fg: (-0.003, "equivalent"),
        fn: (0.002, "equivalent"),
        gb: (-0.224, "below"),
        gr: (-0.219, "below"),
    }
    one_class = {
        forward: (0.489, "above"),
        gradient: (0.039, "cannot tell"),
        "2x2: interaction": (-0.163, "below"),
        fg: (0.57, "above"),
        fn: (0.407, "above"),
        gb: (0.121, "cannot tell"),
        gr: (-0.042, "cannot tell"),
    }
    rows = pd.DataFrame(
        _two_by_two(2, "iid", iid2)
        + _two_by_two(16, "iid", iid16)
        + _two_by_two(2, "noniid", one_class, "exploratory", 1, "BN not plateaued: primary by the plan")
    )
    text = paper.study.why_sentence(rows)
    # batch 16: no interaction, the main effects; batch 2: the simple effects, never the +7.5 average
    assert "+0.0 [-1.0, +1.0] points at i.i.d. batch 16 (equivalent)" in text
    assert "+7.5" not in text and "-26.0" not in text
    assert "at i.i.d. batch 2, where the two factors interact (interaction +16.5 [+15.5, +17.5] points, above)" in text
    assert "-34.4 [-35.4, -33.4] points (below) with batch statistics in the forward pass" in text
    assert "-0.8 [-1.8, +0.2] points (cannot tell) with the gradient and +15.7 [+14.7, +16.7] points (above)" in text
    # BRN against BN cannot be told apart at batch 2: the conclusion claims only what every condition shows
    assert "not by normalising with running statistics" not in text
    assert "Leaving out the normalising backward pass loses accuracy whichever statistics" in text
    # the one-class regime, labelled exploratory, with BN's plateau said
    assert "With one-class batches of 2 (exploratory; BN had not plateaued there) the picture reverses" in text
    assert "+57.0 [+56.0, +58.0] points (above) with the gradient" in text
    # the interaction within the margin everywhere and BRN equivalent: the stronger conclusion
    settled = pd.DataFrame(_two_by_two(16, "iid", iid16))
    assert paper.study.why_sentence(settled).endswith("not by normalising with running statistics.")


def test_the_margin_is_defined_once_and_every_verdict_claim_and_sentence_that_reads_it_moves_with_it(monkeypatch):
    """analysis.MARGIN is the one definition of the equivalence margin: a wider one (monkeypatched) turns the same
    data's TOST, comparison verdict, unplanned-grid interval verdict, original claim and the sentence that states the
    rule."""
    from bnlib import analysis

    close = [0.012, 0.014, 0.016, 0.013, 0.015]  # +1.4 points, tightly: beyond a 1-point margin, within 2
    diffs = {("fashionmnist", b, "bnwos"): (0.0, -0.015, 0.015) for b in (16, 128)}  # interval +-1.5 points
    summary = _summary(gn_seeds_at_128=5).assign(family="primary")

    def read():
        compared = analysis.compare(close, "primary", "bnwos - bn", {"batch_size": 16})
        judged = analysis.correct(pd.DataFrame([{**compared, "outcome": "accuracy"}])).iloc[0]
        unplanned = _unplanned_summary(diffs)
        return (
            analysis.tost(close) < 0.05,
            judged["verdict_amended"],
            analysis.interval_verdict(-0.015, 0.015),
            paper.original.original_claims(unplanned, "fashionmnist")[3]["verdict"],
            "±1 point" in paper.study.correction_sentence(summary),
        )

    assert read() == (False, "above", "cannot tell", "cannot tell", True)
    monkeypatch.setattr(analysis, "MARGIN", 0.02)
    assert read() == (True, "above, within the margin", "equivalent", "holds", False)
    assert "±2 point" in paper.study.correction_sentence(summary)


def _unplanned_summary(diffs: dict) -> pd.DataFrame:
    """A summary of a grid without a plan (no family column): BN and the given differences against it, points."""
    rows = []
    for (dataset, b, method), (d, low, high) in diffs.items():
        common = {"dataset": dataset, "batch_size": b, "sampler": "iid", "norm_placement": "all", "budget": "400 steps"}
        rows.append({**common, "method": "bn", "n_seeds": 5, "mean": 0.8, "diff_vs_bn": None})
        rows.append(
            {
                **common,
                "method": method,
                "n_seeds": 5,
                "mean": 0.8 + d,
                "diff_vs_bn": d,
                "diff_ci_low": low,
                "diff_ci_high": high,
                "n_pairs": 5,
            }
        )
    return pd.DataFrame(rows).drop_duplicates(["dataset", "batch_size", "method"])


def test_the_paper_and_the_analysis_import_and_run_without_torch():
    """The book's pages, the README writer and the analysis read tables, not layers: with torch blocked they import
    and compute the answer's facts and claims, the why and the original's claims from the committed study."""
    import subprocess
    import sys

    script = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("torch is blocked", name=name)
sys.meta_path.insert(0, Block())
from bnlib import analysis, methods, paper, plots
import pandas as pd
t = paper.tables.tables("study")
checked = paper.tables.mechanism_tables(grid=paper.tables.BATCHSTATS_GRID)
f = paper.answer.facts(t, pd.read_csv(t.folder.parent / "mechanism" / "analysis.csv"), checked.summary_batchstats)
assert len(paper.answer.key_numbers(f)) and all(rule(f)[0] for rule in paper.answer.CLAIMS.values())
assert paper.original.claims_table(t.summary, t.plateau) is not None
assert paper.study.why_sentence(pd.read_csv(t.folder.parent / "mechanism" / "analysis.csv"))
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
"""
    from bnlib import paths

    if not (paths.ROOT / "results" / "study" / "summary.csv").exists():
        pytest.skip("results/study holds no finished cell in this checkout")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_paper_function_a_page_calls_exists():
    """A page calls the paper's code by module and name (paper.study.abstract ...): each exists, so a moved or
    removed function fails here, not only in the full build."""
    import re

    from bnlib import paths

    called = {
        (page.name, module, name)
        for page in sorted((paths.ROOT / "book").rglob("*.md"))
        for module, name in re.findall(r"\bpaper\.(\w+)\.(\w+)", page.read_text())
    }
    assert called
    missing = [c for c in called if not hasattr(getattr(paper, c[1], None), c[2])]
    assert not missing, missing


def test_two_builds_of_one_checkout_take_turns(tmp_path):
    """The book's build lock (paper.site.hold_build_lock, taken by the Sphinx extension before it gathers the run
    notebooks into the source tree and released when the build finishes): a second build started while the first
    holds it says so and waits; it gathers only after the first has released."""
    import subprocess
    import sys
    import time

    from bnlib import book_extension

    log, lock = tmp_path / "order.log", tmp_path / ".build.lock"
    script = f"""
import sys, time
from pathlib import Path
from types import SimpleNamespace
from bnlib import book_extension, paper
paper.site.BUILD_LOCK = Path({str(lock)!r})
log = Path({str(log)!r})
def say(line):
    with open(log, "a") as f:
        f.write(line + "\\n")
if sys.argv[1] == "second":
    say("second tries")
app = SimpleNamespace(bnlib_build_lock=paper.site.hold_build_lock())  # as _gather takes it
say(sys.argv[1] + " got")
if sys.argv[1] == "first":  # hold it until the second is waiting for it
    for _ in range(1200):
        if "second tries" in log.read_text():
            break
        time.sleep(0.05)
    time.sleep(1.0)
say(sys.argv[1] + " releases")
book_extension._release(app, None)
"""
    first = subprocess.Popen([sys.executable, "-c", script, "first"], stderr=subprocess.PIPE, text=True)
    for _ in range(1200):  # the first holds the lock before the second starts
        if log.exists() and "first got" in log.read_text():
            break
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-c", script, "second"], capture_output=True, text=True, timeout=120)
    first.communicate(timeout=120)
    assert second.returncode == 0 and first.returncode == 0, second.stderr
    assert log.read_text().split("\n")[:5] == [
        "first got",
        "second tries",
        "first releases",
        "second got",
        "second releases",
    ]
    assert "another build of this checkout holds" in second.stderr
    assert book_extension._release(type("App", (), {})(), None) is None  # nothing held: nothing to release


MECHANISM = paper.tables.results_dir() / "mechanism"
# The sentence writers the pages still compute (their sentence changes shape with the data), on the mechanism grid's
# committed tables: (comparisons, summary) -> Markdown
WRITERS = {
    "twobytwo_answer": lambda c, s, extra: paper.mechanism.twobytwo_answer(c),
    "robustness_answer": lambda c, s, extra: paper.mechanism.robustness_answer(c),
    "failure_answer": lambda c, s, extra: paper.mechanism.failure_answer(c),
    "split_answer": lambda c, s, extra: paper.mechanism.split_answer(s, c),
    "sweep_answer": lambda c, s, extra: paper.mechanism.sweep_answer(s, c),
    "textbook_answer": lambda c, s, extra: paper.mechanism.textbook_answer(
        paper.mechanism.textbook_checks(c, extra["traces"])
    ),
    "why_sentence": lambda c, s, extra: paper.study.why_sentence(c),
    "verdict_sentence": lambda c, s, extra: paper.study.verdict_sentence(s[s["sampler"] == "iid"], "bnrs"),
    "plateau_answer": lambda c, s, extra: paper.mechanism.plateau_answer(extra["plateau"]),
}


def _one_seed(frame: pd.DataFrame) -> pd.DataFrame:
    gone = [c for c in ("ci_low", "ci_high", "diff_ci_low", "diff_ci_high") if c in frame]
    seeds = {c: 1 for c in ("n_seeds", "n_pairs") if c in frame}
    return frame.assign(**dict.fromkeys(gone, math.nan), **seeds)


@pytest.mark.skipif(not (MECHANISM / "analysis.csv").exists(), reason="the mechanism grid is not committed here")
@pytest.mark.parametrize("case", ["committed", "one seed", "no number", "no cell"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_computed_sentence_says_n_1_and_never_nan_and_survives_a_grid_with_no_cell(writer, case):
    comparisons = pd.read_csv(MECHANISM / "analysis.csv")
    summary = paper.tables.tables("mechanism", MECHANISM).summary
    extra = {"traces": pd.read_csv(MECHANISM / "traces_summary.csv"), "plateau": pd.read_csv(MECHANISM / "plateau.csv")}
    c, s = {
        "committed": (comparisons, summary),
        "one seed": (_one_seed(comparisons), _one_seed(summary)),
        "no number": (comparisons.assign(mean=math.nan), summary),
        "no cell": (comparisons.iloc[0:0], summary.iloc[0:0]),
    }[case]
    text = WRITERS[writer](c, s, extra)
    assert isinstance(text, str) and "nan" not in text.lower()
    if case == "one seed" and writer in ("twobytwo_answer", "failure_answer", "why_sentence") and text:
        assert "(n = 1, no interval)" in text
