"""The pre-registered analysis with known answers: the 2x2 effects, TOST, the families' corrections, the plateau
criterion."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bnlib import analysis, paper, stats


def _final(scores: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"method": m, "seed": s, "score": v} for m, values in scores.items() for s, v in enumerate(values)]
    )


def test_effects_of_the_2x2_are_the_textbook_contrasts():
    """bn 0.90, bn_detached 0.88, brn 0.86, bnrs 0.60 (plus seed noise): forward statistics cost
    ((0.86 - 0.90) + (0.60 - 0.88)) / 2 = -0.16, the gradient ((0.88 - 0.90) + (0.60 - 0.86)) / 2 = -0.14,
    interaction (0.60 - 0.86) - (0.88 - 0.90) = -0.24."""
    noise = np.array([0.0, 0.01, -0.01, 0.005, -0.005])
    final = _final({"bn": 0.90 + noise, "bn_detached": 0.88 + noise, "brn": 0.86 + noise, "bnrs": 0.60 + noise})
    got = {name: analysis.contrast(final, w).mean() for name, w in analysis.EFFECTS.items()}
    assert list(got.values()) == pytest.approx([-0.16, -0.14, -0.24])
    assert analysis.contrast(final.query("method != 'brn'"), analysis.EFFECTS["interaction"]).empty


def test_tost_against_two_one_sided_t_tests_by_hand():
    v = np.array([0.002, -0.001, 0.003, 0.000, 0.001])
    se = v.std(ddof=1) / np.sqrt(5)
    p_low = 1 - sps.t.cdf((v.mean() + 0.01) / se, 4)
    p_high = sps.t.cdf((v.mean() - 0.01) / se, 4)
    assert analysis.tost(v) == pytest.approx(max(p_low, p_high))
    assert analysis.tost(v) < 0.05  # well inside +-1 point
    assert analysis.tost(v + 0.02) > 0.5  # outside the margin
    assert np.isnan(analysis.tost([0.0]))


def test_families_are_corrected_apart_and_verdicts_follow():
    rows = pd.DataFrame(
        [
            {"comparison": "a", "family": "primary", "mean": -0.1, "p_value": 0.01, "p_tost": 0.9},
            {"comparison": "b", "family": "primary", "mean": 0.001, "p_value": 0.8, "p_tost": 0.001},
            {"comparison": "c", "family": "exploratory", "mean": 0.05, "p_value": 0.02, "p_tost": 0.9},
            {"comparison": "d", "family": "exploratory", "mean": 0.05, "p_value": 0.04, "p_tost": 0.9},
            {"comparison": "e", "family": "exploratory", "mean": 0.05, "p_value": 0.5, "p_tost": 0.9},
        ]
    )
    out = analysis.correct(rows)
    assert list(out["correction"]) == ["Holm"] * 2 + ["Benjamini-Hochberg"] * 3
    assert out["p_adjusted"].tolist() == pytest.approx([0.02, 0.8, 0.06, 0.06, 0.5])  # Holm of 2; BH of 3
    assert list(out["verdict"]) == ["below", "equivalent", "cannot tell", "cannot tell", "cannot tell"]


def test_plateau_criterion_on_known_curves():
    """A flat curve with noise plateaus; one that still climbs 4 points over its last quarter does not. The final
    full-set evaluation (a larger eval_size) is left out."""
    rows = []
    rng = np.random.default_rng(0)
    steps = np.arange(100, 1700, 100)
    for seed in range(5):
        for method, curve in (("flat", 0.85 + 0 * steps), ("rising", 0.70 + 0.0001 * steps)):
            acc = curve + rng.normal(0, 0.003, len(steps))
            for i, (step, a) in enumerate(zip(steps, acc)):
                rows.append(
                    {
                        "cell": f"c{seed}",
                        "seed": seed,
                        "method": method,
                        "step": step,
                        "steps_total": 1600,
                        "eval_size": 10000 if step == 1600 else 2000,
                        "test_acc": 0.0 if step == 1600 else a,
                        "dataset": "fashionmnist",
                        "batch_size": 16,
                    }
                )
    out = analysis.plateau(pd.DataFrame(rows)).set_index("method")
    assert out.loc["flat", "plateaued"] and not out.loc["rising", "plateaued"]
    # rising: last three subset evaluations (1300-1500) minus the three nearest step 1200 (1100-1300)
    assert out.loc["rising", "gain_last_quarter"] == pytest.approx(0.0001 * (1400 - 1200), abs=0.006)
    assert out.loc["flat", "n_seeds"] == 5


def convergence_rows(curves: dict, steps_total: int = 1600, batch_size: int = 16, seeds: int = 3) -> pd.DataFrame:
    """Evaluation rows for known mean curves (every 100 steps; the final full-set evaluation at 0, left out)."""
    steps = np.arange(100, steps_total + 100, 100)
    rows = [
        {
            "cell": f"c{seed}",
            "seed": seed,
            "method": method,
            "step": step,
            "steps_total": steps_total,
            "eval_size": 10000 if step == steps_total else 2000,
            "test_acc": 0.0 if step == steps_total else curve(step) + (seed - 1) * 0.001,
            "dataset": "fashionmnist",
            "batch_size": batch_size,
            "sampler": "iid",
            "lr_schedule": "step",
            "lr_drop_at": 0.5,
        }
        for seed in range(seeds)
        for method, curve in curves.items()
        for step in steps
    ]
    return pd.DataFrame(rows)


def test_convergence_reads_steps_and_images_to_bns_level_and_to_a_methods_own():
    """BN climbs to 0.88 by step 800; "slow" reaches the same level at step 1200; "low" levels off at 0.70 by step
    400 and never comes within a point of BN's level. The mean over seeds is read (seed offsets cancel)."""
    curves = {
        "bn": lambda s: min(0.88, 0.5 + 0.000475 * s),
        "slow": lambda s: min(0.88, 0.5 + 0.000317 * s),
        "low": lambda s: min(0.70, 0.5 + 0.0005 * s),
    }
    out = analysis.convergence(convergence_rows(curves)).set_index("method")
    assert out.loc["bn", "level"] == pytest.approx(0.88) and (out["bn_level"] == out.loc["bn", "level"]).all()
    # BN: 0.5 + 0.000475 * 800 = 0.88 -> within a point (0.87) first at 800 (at 700: 0.8325)
    assert out.loc["bn", "steps_to_bn_level"] == 800 and out.loc["bn", "images_to_bn_level"] == 800 * 16
    assert out.loc["slow", "steps_to_bn_level"] == 1200 and out.loc["slow", "steps_to_own_level"] == 1200
    assert pd.isna(out.loc["low", "steps_to_bn_level"]) and pd.isna(out.loc["low", "images_to_bn_level"])
    assert out.loc["low", "steps_to_own_level"] == 400 and out.loc["low", "images_to_own_level"] == 6400
    assert out.loc["low", "n_seeds"] == 3 and out.loc["low", "steps_total"] == 1600
    # too few evaluations to show a curve's end (fewer than twice the window): no level, no steps
    short = analysis.convergence(convergence_rows(curves, steps_total=500))
    assert short["level"].isna().all() and short["steps_to_own_level"].isna().all()


def test_the_convergence_sentence_names_what_never_reaches_bns_level_and_what_reaches_it_later():
    from bnlib import paper

    curves = {
        "bn": lambda s: min(0.88, 0.5 + 0.000475 * s),
        "brn": lambda s: min(0.88, 0.5 + 0.000317 * s),
        "bnrs": lambda s: min(0.70, 0.5 + 0.0005 * s),
    }
    speed = analysis.convergence(convergence_rows(curves))
    text = paper.study.convergence_sentence(speed)
    assert "BN comes within 1 point of its level (88.0%) after 800 steps (12,800 images)." in text
    assert "BN, running stats (BNRS) never comes within it in 1,600 steps: it ends lower" in text
    assert "by step 400 at the latest" in text and "Later than BN: Batch Renorm (BRN) (1,200 steps)." in text
    assert "1 of the 3 methods reaches its own level only after the learning rate drops (step 800)." in text
    table = paper.study.convergence_table(speed.assign(plateaued=[True, False, True]))
    assert table.set_index("method").loc["BN, running stats (BNRS)", "steps to BN's level"] == "never"
    assert list(table["plateaued"]) == ["yes", "no", "yes"]


def test_comparisons_follow_the_plan_on_a_synthetic_grid():
    """Two conditions of the plan (i.i.d. batch 16: BN flat; non-i.i.d. batch 2: BN still rising) and one outside
    it (SGD): primary rows only where the plan names them and BN plateaued; BNRS - BN primary at non-i.i.d. batch 2
    only; everything else exploratory under Benjamini-Hochberg."""
    rng = np.random.default_rng(1)
    rows, losses = [], []
    level = {"bn": 0.88, "bn_detached": 0.87, "brn": 0.86, "bnrs": 0.70, "gn": 0.85, "cbn": 0.86}
    # classes_per_batch as the aggregated tables have it: missing (NaN) for i.i.d. batches
    conditions = [
        ({"batch_size": 16, "sampler": "iid", "classes_per_batch": None, "optimizer": "adam"}, 0.0),
        ({"batch_size": 2, "sampler": "noniid", "classes_per_batch": 1, "optimizer": "adam"}, 0.0002),
        ({"batch_size": 16, "sampler": "iid", "classes_per_batch": None, "optimizer": "sgd"}, 0.0),
    ]
    for c, (cond, slope) in enumerate(conditions):
        for seed in range(5):
            cell = f"c{c}s{seed}"
            for m, acc in level.items():
                for step in range(100, 1700, 100):
                    final = step == 1600
                    rows.append(
                        {
                            "cell": cell,
                            "seed": seed,
                            "method": m,
                            "step": step,
                            "steps_total": 1600,
                            "eval_size": 10000 if final else 2000,
                            "dataset": "fashionmnist",
                            "lr": 0.001,
                            **cond,
                            "test_acc": acc + slope * (step if m == "bn" else 0) + rng.normal(0, 0.002),
                            "test_acc_recomputed": acc if final else None,
                            "final": final,
                            "diverged": False,
                            "num_classes": 10,
                        }
                    )
                losses.append({"cell": cell, "method": m, "step": 1600, "train_loss": 1 - level[m]})
    out = analysis.comparisons(pd.DataFrame(rows), pd.DataFrame(losses))
    primary = out[out["family"] == "primary"]
    assert set(primary["batch_size"]) == {16} and set(primary["optimizer"]) == {"adam"}
    assert sorted(primary["comparison"]) == sorted(f"2x2: {e}" for e in analysis.EFFECTS)
    assert (primary["correction"] == "Holm").all() and (
        out.loc[out["family"] == "exploratory", "correction"] == "Benjamini-Hochberg"
    ).all()
    noniid = out[(out["sampler"] == "noniid") & (out["outcome"] == "accuracy")]
    assert set(noniid.loc[noniid["comparison"] == "bnrs - bn", "note"]) == {
        "BN not plateaued: primary by the plan, counted as exploratory"
    }
    forward = primary.set_index("comparison").loc["2x2: forward statistics (running - batch)"]
    assert (
        forward["mean"] == pytest.approx(((0.86 - 0.88) + (0.70 - 0.87)) / 2, abs=0.003)
        and forward["verdict"] == "below"
    )
    assert set(out["outcome"]) == {"accuracy", "recomputed accuracy", "training loss"}
    # each comparison once per condition and outcome, though "cbn - bn" is both a method against BN and an
    # exploratory pair: a family counts it once
    keys = [k for k in stats.CONDITION_KEYS if k in out]
    assert not out.duplicated([*keys, "comparison", "outcome"]).any()
    assert (out["comparison"] == "cbn - bn").sum() == len(conditions)
    # the four simple effects (the amendment of 2026-12-07): each condition, accuracy only, their own BH family
    simple = out[out["family"] == analysis.SIMPLE_FAMILY]
    assert len(simple) == 4 * len(conditions) and set(simple["outcome"]) == {"accuracy"}
    assert set(simple["correction"]) == {"Benjamini-Hochberg"}
    at16 = simple[(simple["batch_size"] == 16) & (simple["optimizer"] == "adam")].set_index("comparison")["mean"]
    expected = {
        "brn - bn": 0.86 - 0.88,
        "bnrs - bn_detached": 0.70 - 0.87,
        "bn_detached - bn": -0.01,
        "bnrs - brn": -0.16,
    }
    for name, value in expected.items():
        (key,) = [k for k in analysis.SIMPLE if k.endswith(f"({name})")]
        assert at16[key] == pytest.approx(value, abs=0.003), key
    # an interaction of -0.15: not negligible, so the simple effects are the read-out
    readout = analysis.two_by_two_readout(out)
    assert len(readout) == len(conditions) and set(readout["readout"]) == {"simple effects"}
    negligible = out.assign(verdict_amended=np.where(out["comparison"] == "2x2: interaction", "equivalent", "below"))
    assert set(analysis.two_by_two_readout(negligible)["readout"]) == {"main effects"}


def test_the_study_plan_makes_primary_its_twelve_comparisons_and_nothing_else():
    """The re-run study's plan (grids/plateau.yaml): BNRS, BRN, BRNC and BNWoS against BN at i.i.d. batches of 2, 16 and
    128 on Fashion-MNIST are the primary family (Holm over those 12); non-i.i.d. batches, GroupNorm and the 2x2's
    effects (the mechanism grid's family) are exploratory there; a grid without a plan has no primary row."""
    rng = np.random.default_rng(2)
    level = {"bn": 0.88, "bnrs": 0.70, "brn": 0.875, "brnc": 0.87, "bnwos": 0.879, "gn": 0.86, "bn_detached": 0.70}
    rows = []
    for b, sampler in ((2, "iid"), (16, "iid"), (128, "iid"), (2, "noniid")):
        for seed in range(5):
            for m, acc in level.items():
                for step in range(100, 1700, 100):
                    final = step == 1600
                    rows.append(
                        {
                            "cell": f"b{b}{sampler}s{seed}",
                            "seed": seed,
                            "method": m,
                            "step": step,
                            "steps_total": 1600,
                            "eval_size": 10000 if final else 2000,
                            "dataset": "fashionmnist",
                            "lr": 0.001,
                            "optimizer": "adam",
                            "batch_size": b,
                            "sampler": sampler,
                            "classes_per_batch": 1 if sampler == "noniid" else None,
                            "test_acc": acc + rng.normal(0, 0.002),
                            "test_acc_recomputed": None,
                            "final": final,
                            "diverged": False,
                            "num_classes": 10,
                        }
                    )
    table = pd.DataFrame(rows)
    assert analysis.plan_for(analysis.STUDY.name) is analysis.STUDY and analysis.plan_for("default") is analysis.NO_PLAN
    out = analysis.comparisons(table, plan=analysis.STUDY)
    primary = out[out["family"] == "primary"]
    assert len(primary) == 12 and set(primary["sampler"]) == {"iid"} and set(primary["batch_size"]) == {2, 16, 128}
    assert set(primary["comparison"]) == {"bnrs - bn", "brn - bn", "brnc - bn", "bnwos - bn"}
    assert (primary["correction"] == "Holm").all()
    assert not out.loc[out["comparison"].str.startswith("2x2"), "family"].eq("primary").any()
    verdicts = primary.set_index(["comparison", "batch_size"])["verdict"]
    assert verdicts[("bnrs - bn", 16)] == "below" and verdicts[("bnwos - bn", 128)] == "equivalent"
    # the same rows, read by the mechanism's plan, are primary only where it names them (its 2x2; none here: no
    # lr_schedule filter, but its conditions are batch 16 and 2 only)
    mech = analysis.comparisons(table, plan=analysis.MECHANISM)
    assert set(mech.loc[mech["family"] == "primary", "comparison"]) <= {*analysis.TWO_BY_TWO, "bnrs - bn"}
    assert (analysis.comparisons(table, plan=analysis.NO_PLAN)["family"] == "exploratory").all()
    # summary.csv of a grid with a plan carries the plan's verdicts, not a Holm over every row
    summary = analysis.with_plan(stats.summarise(table), out)
    assert "p_holm" not in summary
    rows = summary.assign(method=summary["method"].astype(str)).set_index(["sampler", "batch_size", "method"])
    assert (
        rows.loc[("iid", 128, "bnwos"), "verdict"] == "equivalent"
        and rows.loc[("iid", 128, "bnwos"), "family"] == "primary"
    )
    assert rows.loc[("noniid", 2, "bnrs"), "correction"] == "Benjamini-Hochberg"
    assert pd.isna(rows.loc[("iid", 2, "bn"), "family"])  # BN is the reference, compared with nothing


@pytest.mark.parametrize(
    "verdicts, expected",
    [
        # (brn, brnc, bnrs, bnwos) at batch 2, 16, 128 -> the four claims
        (
            {
                ("brn", 2): "above",
                ("brnc", 2): "cannot tell",
                ("brn", 16): "equivalent",
                ("brnc", 128): "cannot tell",
                ("bnrs", 2): "below",
                ("bnrs", 16): "below",
                ("bnrs", 128): "below",
                ("bnwos", 2): "below",
                ("bnwos", 16): "equivalent",
                ("bnwos", 128): "equivalent",
            },
            ["holds", "holds", "holds", "holds"],
        ),
        (
            {
                ("brn", 2): "above",
                ("brnc", 128): "above",
                ("bnrs", 2): "below",
                ("bnrs", 16): "equivalent",
                ("bnwos", 2): "equivalent",
                ("bnwos", 16): "equivalent",
                ("bnwos", 128): "below",
            },
            ["does not hold", "does not hold", "does not hold", "does not hold"],
        ),
        (
            {
                ("brn", 2): "below",
                ("brnc", 2): "cannot tell",
                ("bnrs", 2): "below",
                ("bnrs", 16): "below",
                ("bnwos", 2): "cannot tell",
                ("bnwos", 16): "equivalent",
            },
            ["cannot tell", "cannot tell", "cannot tell", "cannot tell"],
        ),
    ],
)
def test_the_original_claims_read_the_primary_verdicts_as_the_plan_says(verdicts, expected):
    rows = [
        {
            "comparison": f"{m} - bn",
            "batch_size": b,
            "verdict": v,
            "family": "primary",
            "outcome": "accuracy",
            "dataset": "fashionmnist",
            "sampler": "iid",
        }
        for (m, b), v in verdicts.items()
    ]
    # an exploratory row (BN not plateaued) is not read: here it would flip the first claim
    rows.append(
        {
            "comparison": "brn - bn",
            "batch_size": 16,
            "verdict": "above",
            "family": "exploratory",
            "outcome": "accuracy",
            "dataset": "fashionmnist",
            "sampler": "iid",
        }
    )
    rows[-1]["batch_size"] = 128 if ("brn", 16) in verdicts else 16
    claims = analysis.original_claims(pd.DataFrame(rows))
    assert [c["claim"] for c in claims] == list(analysis.CLAIMS)
    assert [c["verdict"] for c in claims] == expected
    # the evidence names what was not read: a comparison run but not primary, one not run at all
    exploratory_batch = rows[-1]["batch_size"]
    if ("brn", exploratory_batch) not in verdicts:
        assert f"brn at batch {exploratory_batch}: not primary" in claims[0]["evidence"]
    assert "not run yet" in claims[1]["evidence"] or len(verdicts) == 10


def test_mechanism_chapter_tables_and_traces_figure_from_a_tiny_grid():
    """The chapter's pieces end to end on a tiny real run (digits, 3 seeds, the 2x2 and GroupNorm, traced): the
    2x2 table names every corner and effect per condition, and the traces figure draws a panel per metric."""
    from bnlib import paper, plots, tables, train
    from bnlib.train import data

    config = train.Config(
        methods=["bn", "bn_detached", "brn", "bnrs", "gn"],
        batch_size=8,
        steps=24,
        evals=8,
        eval_samples=100,
        log_every=4,
        trace_every=4,
    )
    runs = train.train_seeds(config, [0, 1, 2], dataset=data.load("digits"), progress=False)
    from bnlib.record import Provenance

    for run, seed in zip(runs, [0, 1, 2]):
        run.cell, run.provenance = f"digits-s{seed}", Provenance()
    table, losses = tables.evaluations(runs), tables.training_losses(runs)
    comparisons = analysis.comparisons(table, losses)
    stats_summary = stats.summarise(table)
    two = paper.mechanism.twobytwo(stats_summary, comparisons)
    assert list(two.index) == ["i.i.d. batch 8"]
    assert {plots.display_name(m) for m in analysis.CORNERS} | set(analysis.EFFECTS) <= set(two.columns)
    assert len(stats_summary) == 5
    traces = tables.traces(runs).assign(condition="i.i.d. batch 8")
    assert set(traces["layer"]) == {1, 2, 3, 4} and traces["step"].max() == 24
    grid = plots.traces_over_training(traces, list(analysis.CORNERS))
    assert grid.axes.shape == (len(plots.TRACE_LABELS), 1)
    plots.plt.close("all")
    # traces_summary.csv: each metric at the first traced step, the one nearest half the run (the earlier of a tie)
    # and the last, the mean over seeds, per method and layer; the read-outs quote it
    summary = tables.trace_summary(tables.traces(runs))
    assert len(summary) == 5 * 4 * 3 and set(summary["n_seeds"]) == {3}
    assert summary.groupby("phase")["step"].first().to_dict() == {"first": 4, "half": 12, "last": 24}
    raw = tables.traces(runs)
    at = raw[(raw["method"] == "bnrs") & (raw["layer"] == 2) & (raw["step"] == 24)]["conv_weight_norm"].mean()
    row = summary[(summary["method"] == "bnrs") & (summary["layer"] == 2) & (summary["phase"] == "last")]
    assert row["conv_weight_norm"].iloc[0] == pytest.approx(at)
    text = paper.mechanism.trace_answer(summary)
    bn_end = summary[(summary["method"] == "bn") & (summary["phase"] == "last")]["conv_weight_norm"].mean()
    assert text.startswith("- **i.i.d. batch 8** (3 seeds)") and f"{bn_end:.3g} at the end" in text
    assert "bn_detached" in text and "BNRS" in text and "|log r|" in text
    fixes = paper.mechanism.fixes_answer(stats_summary, comparisons, table)
    assert fixes.startswith("- **i.i.d. batch 8**: BRN ") and "against BNRS" in fixes and "BN's time per step" in fixes
    checks = paper.mechanism.textbook_checks(comparisons, summary)
    assert set(checks["the data"]) <= {"agrees", "contradicts", "cannot tell"} and len(checks) == 2  # not brn - bn at 8
    assert (
        paper.reversal.reversal_answer(stats_summary, stats_summary, losses, comparisons) == ""
    )  # no non-i.i.d. batches here


def test_plateau_uses_every_evaluation_of_a_run_on_one_test_set_and_keeps_its_columns_when_empty():
    rows = [
        {
            "cell": "c",
            "seed": 0,
            "method": "bn",
            "step": s,
            "steps_total": 800,
            "eval_size": 360,
            "test_acc": 0.9,
            "dataset": "digits",
        }
        for s in range(100, 900, 100)
    ]
    assert analysis.plateau(pd.DataFrame(rows)).loc[0, "gain_last_quarter"] == pytest.approx(0.0)
    empty = analysis.plateau(pd.DataFrame(rows).iloc[:0])
    assert empty.empty and {"method", "plateaued"} <= set(empty.columns)


def test_a_planned_grids_secondary_summary_is_exploratory_under_benjamini_hochberg():
    summary = pd.DataFrame(
        {
            "method": ["bn", "a", "b", "c"],
            "diff_vs_bn": [np.nan, -0.1, 0.05, 0.2],
            "p_value": [np.nan, 0.01, 0.04, 0.03],
            "p_holm": [np.nan, 0.03, 0.06, 0.06],
            "verdict": [None, "below", "cannot tell", "cannot tell"],
        }
    )
    out = analysis.exploratory_summary(summary)
    assert (
        "p_holm" not in out and list(out["family"].iloc[1:]) == ["exploratory"] * 3 and pd.isna(out["family"].iloc[0])
    )
    assert out["p_adjusted"].iloc[1:].tolist() == pytest.approx(
        [0.03, 0.04, 0.04]
    )  # BH: 0.01*3/1, 0.04, 0.03*3/2 -> 0.04
    assert list(out["verdict"].iloc[1:]) == ["below", "above", "above"]
    assert book_adjusted(out.iloc[1]) == "0.03 (exploratory, Benjamini-Hochberg)"


def book_adjusted(row) -> str:
    from bnlib import paper

    return paper.words.adjusted_p(row)["adjusted p"]


def test_sampler_cost_pairs_each_method_by_seed_across_samplers_with_its_own_family():
    """Known costs: BN loses 0.60 with one-class batches, BNRS nothing, bn_detached 0.20 and BRN 0.10 (plus seed noise
    shared by both samplers of a seed, which pairing removes); a method run under one sampler only has no cost row.
    The 2x2's effects on the cost: forward ((-0.10 + 0.60) + (0.00 + 0.20)) / 2 = +0.35, gradient
    ((-0.20 + 0.60) + (0.00 + 0.10)) / 2 = +0.25, interaction (0.00 + 0.10) - (-0.20 + 0.60) = -0.30."""
    cost = {"bn": -0.60, "bnrs": 0.0, "bn_detached": -0.20, "brn": -0.10}
    noise = [0.0, 0.02, -0.01, 0.015, -0.02]
    rows = [
        {
            "dataset": "fashionmnist",
            "batch_size": 2,
            "sampler": sampler,
            "classes_per_batch": 1 if sampler == "noniid" else None,
            "method": m,
            "seed": s,
            "final": True,
            "diverged": False,
            "num_classes": 10,
            "test_acc": 0.85 + n + (c if sampler == "noniid" else 0.0) + 0.001 * (sampler == "noniid") * (s % 2),
        }
        for m, c in cost.items()
        for s, n in enumerate(noise)
        for sampler in ("iid", "noniid")
    ]
    rows += [{**rows[0], "method": "gn", "seed": s} for s in range(5)]  # i.i.d. only
    out = analysis.sampler_cost(pd.DataFrame(rows)).set_index("comparison")
    assert "gn: noniid - iid" not in out.index
    for m, c in cost.items():
        assert out.loc[f"{m}: noniid - iid", "mean"] == pytest.approx(c + 0.0004, abs=1e-9)
        assert out.loc[f"{m}: noniid - iid", "method"] == m
    assert (
        out.loc["bn: noniid - iid", "verdict"] == "below" and out.loc["bnrs: noniid - iid", "verdict"] == "equivalent"
    )
    assert [out.loc[f"2x2: {name}", "mean"] for name in analysis.EFFECTS] == pytest.approx([0.35, 0.25, -0.30])
    assert set(out["family"]) == {"exploratory"} and set(out["correction"]) == {"Benjamini-Hochberg"}
    assert analysis.sampler_cost(pd.DataFrame(rows).query("sampler == 'iid'")).empty


def test_evaluation_gap_pairs_two_evaluations_of_each_network_by_seed():
    """bn's networks are 0.70 better with their test batches' statistics than with running ones, gn has no batch
    statistics (left out), and a diverged run without numbers drops out of its pair."""
    rows = [
        {
            "dataset": "fashionmnist",
            "batch_size": 2,
            "sampler": "noniid",
            "method": m,
            "seed": s,
            "final": True,
            "test_acc": 0.15 + 0.01 * s,
            "test_acc_batchstats": b,
        }
        for s in range(3)
        for m, b in (("bn", 0.85 + 0.01 * s + 0.002 * (s == 1)), ("gn", None))
    ]
    rows.append({**rows[0], "seed": 3, "test_acc": None, "test_acc_batchstats": None})
    rows.append({**rows[0], "final": False, "test_acc_batchstats": 0.1})  # not the last evaluation
    out = analysis.evaluation_gap(pd.DataFrame(rows)).set_index("comparison")
    assert list(out.index) == ["bn: test_acc_batchstats - test_acc"]
    row = out.loc["bn: test_acc_batchstats - test_acc"]
    assert row["n_seeds"] == 3 and row["mean"] == pytest.approx(0.70 + 0.002 / 3) and row["verdict"] == "above"
    assert row["family"] == "exploratory" and row["method"] == "bn"


def _finals(diffs: dict[str, list[float]], batch_size: int, bn: list[float]) -> pd.DataFrame:
    """A tidy table of final evaluations at one i.i.d. Fashion-MNIST condition: BN's accuracies per seed and each
    method's as BN's plus its difference."""
    rows = []
    for method, values in {"bn": [0.0] * len(bn), **diffs}.items():
        for seed, (base, d) in enumerate(zip(bn, values)):
            rows.append(
                {
                    "cell": f"c{seed}",
                    "seed": seed,
                    "method": method,
                    "final": True,
                    "diverged": False,
                    "num_classes": 10,
                    "test_acc": base + d,
                    "dataset": "fashionmnist",
                    "sampler": "iid",
                    "batch_size": batch_size,
                    "optimizer": "adam",
                    "lr": 0.001,
                }
            )
    return pd.DataFrame(rows)


def test_budget_change_reads_the_change_of_each_difference_to_bn_paired_by_seed():
    """Constructed 1x and 2x tables with known changes: a difference that stays put is equivalent (converged), one
    that shrinks by 5 points is 'moved toward BN', one that grows is 'moved away from BN'; seeds pair by seed and a
    seed only one budget has is left out; the family is Holm over the plan's 12 comparisons."""
    bn = [0.85, 0.86, 0.84, 0.85, 0.86]
    noise = [0.001, -0.001, 0.0005, -0.0005, 0.0]
    short, long = [], []
    for b in (2, 16, 128):
        short.append(
            _finals(
                {
                    "bnrs": [-0.20 + n for n in noise],
                    "brn": [-0.01] * 5,
                    "brnc": [-0.02 + n for n in noise],
                    "bnwos": [-0.30] * 5,
                },
                b,
                bn,
            )
        )
        long.append(
            _finals(
                {
                    "bnrs": [-0.15 - n for n in noise],
                    "brn": [-0.01 + n for n in noise],
                    "brnc": [-0.07 + 2 * n for n in noise],
                    "bnwos": [-0.30] * 4,
                },
                b,
                [x + 0.01 for x in bn[:4]],
            )
        )
    out = analysis.budget_change(pd.concat(short), pd.concat(long))
    assert len(out) == 12 and set(out["family"]) == {"primary"} and set(out["correction"]) == {"Holm"}
    verdicts = out.set_index(["comparison", "batch_size"])["verdict"]
    for b in (2, 16, 128):
        assert verdicts[("bnrs - bn", b)] == "moved toward BN"
        assert verdicts[("brnc - bn", b)] == "moved away from BN"
        assert verdicts[("brn - bn", b)] == "equivalent" and verdicts[("bnwos - bn", b)] == "equivalent"
    assert (out["n_seeds"] == 4).all()  # seed 4 has no 2x cell here
    row = out[(out["comparison"] == "bnrs - bn") & (out["batch_size"] == 2)].iloc[0]
    assert row["mean"] == pytest.approx(0.05, abs=2e-3) and row["diff_short"] < row["diff_long"] < 0


def test_intervention_tests_read_recovery_and_cost_against_half_the_gap_in_one_holm_family():
    """Constructed: BN 0.85, the no-gradient arm 0.60 and BNRS 0.65 (free, the mechanism grid); bn_detached_to_bn
    recovers 0.20 of the 0.25 gap (at least half), bnrs_to_bn 0.02 of 0.20 (less than half), bn_to_bn_detached costs
    BN 0.10 of 0.25 (less than half); the decay arms sit at half the gap (cannot tell). Two batch sizes: a family of
    10, Holm."""
    noise = [0.002, -0.001, 0.0, 0.001, -0.002]
    free, arms = [], []
    for b in (16, 2):
        free.append(
            _finals({"bn_detached": [-0.25 + n for n in noise], "bnrs": [-0.20 - n for n in noise]}, b, [0.85] * 5)
        )
        arms.append(
            _finals(
                {
                    "bn_detached_to_bn": [-0.05 + n for n in noise],
                    "bnrs_to_bn": [-0.18 + n for n in noise],
                    "bn_to_bn_detached": [-0.10 - n for n in noise],
                    "bn_detached_wd": [-0.125 + 3 * n for n in noise],
                    "bnrs_wd": [-0.10 - 3 * n for n in noise],
                },
                b,
                [0.85] * 5,
            )
        )
    arms = pd.concat(arms)
    out = analysis.intervention_tests(pd.concat(free), arms[arms["method"] != "bn"])
    assert len(out) == 10 and set(out["correction"]) == {"Holm"}
    verdicts = out.set_index(["arm", "batch_size"])["verdict"]
    for b in (16, 2):
        assert verdicts[("bn_detached_to_bn", b)] == "at least half"
        assert verdicts[("bnrs_to_bn", b)] == "less than half"
        assert verdicts[("bn_to_bn_detached", b)] == "less than half"
        assert verdicts[("bn_detached_wd", b)] == "cannot tell" and verdicts[("bnrs_wd", b)] == "cannot tell"
    row = out[(out["arm"] == "bn_detached_to_bn") & (out["batch_size"] == 16)].iloc[0]
    assert row["mean"] == pytest.approx(0.20 - 0.125, abs=1e-3) and row["gap"] == pytest.approx(0.25, abs=1e-3)
    # no gap: a free arm within the margin of BN is not tested
    flat = analysis.intervention_tests(
        _finals({"bn_detached": [0.001, -0.001, 0.0, 0.0005, -0.0005], "bnrs": [-0.2] * 5}, 16, [0.85] * 5),
        arms[(arms["batch_size"] == 16) & (arms["method"] != "bn")],
        batch_sizes=(16,),
    )
    assert (flat.loc[flat["free"] == "bn_detached", "verdict"] == "no gap").all()


def test_manipulation_checks_hold_follow_arms_to_their_target_and_decay_arms_below_half_the_free_arm():
    def traces(norms: dict[str, list[float]], b: int = 16) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {"batch_size": b, "seed": s, "method": m, "layer": layer, "step": 100, "conv_weight_norm": value}
                for m, values in norms.items()
                for s in range(2)
                for layer, value in enumerate(values, 1)
            ]
        )

    arms = traces(
        {
            "bn": [2.0, 3.0],
            "bn_detached": [9.0, 12.0],
            "bn_detached_to_bn": [2.0, 3.0],
            "bnrs_to_bn": [2.0, 4.5],
            "bn_to_bn_detached": [9.0, 12.0],
            "bn_detached_wd": [1.0, 1.5],
            "bnrs_wd": [1.0, 5.0],
        }
    )
    free = traces({"bn_detached": [9.0, 12.0], "bnrs": [6.0, 6.0]})
    out = analysis.manipulation_checks(arms, free)
    passed = out.groupby("arm")["passed"].first()
    assert passed["bn_detached_to_bn"] and passed["bn_to_bn_detached"] and passed["bn_detached_wd"]
    assert not passed["bnrs_to_bn"]  # layer 2 at 1.5x its target
    assert not passed["bnrs_wd"]  # layer 2 at 5/6 of the free arm's: growth not curbed to half
    ratio = out.set_index(["arm", "layer"])["norm_ratio"]
    assert ratio[("bnrs_to_bn", 2)] == pytest.approx(1.5) and ratio[("bn_detached_wd", 1)] == pytest.approx(1 / 9)


def test_the_intervention_arms_table_agrees_with_the_registry():
    norms = pytest.importorskip("bnlib.norms")
    for arm, (kind, _, target) in analysis.INTERVENTION_ARMS.items():
        spec = norms.spec(arm)
        assert spec.follows == target and (spec.filter_decay is not None) == (kind == "decay"), arm
    assert {m for m, s in norms.REGISTRY.items() if s.follows or s.filter_decay} == set(analysis.INTERVENTION_ARMS)


def test_the_amended_verdict_says_within_the_margin_only_where_both_tests_say_so():
    """The plan's amendment of 2026-12-07: significant and TOST-equivalent -> "below, within the margin"; the
    pre-registered verdict is unchanged ("below")."""
    alpha = stats.ALPHA
    assert analysis.verdict(-0.007, alpha / 10, alpha / 2) == "below"
    assert analysis.amended_verdict(-0.007, alpha / 10, alpha / 2) == "below, within the margin"
    assert analysis.amended_verdict(0.007, alpha / 10, alpha / 2) == "above, within the margin"
    assert analysis.amended_verdict(-0.007, alpha / 10, 2 * alpha) == "below"  # not shown within the margin
    assert analysis.amended_verdict(0.0, 2 * alpha, alpha / 2) == "equivalent"
    assert analysis.amended_verdict(0.0, 2 * alpha, float("nan")) == "cannot tell"
    rows = pd.DataFrame(
        [
            {"family": "primary", "mean": -0.007, "p_value": 0.0001, "p_tost": 0.001},
            {"family": "primary", "mean": -0.2, "p_value": 0.0001, "p_tost": 1.0},
        ]
    )
    out = analysis.correct(rows)
    assert list(out["verdict"]) == ["below", "below"]
    assert list(out["verdict_amended"]) == ["below, within the margin", "below"]


def _claim_rows(verdicts: dict) -> pd.DataFrame:
    """Primary comparisons with BN at the study's batch sizes: (method, batch) -> (verdict, amended verdict)."""
    return pd.DataFrame(
        [
            {
                "comparison": f"{m} - bn",
                "batch_size": b,
                "verdict": v,
                "verdict_amended": a,
                "family": "primary",
                "outcome": "accuracy",
                "dataset": "fashionmnist",
                "sampler": "iid",
            }
            for (m, b), (v, a) in verdicts.items()
        ]
    )


def _plateau(bnrs: dict, bn: dict) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"dataset": "fashionmnist", "sampler": "iid", "batch_size": b, "method": m, "plateaued": p}
            for m, status in (("bnrs", bnrs), ("bn", bn))
            for b, p in status.items()
        ]
    )


def test_the_amended_claims_stand_beside_the_pre_registered_ones():
    """Claim 4 under the amendment holds where BNWoS is within the margin; claim 2 under the amendment reads the
    plateau criterion (BNRS not plateaued where BN has: slower; plateaued wherever BN did: converges to less)."""
    below, within = ("below", "below"), ("below", "below, within the margin")
    verdicts = {
        ("brn", 2): ("cannot tell",) * 2,
        ("brnc", 2): ("cannot tell",) * 2,
        ("bnrs", 2): below,
        ("bnrs", 16): below,
        ("bnrs", 128): below,
        ("bnwos", 2): below,
        ("bnwos", 16): within,
        ("bnwos", 128): ("equivalent",) * 2,
    }
    everywhere = {2: True, 16: True, 128: True}
    claims = analysis.original_claims(_claim_rows(verdicts), plateau=_plateau(everywhere, everywhere))
    assert [c["verdict"] for c in claims] == ["cannot tell", "holds", "holds", "does not hold"]
    assert [c["amended"] for c in claims] == ["cannot tell", "does not hold", "holds", "holds"]
    assert "batch 2: BNRS plateaued, BN plateaued" in claims[1]["amended_evidence"]
    assert "bnwos at batch 16: below, within the margin" in claims[3]["amended_evidence"]
    # BNRS still rising wherever BN has plateaued: slower by the plateau criterion
    slower = analysis.original_claims(
        _claim_rows(verdicts), plateau=_plateau(dict.fromkeys(everywhere, False), everywhere)
    )
    assert slower[1]["amended"] == "holds"
    # mixed, or BN not plateaued anywhere, or no plateau table: cannot tell
    mixed = _plateau({2: False, 16: True, 128: True}, everywhere)
    assert analysis.original_claims(_claim_rows(verdicts), plateau=mixed)[1]["amended"] == "cannot tell"
    unsettled = _plateau(everywhere, dict.fromkeys(everywhere, False))
    assert analysis.original_claims(_claim_rows(verdicts), plateau=unsettled)[1]["amended"] == "cannot tell"
    assert analysis.original_claims(_claim_rows(verdicts))[1]["amended"] == "cannot tell"
    # a BNWoS difference beyond the margin at one larger batch: claim 4 does not hold under either reading
    beyond = {**verdicts, ("bnwos", 128): below}
    assert analysis.original_claims(_claim_rows(beyond))[3]["amended"] == "does not hold"


def _arm_verdicts(b: int, **verdicts) -> list[dict]:
    return [{"batch_size": b, "arm": arm, "verdict": v} for arm, v in verdicts.items()]


def test_growth_reading_says_what_the_plan_decided_and_counts_a_failed_manipulation_as_no_evidence():
    half, less, unsure = "at least half", "less than half", "cannot tell"
    tests = pd.DataFrame(
        _arm_verdicts(16, bn_detached_to_bn=half, bnrs_to_bn=half, bn_to_bn_detached=half, bn_detached_wd=less)
        + _arm_verdicts(2, bn_detached_to_bn=half, bnrs_to_bn=half, bn_to_bn_detached=less)
        + _arm_verdicts(4, bn_detached_to_bn=half, bnrs_to_bn=less, bn_to_bn_detached=half)
        + _arm_verdicts(8, bn_detached_to_bn=half, bnrs_to_bn=unsure, bn_to_bn_detached=half)
    )
    assert analysis.growth_reading(tests) == {
        2: "growth is necessary, not sufficient",
        4: "growth is not necessary",
        8: None,  # a necessity arm cannot tell: arm by arm, no summary
        16: "growth is the cause",  # the decay arms do not enter the summary
    }
    failed = pd.DataFrame([{"batch_size": 16, "arm": "bnrs_to_bn", "passed": False}])
    assert analysis.growth_reading(tests, failed)[16] is None  # its verdict is no evidence


def test_the_controls_chapter_shows_verdicts_only_for_a_finished_grid_and_marks_a_failed_manipulation():
    assert paper.controls.progress_line("doubling", 15, 15) == ""
    assert paper.controls.progress_line("doubling", 2, 15).startswith("2 of 15 cells of `grids/doubling.yaml`")
    tests = pd.DataFrame(
        [
            {
                "batch_size": 16,
                "arm": a,
                "kind": k,
                "gap": 0.22,
                "mean": m,
                "ci_low": m - 0.01,
                "ci_high": m + 0.01,
                "n_seeds": 5,
                "verdict": v,
            }
            for a, k, m, v in (
                ("bn_detached_to_bn", "necessity", -0.1, "less than half"),
                ("bn_detached_wd", "decay", -0.1, "less than half"),
            )
        ]
    )
    checks = pd.DataFrame(
        [
            {"batch_size": 16, "arm": "bn_detached_to_bn", "passed": True},
            {"batch_size": 16, "arm": "bn_detached_wd", "passed": False},
        ]
    )
    table = paper.controls.growth_table(tests, checks)
    assert list(table["verdict"]) == ["less than half", "less than half (failed manipulation)"]
    assert list(table["beyond half the gap (points)"]) == ["-10.0 [-11.0, -9.0]"] * 2
    assert paper.controls.growth_said(tests, checks) == "At batch 16: growth is not necessary."
