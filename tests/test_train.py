"""The lockstep loop: configuration errors, determinism, divergence, and that BN learns the digits."""

import math

import pytest
import torch
import torch.nn.functional as F

from bnlib import norms, train, verify
from bnlib.train import checkpoint, compiling, data, evaluate, models
from bnlib.train import stacked as stacked_mod

DIGITS = None


def digits():
    global DIGITS
    DIGITS = DIGITS or data.load("digits")
    return DIGITS


def _train(*args, **kwargs) -> dict:
    """train.train's record as the metrics file's dict."""
    return train.train(*args, **kwargs).to_dict()


def _train_seeds(*args, **kwargs) -> list[dict]:
    return [out.to_dict() for out in train.train_seeds(*args, **kwargs)]


def _strip_timings(result):
    out = {k: v for k, v in result.items() if k not in ("wall_seconds", "eval_seconds")}
    out["methods"] = {
        m: {k: v for k, v in r.items() if k not in ("train_seconds", "samples_per_second")}
        for m, r in result["methods"].items()
    }
    return out


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"methods": ["bn", "bogus"]}, "methods"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"batch_size": 1}, "batch_size"),
        ({"methods": ["bnwos"], "batch_size": 3, "norm_options": {"bnwos": {"devices": 4}}}, "batch_size"),
        ({"steps": 0}, "steps"),
        ({"steps": None, "epochs": -1.0}, "epochs"),
        ({"epochs": 1.0}, "steps=10, epochs=1.0"),
        ({"sampler": "noniid", "classes_per_batch": 3}, "classes_per_batch"),
        ({"sampler": "noniid"}, "classes_per_batch"),
        ({"sampler": "sorted"}, "sampler"),
        ({"norm_options": {"brnc": {"rmax": 0.5}}}, "norm_options"),
        ({"norm_options": {"bn": {"nonsense": 1}}}, "norm_options"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"norm_placement": "middle"}, "norm_placement"),
        ({"precision": "fp16"}, "precision"),
        ({"eval_samples": 0}, "eval_samples"),
        ({"norm_position": "middle"}, "norm_position"),
        ({"init_samples": -1}, "init_samples"),
        ({"checkpoint_minutes": -1}, "checkpoint_minutes"),
        ({"compile": "yes"}, "compile"),
        ({"recompute_evals": "first"}, "recompute_evals"),
        ({"trace_every": 0}, "trace_every"),
        ({"lr_schedule": "cosine"}, "lr_schedule"),
        ({"lr_drop_at": 1.0}, "lr_drop_at"),
    ],
)
def test_bad_configuration_is_rejected_before_training(changes, key, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(models, "build", no_training)
    config = train.Config(**{"steps": 10, **changes})
    with pytest.raises(train.ConfigError, match=key.replace("(", r"\(")):
        _train(config, dataset=digits(), progress=False)


def test_batch_of_one_is_fine_without_batch_statistics():
    result = _train(
        train.Config(methods=["gn", "bln", "none", "frn", "evonorm"], batch_size=1, steps=3, eval_every=3),
        dataset=digits(),
        progress=False,
    )
    assert set(result["methods"]) == {"gn", "bln", "none", "frn", "evonorm"}
    for m, rec in result["methods"].items():
        assert (
            not rec["diverged"] and len(rec["train_loss"]) == 3 and all(math.isfinite(v) for v in rec["train_loss"])
        ), m
        assert 0.0 <= rec["final"]["test_acc"] <= 1.0, m


def test_unknown_config_key_names_the_source():
    with pytest.raises(train.ConfigError, match="grid.yaml: unknown key.*batchsize"):
        train.Config.from_dict({"batchsize": 3}, source="grid.yaml")


def test_same_seed_same_numbers():
    config = train.Config(
        methods=["bn", "brnc", "mabn", "bln"],
        batch_size=8,
        steps=40,
        eval_every=20,
        log_every=10,
        recompute=True,
        recompute_samples=64,
    )
    a = _train(config, dataset=digits(), progress=False)
    b = _train(config, dataset=digits(), progress=False)
    assert _strip_timings(a) == _strip_timings(b)
    other = _train(train.Config(**{**config.__dict__, "seed": 1}), dataset=digits(), progress=False)
    assert other["methods"]["bn"]["train_loss"] != a["methods"]["bn"]["train_loss"]


class _Killed(BaseException):
    """Stands in for kill -9: nothing after it runs (not an Exception, so no handler in the loop catches it)."""


@pytest.mark.parametrize("sampler,methods", [("iid", list(norms.METHODS)), ("noniid", ["bn", "brnc", "mabn", "bln"])])
def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_numbers(sampler, methods, tmp_path, monkeypatch):
    """Every method (running statistics, MABN's buffers, BLN's auxiliary loss...) killed in the middle of a log
    window after an evaluation, resumed: bit for bit the uninterrupted run, i.i.d. and non-i.i.d. streams."""
    config = train.Config(
        methods=methods,
        batch_size=4,
        steps=20,
        evals=2,
        log_every=4,
        recompute=True,
        recompute_samples=16,
        sampler=sampler,
        classes_per_batch=2 if sampler == "noniid" else None,
        checkpoint_minutes=0,
    )
    whole = _train(config, dataset=digits(), progress=False)
    ckpt = tmp_path / "cell.ckpt"
    save = checkpoint.save
    saved_steps = []

    def killed_after_step_13(path, state):
        save(path, state)
        saved_steps.append(state["step"])
        if state["step"] == 13:
            raise _Killed

    monkeypatch.setattr(checkpoint, "save", killed_after_step_13)
    with pytest.raises(_Killed):
        _train(config, dataset=digits(), progress=False, checkpoint=ckpt)
    assert saved_steps == list(range(1, 14)) and ckpt.exists()
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = _train(config, dataset=digits(), progress=False, checkpoint=ckpt)
    assert resumed.pop("resumed_at_steps") == [13]
    assert _strip_timings(resumed) == _strip_timings(whole)
    assert resumed["methods"]["bn"]["train_seconds"] > 0


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, capsys):
    config = train.Config(methods=["bn"], batch_size=4, steps=6, evals=1, checkpoint_minutes=0)
    ckpt = tmp_path / "cell.ckpt"
    checkpoint.save(
        ckpt, {"key": checkpoint.key(train.Config(**{**config.__dict__, "lr": 0.1}), [0], train.LOCAL_KEYS), "step": 3}
    )
    result = _train(config, dataset=digits(), progress=False, checkpoint=ckpt)
    assert "other settings or training code; starting from step 0" in capsys.readouterr().out
    assert "resumed_at_steps" not in result
    ckpt.write_bytes(b"half a file")
    _train(config, dataset=digits(), progress=False, checkpoint=ckpt)
    assert "is unreadable" in capsys.readouterr().out


def _close(a, b, rel=1e-5):
    """Equal, or both finite numbers within ``rel`` of each other (None and lists compared element by element)."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or abs(a - b) <= rel * max(abs(a), abs(b))
    return a == b


# FRN is left out at batch 64: there it amplifies the float32 difference between the stacked (grouped) and solo
# convolutions into different runs (training loss 1.04e-4 apart after 16 steps, test accuracy 2 of 360 images apart
# at the end, deterministically, with one thread per worker on an AVX2 EPYC); its stacking is checked at batch 4
@pytest.mark.parametrize(
    "sampler,methods,batch_size",
    [("iid", list(norms.METHODS), 4), ("noniid", ["bn", "gn", "bln", "mabn"], 4), ("iid", ["bn", "mabn", "gn"], 64)],
)
def test_stacked_seeds_equal_their_solo_runs_for_every_method(sampler, methods, batch_size):
    """Three seeds trained as one stacked model: every seed's batches, initial weights (BLN's data start too),
    curves and evaluations (recomputed and batch statistics included) are its solo run's, to float tolerance.
    At batch 4 the batch-statistics evaluation runs stacked, at 64 through the seeds' own networks."""
    assert 4 <= evaluate.STACKED_EVAL_MAX_BATCH["cpu"] < 64
    config = train.Config(
        methods=methods,
        batch_size=batch_size,
        steps=24,
        evals=2,
        log_every=4,
        recompute=True,
        recompute_samples=16,
        eval_batch_stats=True,
        sampler=sampler,
        classes_per_batch=2 if sampler == "noniid" else None,
    )
    seeds = [3, 0, 5]
    stacked = _train_seeds(config, seeds, dataset=digits(), progress=False)
    for seed, result in zip(seeds, stacked):
        solo = _train(train.Config(**{**config.__dict__, "seed": seed}), dataset=digits(), progress=False)
        assert result["config"]["seed"] == seed and result.pop("stacked_seeds") == seeds
        a, b = _strip_timings(result), _strip_timings(solo)
        assert a.keys() == b.keys()
        for m in config.methods:
            for key, value in b["methods"][m].items():
                if key == "final":
                    assert all(_close(a["methods"][m][key][k], v) for k, v in value.items()), (seed, m, key)
                else:
                    assert _close(a["methods"][m][key], value), (seed, m, key)
        assert {k: v for k, v in a.items() if k != "methods"} == {k: v for k, v in b.items() if k != "methods"}


def test_a_diverged_stacked_seed_leaves_the_others_untouched(monkeypatch):
    """NaN in one seed's channels stays there: that seed is recorded as diverged at the end of the log window
    where it happened (as a solo run is), the other seeds finish with their solo numbers."""
    stack = stacked_mod.StackedNet

    class Poisoned(stack):
        calls = 0

        def forward(self, x):
            out = super().forward(x)
            Poisoned.calls += self.training
            if Poisoned.calls > 12:  # seed index 1's logits become NaN from the 13th training step on
                out = out.clone()
                out[:, 1] = float("nan")
            return out

    monkeypatch.setattr(stacked_mod, "StackedNet", Poisoned)
    config = train.Config(methods=["bn"], batch_size=8, steps=40, eval_every=10, log_every=5)
    outs = _train_seeds(config, [0, 1, 2], dataset=digits(), progress=False)
    bad = outs[1]["methods"]["bn"]
    assert bad["diverged"] and bad["diverged_step"] == 15 and bad["final"]["test_acc"] is None
    assert bad["train_step"] == [5, 10] and bad["eval_step"] == [10]
    others = outs
    for k in (0, 2):
        solo = _train(train.Config(**{**config.__dict__, "seed": k}), dataset=digits(), progress=False)
        assert not others[k]["methods"]["bn"]["diverged"]
        assert _close(others[k]["methods"]["bn"]["train_loss"], solo["methods"]["bn"]["train_loss"])
        assert others[k]["methods"]["bn"]["eval_step"] == [10, 20, 30, 40]


def test_seeds_must_be_distinct_integers():
    with pytest.raises(train.ConfigError, match="seeds"):
        _train_seeds(train.Config(steps=2), [1, 1], dataset=digits(), progress=False)


def test_epoch_budget_equalises_samples():
    for batch in (2, 16):
        result = _train(train.Config(methods=["gn"], batch_size=batch, epochs=0.25), dataset=digits(), progress=False)
        # a quarter of the 1,437 training digits, whatever the batch size (pinned, not the formula again)
        assert result["steps"] == {2: 180, 16: 22}[batch]
        assert abs(result["steps"] * batch - 1437 / 4) <= batch / 2


def test_diverged_method_is_recorded_and_others_finish(monkeypatch):
    build = models.build

    def poisoned(method, *args, **kwargs):
        net = build(method, *args, **kwargs)
        if method == "bnrs":
            calls = {"n": 0}

            def hook(module, inputs, output):
                calls["n"] += module.training
                return output * float("nan") if calls["n"] > 12 else output

            net.classifier.register_forward_hook(hook)
        return net

    monkeypatch.setattr(models, "build", poisoned)
    result = _train(
        train.Config(methods=["bn", "bnrs"], batch_size=8, steps=40, eval_every=10, log_every=5),
        dataset=digits(),
        progress=False,
    )
    bad, good = result["methods"]["bnrs"], result["methods"]["bn"]
    assert bad["diverged"] and bad["diverged_step"] == 15
    assert bad["train_step"] == [5, 10] and bad["eval_step"] == [10]  # records up to the divergence kept
    assert bad["final"]["test_acc"] is None
    assert not good["diverged"] and good["eval_step"] == [10, 20, 30, 40] and len(good["train_step"]) == 8
    assert all(math.isfinite(v) for v in good["train_loss"])


def test_lockstep_on_digits_bn_learns():
    result = _train(
        train.Config(methods=["bn", "brn", "gn"], batch_size=16, epochs=2, recompute=True),
        dataset=digits(),
        progress=False,
    )
    for m in ("bn", "brn", "gn"):
        assert result["methods"][m]["final"]["test_acc"] > 0.85, (m, result["methods"][m]["final"])
    assert result["methods"]["bn"]["final"]["test_acc_recomputed"] > 0.85
    assert result["methods"]["gn"]["final"]["test_acc_recomputed"] is None  # no running statistics to recompute
    assert result["methods"]["bn"]["samples_per_second"] > 0


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(train.ConfigError, match="CUDA is not available"):
        train.validate(train.Config(steps=1, device="cuda"))


def test_evaluation_subset_changes_nothing_but_the_in_training_evaluations():
    """Evaluations on a fixed test subset (and recomputed statistics, restored afterwards) must not touch
    training: the final full-test-set numbers are identical to evaluating on everything every time."""
    base = dict(
        methods=["bn", "bnrs", "mabn", "bln"],
        batch_size=8,
        steps=30,
        eval_every=10,
        log_every=10,
        recompute=True,
        recompute_samples=64,
    )
    full = _train(train.Config(**base, eval_samples=None), dataset=digits(), progress=False)
    sub = _train(train.Config(**base, eval_samples=50), dataset=digits(), progress=False)
    n_test = len(digits().y_test)
    for m in base["methods"]:
        assert sub["methods"][m]["eval_size"] == [50, 50, n_test] and full["methods"][m]["eval_size"] == [n_test] * 3
        assert sub["methods"][m]["final"] == full["methods"][m]["final"], m
        assert sub["methods"][m]["train_loss"] == full["methods"][m]["train_loss"], m
        assert sub["methods"][m]["test_acc"][:2] != full["methods"][m]["test_acc"][:2] or m == "bln"
    # the subset is fixed: the same samples for another seed
    other = _train(train.Config(**{**base, "seed": 3}, eval_samples=50), dataset=digits(), progress=False)
    assert other["methods"]["bn"]["eval_size"] == [50, 50, n_test]


def test_recomputed_evaluation_leaves_the_model_untouched():
    torch.manual_seed(0)
    net = models.build("mabn", 0, 1, 10)
    net.train()
    for _ in range(3):
        net(torch.randn(4, 1, 8, 8)).sum().backward()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [torch.randn(4, 1, 8, 8) for _ in range(3)]
    acc, loss = evaluate.evaluate_recomputed(net, batches, torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,)))
    assert math.isfinite(loss) and net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("batch", [2, 16])
def test_every_method_stays_finite_in_bf16(batch):
    from bnlib import norms

    # a narrow net: CPUs without bf16 instructions emulate bf16 at ~1 GFLOP/s
    config = train.Config(
        methods=list(norms.METHODS),
        batch_size=batch,
        steps=30,
        eval_every=15,
        log_every=10,
        width=8,
        recompute=True,
        recompute_samples=32,
        precision="bf16",
    )
    result = _train(config, dataset=digits(), progress=False)
    fp32 = _train(train.Config(**{**config.__dict__, "precision": "fp32"}), dataset=digits(), progress=False)
    for m, rec in result["methods"].items():
        assert not rec["diverged"], m
        assert all(math.isfinite(v) for v in rec["train_loss"] + rec["test_loss"]), m
        # bf16 follows fp32's learning curve: final losses close, though not bit-equal (bf16 really ran)
        ref = fp32["methods"][m]
        assert rec["train_loss"] != ref["train_loss"], m
        assert abs(rec["final"]["test_loss"] - ref["final"]["test_loss"]) < 0.1 * ref["final"]["test_loss"], (
            m,
            rec["final"],
            ref["final"],
        )


def test_layers_get_their_run_options_and_bln_its_initialisation(monkeypatch):
    """MABN's buffer follows the batch (32 // batch), BRNC's warm-up the run's steps, and BLN starts from its
    inputs' statistics (the authors' initialisation) unless init_samples is 0."""
    from bnlib import norms

    built = {}
    real_build = models.build

    def spy(method, *args, **kwargs):
        built[method] = real_build(method, *args, **kwargs)
        built[method, "options"] = kwargs["norm_options"]
        return built[method]

    monkeypatch.setattr(models, "build", spy)
    config = train.Config(
        methods=["mabn", "brnc_warmup", "bln"],
        batch_size=8,
        steps=16,
        recompute=False,
        norm_options={"mabn": {"warmup_steps": 3}},
    )
    calls = []
    real_init = norms.initialise_statistics
    monkeypatch.setattr(
        norms,
        "initialise_statistics",
        lambda model, batches: calls.append(sum(len(b) for b in batches)) or real_init(model, batches),
    )
    _train(config, dataset=digits(), progress=False)
    assert built["mabn", "options"] == {"buffer_size": 4, "warmup_steps": 3}
    assert built["brnc_warmup", "options"] == {"warmup_steps": 2, "dmax_ramp_steps": 8, "rmax_ramp_steps": 14}
    assert calls == [1000] * 3  # every model, before its first step (a no-op for those without BLN)
    calls.clear()
    _train(train.Config(**{**config.__dict__, "init_samples": 0}), dataset=digits(), progress=False)
    assert calls == []


def test_bln_initialisation_starts_at_the_data_statistics():
    from bnlib import norms

    net = models.build("bln", 0, 1, 10, norm_position="post")
    x = digits().x_train[:500]
    norms.initialise_statistics(net, [x])
    layers = [m for m in net.modules() if isinstance(m, norms.BatchlessNorm)]
    stds = [float(m.log_std.detach().exp().mean()) for m in layers]
    assert all(s < 0.9 for s in stds), stds  # real activations are far from the default std 1
    assert any(not torch.allclose(m.mean, torch.zeros_like(m.mean)) for m in layers)


def test_norm_position_post_puts_the_norm_after_the_activation():
    pre, post = models.build("bn", 0, 1, 10), models.build("bn", 0, 1, 10, norm_position="post")

    def kinds(net):
        return [type(m).__name__ for m in net.features]

    assert kinds(pre)[:3] == ["Conv2d", "BatchNorm", "GELU"] and kinds(post)[:3] == ["Conv2d", "GELU", "BatchNorm"]
    assert pre.features[0].bias is None and post.features[0].bias is not None
    assert torch.equal(pre.features[0].weight, post.features[0].weight)


def test_batch_statistics_at_test_time_normalise_each_test_batch_and_change_nothing():
    from bnlib import norms

    ds = digits()
    net = models.build("bn", 0, 1, 10)
    with torch.no_grad():
        for _ in range(3):
            net(ds.x_train[:64])  # running statistics away from their initial values
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = ds.x_test[:32], ds.y_test[:32]
    acc, loss = evaluate.evaluate_batch_statistics(net, x, y, batch_size=16)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and net.training
    # the reference: each batch of 16 through a copy of the net in training mode (BN with batch statistics)
    import copy

    ref = copy.deepcopy(net).train()
    with torch.no_grad():
        logits = torch.cat([ref(x[:16]), ref(x[16:])])
    assert acc == (logits.argmax(1) == y).float().mean().item()
    assert abs(loss - torch.nn.functional.cross_entropy(logits, y).item()) < 1e-5
    assert (
        acc != evaluate.evaluate(net, x, y)[0] or loss != evaluate.evaluate(net, x, y)[1]
    )  # not the running statistics
    with norms.batch_statistics(net) as n:
        assert n == 4


def test_eval_batch_stats_is_recorded_for_running_statistics_methods_only():
    config = train.Config(methods=["bn", "gn"], batch_size=8, steps=6, eval_every=3, eval_batch_stats=True)
    result = _train(config, dataset=digits(), progress=False)
    assert all(v is not None for v in result["methods"]["bn"]["test_acc_batchstats"])
    assert result["methods"]["gn"]["test_acc_batchstats"] == [None, None]
    off = _train(train.Config(**{**config.__dict__, "eval_batch_stats": False}), dataset=digits(), progress=False)
    assert off["methods"]["bn"]["test_acc_batchstats"] == [None, None]
    assert off["methods"]["bn"]["test_acc"] == result["methods"]["bn"]["test_acc"]


def test_norm_activation_layers_replace_the_activation_and_paired_convs():
    from bnlib import norms

    frn, evo, gnws = (models.build(m, 0, 1, 10) for m in ("frn", "evonorm", "gn_ws"))
    assert not any(isinstance(m, torch.nn.GELU) for m in frn.modules()) and not any(
        isinstance(m, torch.nn.GELU) for m in evo.modules()
    )
    assert all(isinstance(m, norms.WeightStandardisedConv2d) for m in gnws.features if isinstance(m, torch.nn.Conv2d))
    assert isinstance(models.build("mabn", 0, 1, 10).features[0], norms.WeightCentredConv2d)
    first = models.build("frn", 0, 1, 10, norm_placement="first")
    assert sum(isinstance(m, torch.nn.GELU) for m in first.modules()) == 3  # the convs without a norm keep theirs


def test_recompute_at_the_last_evaluation_only_changes_nothing_else():
    """``recompute_evals: last`` skips the in-training recomputations and nothing else: every other number,
    the final recomputed one included, equals the run that recomputes at every evaluation."""
    base = dict(
        methods=["bn", "bnrs", "gn"], batch_size=8, steps=30, eval_every=10, recompute=True, recompute_samples=64
    )
    every = _strip_timings(_train(train.Config(**base), dataset=digits(), progress=False))
    last = _strip_timings(_train(train.Config(**base, recompute_evals="last"), dataset=digits(), progress=False))
    for m in base["methods"]:
        a, b = every["methods"][m], last["methods"][m]
        if m == "gn":  # no running statistics: nothing to recompute either way
            assert a["test_acc_recomputed"] == b["test_acc_recomputed"] == [None] * 3
        else:
            assert b["test_acc_recomputed"][:2] == [None, None] and None not in a["test_acc_recomputed"]
            assert b["test_acc_recomputed"][2] == a["test_acc_recomputed"][2]
        assert {k: v for k, v in a.items() if "recomputed" not in k} == {
            k: v for k, v in b.items() if "recomputed" not in k
        }
    assert every["config"]["recompute_evals"] == "all" and last["config"]["recompute_evals"] == "last"


def test_auto_compiles_long_runs_only():
    cpu, image = torch.device("cpu"), (1, 28, 28)
    assert not compiling.decide("off", 10**8, 0, image, cpu).compiled
    short = compiling.decide("auto", 50 * 128, 4 * 500, image, cpu)
    assert not short.compiled and "too short" in short.reason
    if compiling.unavailable(cpu) is None:
        assert compiling.decide("auto", 1000 * 128, 0, image, cpu).compiled
        assert compiling.decide("auto", 3000 * 2, 14 * 2000 + 10000, image, cpu).compiled  # evaluations count
        assert compiling.decide("on", 2, 0, (1, 8, 8), cpu).compiled


def test_compile_without_a_compiler_trains_eager_and_says_why(monkeypatch):
    monkeypatch.setattr(compiling, "unavailable", lambda device: "no C++ compiler for inductor (test)")
    config = train.Config(methods=["bn", "brn"], batch_size=8, steps=10, evals=2)
    eager = _train(config, dataset=digits(), progress=False)
    fallback = _train(train.Config(**{**config.__dict__, "compile": "on"}), dataset=digits(), progress=False)
    assert fallback["compiled"] is False and "no C++ compiler" in fallback["compile_reason"]
    assert "compiled" not in eager  # compile: off writes nothing new: older metrics files keep their keys
    assert _strip_timings(fallback)["methods"] == _strip_timings(eager)["methods"]


@pytest.mark.skipif(compiling.unavailable(torch.device("cpu")) is not None, reason="no C++ compiler for inductor here")
def test_a_compiled_run_repeats_bit_for_bit_and_stays_within_tolerance_of_eager():
    """The compiled path is a path of its own: the same bits every time on one machine (so ``bnlib verify``
    holds), and eager's numbers to within ``verify.COMPILED_VS_EAGER`` (inductor sums in another order). Two
    seeds stacked, so the stacked model compiles too."""
    config = train.Config(
        methods=["bn", "brn", "gn"], batch_size=8, steps=40, evals=2, recompute=True, recompute_samples=32, compile="on"
    )
    first = [r for r in train.train_seeds(config, [0, 1], digits(), progress=False)]
    again = [r for r in train.train_seeds(config, [0, 1], digits(), progress=False)]
    eager = [
        r
        for r in train.train_seeds(
            train.Config(**{**config.__dict__, "compile": "off"}), [0, 1], digits(), progress=False
        )
    ]
    assert all(r.compiled for r in first) and "compiled" not in eager[0].to_dict()
    for a, b, e in zip(first, again, eager):
        assert _strip_timings(a.to_dict()) == _strip_timings(b.to_dict())
        e.cell = a.cell = "digits"
        check = verify.compare(e, a, None, verify.COMPILED_VS_EAGER, same_bits=False)
        assert check.verdict in ("bit-identical", "within tolerance"), check.explain()


def test_traces_record_every_norm_layer_and_change_no_other_number():
    """trace_every: per method, per norm layer, one value per traced step; BN normalises with its batch's statistics
    (r = 1 up to eps, d = 0), BNRS with running ones (a gap); stacked seeds trace what their solo runs trace; the rest
    of the record equals the untraced run's."""
    from bnlib.train import traces

    base = dict(methods=["bn", "bnrs", "gn", "frn", "none"], batch_size=8, steps=12, evals=2, log_every=4)
    plain = _strip_timings(_train(train.Config(**base), dataset=digits(), progress=False))
    traced = _strip_timings(_train(train.Config(**base, trace_every=5), dataset=digits(), progress=False))
    for m in base["methods"]:
        trace = traced["methods"][m].pop("traces")
        assert traced["methods"][m] == plain["methods"][m], m
        layers = 0 if m == "none" else 4
        assert trace["step"] == [5, 10] and len(trace["layers"]) == layers, m
        for layer in trace["layers"]:
            assert set(layer) == set(traces.METRICS) and all(len(v) == 2 for v in layer.values())
            assert all(
                v > 0 for k in ("conv_weight_norm", "gamma_norm", "input_rms", "conv_grad_norm") for v in layer[k]
            )
            if m == "frn":  # a norm-activation layer: no gap
                assert all(v is None for k in traces.GAP_METRICS for v in layer[k])
    bn, bnrs = (
        _train(train.Config(**base, trace_every=5), dataset=digits(), progress=False)["methods"][m]["traces"]
        for m in ("bn", "bnrs")
    )
    assert all(abs(v) < 1e-3 for layer in bn["layers"] for k in traces.GAP_METRICS for v in layer[k])
    assert all(layer["log_r_p90"][-1] > 0.05 for layer in bnrs["layers"])
    config = train.Config(**{**base, "methods": ["bnrs", "gn"]}, trace_every=5)
    stacked = _train_seeds(config, [0, 4], dataset=digits(), progress=False)
    for seed, result in zip([0, 4], stacked):
        solo = _train(train.Config(**{**config.__dict__, "seed": seed}), dataset=digits(), progress=False)
        for m in config.methods:
            a, b = result["methods"][m]["traces"], solo["methods"][m]["traces"]
            assert a["step"] == b["step"]
            for la, lb in zip(a["layers"], b["layers"]):
                for k in traces.METRICS:
                    assert _close(la[k], lb[k], rel=1e-3), (seed, m, k)


def test_traces_survive_a_checkpoint_resume(tmp_path, monkeypatch):
    config = train.Config(methods=["bn", "bnrs"], batch_size=8, steps=20, evals=2, trace_every=3, checkpoint_minutes=0)
    whole = _strip_timings(_train(config, dataset=digits(), progress=False))
    ckpt = tmp_path / "run.ckpt"
    _train(config, dataset=digits(), progress=False, checkpoint=ckpt, stop_after=10)
    resumed = _strip_timings(_train(config, dataset=digits(), progress=False, checkpoint=ckpt))
    resumed.pop("resumed_at_steps", None)
    for m in config.methods:
        assert resumed["methods"][m]["traces"] == whole["methods"][m]["traces"]


def test_step_schedule_drops_the_learning_rate_for_the_last_third_only():
    config = train.Config(lr=0.01, lr_schedule="step")
    assert [train.learning_rate(config, s, 30) for s in (1, 20, 21, 30)] == [
        0.01,
        0.01,
        pytest.approx(0.001),
        pytest.approx(0.001),
    ]
    assert train.learning_rate(train.Config(lr=0.01), 30, 30) == 0.01
    assert train.learning_rate(train.Config(lr=0.01, lr_schedule="step", lr_drop_at=0.5), 16, 30) == pytest.approx(
        0.001
    )
    base = dict(methods=["bn", "bnrs"], batch_size=8, steps=30, evals=3, log_every=5)
    constant = _strip_timings(_train(train.Config(**base), dataset=digits(), progress=False))
    stepped = _strip_timings(_train(train.Config(**base, lr_schedule="step"), dataset=digits(), progress=False))
    for m in base["methods"]:
        a, b = constant["methods"][m], stepped["methods"][m]
        assert a["train_loss"][:4] == b["train_loss"][:4]  # the first 20 steps are the same run
        assert a["train_loss"][4:] != b["train_loss"][4:]


def test_eval_batch_composition_training_takes_the_test_batches_as_the_sampler_composes_them():
    """With one-class training batches, 'training' evaluates with batch statistics on one-class test batches (one pass
    of the sampler over the test labels); the other evaluations are unchanged, and the value needs eval_batch_stats."""
    base = dict(
        methods=["bn"], batch_size=4, steps=6, evals=1, eval_batch_stats=True, sampler="noniid", classes_per_batch=1
    )
    iid = _train(train.Config(**base), dataset=digits(), progress=False)["methods"]["bn"]
    composed = _train(train.Config(**base, eval_batch_composition="training"), dataset=digits(), progress=False)[
        "methods"
    ]["bn"]
    assert composed["test_acc"] == iid["test_acc"] and composed["test_acc_batchstats"] != iid["test_acc_batchstats"]
    # the order it evaluates in: one pass of one-class batches of 4 over the test labels
    ds = digits()
    order = data.one_pass(ds.y_test, 4, "noniid", train.EVAL_SUBSET_SEED, 1)
    assert all(len(set(ds.y_test[b].tolist())) == 1 for b in order.view(-1, 4))
    with pytest.raises(train.ConfigError, match="eval_batch_composition"):
        train.validate(train.Config(**{**base, "eval_batch_stats": False}, eval_batch_composition="training"))
    with pytest.raises(train.ConfigError, match="choose one of iid, training"):
        train.validate(train.Config(**base, eval_batch_composition="sorted"))


_COMPILED_RUN = """
import json, sys, torch
torch.set_num_threads(1)
from bnlib import train
from bnlib.train import compiling, data
config = train.Config(methods=["bn", "brn"], batch_size=8, steps=30, evals=2, recompute=False, seed=0, compile="on")
record = train.train(config, data.load("digits"), progress=False)
print(json.dumps({"cache": str(compiling.cache_folder()), "record": record.to_dict()}))
"""


def _below(capability: str) -> str | None:
    """The x86 capability one step narrower than ``capability`` (None where there is none)."""
    from bnlib import machine

    levels = machine.X86_LEVELS
    return levels[levels.index(capability) - 1] if capability in levels and levels.index(capability) > 0 else None


@pytest.mark.skipif(compiling.unavailable(torch.device("cpu")) is not None, reason="no C++ compiler for inductor here")
def test_compiled_runs_with_forced_and_native_kernels_share_a_cache_folder_safely(tmp_path):
    """Issue 48: forced kernels, then native, then forced again, all compiled with one TORCHINDUCTOR_CACHE_DIR. Before
    the fix, the native run crashed (segmentation fault) and a forced run after a native one recorded a false
    divergence. Each process keys its own folder by the ISA inductor picks; the forced runs repeat bit for bit and
    native and forced agree within the cross-kernel tolerance."""
    import json
    import os
    import subprocess
    import sys

    from bnlib import machine, record

    forced_level = _below(machine.native_capability())
    if forced_level is None:
        pytest.skip("no narrower x86 kernels to force on this machine")
    base = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    runs = []
    for env in (machine.force_env(forced_level), {}, machine.force_env(forced_level)):
        proc = subprocess.run(
            [sys.executable, "-c", _COMPILED_RUN], env={**base, **env}, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"exit {proc.returncode} with {env or 'native kernels'}: {proc.stderr[-3000:]}"
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    forced, native, forced_again = runs
    assert forced["cache"] != native["cache"] and forced["cache"] == forced_again["cache"]
    assert all(run["cache"].startswith(str(tmp_path)) for run in runs)  # keyed under the user's folder, never nested
    records = [record.RunRecord.from_dict(run["record"]) for run in runs]
    for rec in records:
        assert rec.compiled and not any(m.diverged for m in rec.methods.values())
        assert all(math.isfinite(m.final.test_loss) for m in rec.methods.values())
    assert _strip_timings(runs[0]["record"])["methods"] == _strip_timings(runs[2]["record"])["methods"]
    records[0].cell = records[1].cell = "digits"
    check = verify.compare(records[0], records[1], None, verify.TOLERANCE, same_bits=False)
    assert check.verdict in ("bit-identical", "within tolerance"), check.explain()


def test_the_cache_folder_is_keyed_by_the_isa_and_threads_and_steps_out_of_an_inherited_one(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    folder = compiling.cache_folder()
    assert folder.parent == tmp_path and folder.name == compiling.cache_key()
    assert f"threads{torch.get_num_threads()}" in folder.name and f"torch{torch.__version__}" in folder.name
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / (compiling.CACHE_PREFIX + "avx2-from-a-parent")))
    assert compiling.cache_folder() == folder  # a child process keys its own folder beside its parent's
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert compiling.cache_folder().name == folder.name  # under inductor's default folder, never that folder itself


class _NaNWhenEvaluating(torch.nn.Module):
    """Stands in for a compiled forward: trains as the model does, but evaluates to NaN (as a poisoned cache did);
    with ``nan_weights`` the model's weights are NaN by the time it evaluates (a real divergence)."""

    nan_weights = False

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        if self.training:
            return self.model(x)
        if self.nan_weights:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))
        return self.model(x) * float("nan")


def test_a_compiled_evaluation_that_is_not_finite_with_finite_weights_fails_the_run(monkeypatch):
    monkeypatch.setattr(compiling, "unavailable", lambda device: None)
    monkeypatch.setattr(compiling, "compiled", _NaNWhenEvaluating)
    config = train.Config(methods=["bn", "brn"], batch_size=8, steps=10, evals=2, compile="on")
    with pytest.raises(
        compiling.CompiledEvaluationError, match=r"bn: the compiled evaluation at step 5 .*weights finite"
    ):
        train.train(config, dataset=digits(), progress=False)


def test_a_compiled_evaluation_made_nan_by_nan_weights_records_a_divergence(monkeypatch):
    monkeypatch.setattr(compiling, "unavailable", lambda device: None)
    monkeypatch.setattr(compiling, "compiled", type("NaNWeights", (_NaNWhenEvaluating,), {"nan_weights": True}))
    config = train.Config(methods=["bn"], batch_size=8, steps=10, evals=2, compile="on")
    out = train.train(config, dataset=digits(), progress=False)
    assert out.compiled and out.methods["bn"].diverged and out.methods["bn"].diverged_step == 5


def test_matching_filter_norms_rescales_each_filter_and_carries_the_running_statistics():
    """The intervention's rescaling, in float64: every filter before a norm layer gets the target's norm, and a
    network that normalises with running statistics (BNRS) computes the same function after it as before."""
    from bnlib.train import interventions, traces

    target = models.build("bn", 1, 1, 10, width=8, depth=2).double()
    net = models.build("bnrs", 0, 1, 10, width=8, depth=2).double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        net.train()
        net(x)  # running statistics away from their start
        for conv, _ in traces.norm_layers(target):
            conv.weight.mul_(torch.linspace(0.5, 3.0, conv.weight.shape[0], dtype=torch.float64).view(-1, 1, 1, 1))
        net.eval()
        before = net(x)
    interventions.match_filter_norms(net, target)
    for (conv, _), (goal, _) in zip(traces.norm_layers(net), traces.norm_layers(target)):
        torch.testing.assert_close(conv.weight.flatten(1).norm(dim=1), goal.weight.flatten(1).norm(dim=1))
    with torch.no_grad():  # the same function up to eps (sqrt(c^2 var + eps) is not c sqrt(var + eps))
        torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)  # eval: running statistics rescaled too
        net.train()
        torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)  # BNRS trains with its running statistics
    weights = [conv.weight.clone() for conv, _ in traces.norm_layers(net)]
    interventions.decay_filters(net, lr=0.01, decay=0.4)
    for w, (conv, _) in zip(weights, traces.norm_layers(net)):
        torch.testing.assert_close(conv.weight, w * (1 - 0.01 * 0.4))


def test_the_filter_norm_arms_follow_their_target_every_step_and_leave_the_others_alone():
    """In a lockstep cell, bn_detached_to_bn and bnrs_to_bn have BN's filter norms at every traced step (the
    manipulation check, exact), BN's record is what it is without them, and the decay arm's filters shrink against
    the free arm's; the new traces (input_mean_p90, effective_step) are there and positive."""
    from bnlib.train import traces

    base = dict(batch_size=8, steps=12, evals=2, log_every=4, trace_every=3)
    arms = ["bn", "bn_detached_to_bn", "bnrs_to_bn", "bn_detached", "bn_detached_wd", "bn_to_bn_detached"]
    out = _train(train.Config(methods=arms, **base), dataset=digits(), progress=False)["methods"]
    alone = _train(train.Config(methods=["bn"], **base), dataset=digits(), progress=False)["methods"]["bn"]
    assert (
        _strip_timings({"methods": {"bn": out["bn"]}})["methods"]
        == _strip_timings({"methods": {"bn": alone}})["methods"]
    )
    for arm, target in (("bn_detached_to_bn", "bn"), ("bnrs_to_bn", "bn"), ("bn_to_bn_detached", "bn_detached")):
        for layer, goal in zip(out[arm]["traces"]["layers"], out[target]["traces"]["layers"]):
            assert layer["conv_weight_norm"] == pytest.approx(goal["conv_weight_norm"], rel=1e-4), arm
    decayed = [layer["conv_weight_norm"][-1] for layer in out["bn_detached_wd"]["traces"]["layers"]]
    free = [layer["conv_weight_norm"][-1] for layer in out["bn_detached"]["traces"]["layers"]]
    assert all(d < f for d, f in zip(decayed, free))
    for layer in out["bn"]["traces"]["layers"]:
        assert set(layer) == set(traces.METRICS)
        assert all(v > 0 for k in ("input_mean_p90", "effective_step") for v in layer[k])


def test_an_arm_listed_before_the_method_it_follows_is_an_error_before_training():
    with pytest.raises(train.ConfigError, match="bn_detached_to_bn sets its filter norms to bn's .*list bn before it"):
        train.validate(train.Config(methods=["bn_detached_to_bn", "bn"], steps=1))
    with pytest.raises(train.ConfigError, match="list bn before it"):
        train.validate(train.Config(methods=["bnrs_to_bn"], steps=1))


def test_the_new_traces_match_their_definitions():
    """input_mean_p90 and effective_step against a float64 computation by hand on one traced step."""
    from bnlib.train import traces

    net = models.build("bn", 0, 1, 10, width=8, depth=2)
    tracer = traces.Tracer(net, "bn", 1)
    x = torch.randn(16, 1, 8, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    first_conv = net.features[0]
    with tracer.capture():
        loss = F.cross_entropy(net(x), torch.arange(16) % 10)
    loss.backward()
    tracer.snapshot()
    before = first_conv.weight.detach().double().clone()
    opt.step()
    tracer.measure_update()
    tracer.record(1, [True])
    layer = tracer.traces[0]["layers"][0]
    pre = torch.nn.functional.conv2d(x.double(), before, padding=1)  # the first norm layer's input
    rows = pre.transpose(0, 1).reshape(8, -1)
    drift = rows.mean(1).abs() / rows.std(1, correction=0)
    assert layer["input_mean_p90"][0] == pytest.approx(float(torch.quantile(drift, 0.9)), rel=1e-4)
    step = (first_conv.weight.detach().double() - before).norm() / before.norm()
    assert layer["effective_step"][0] == pytest.approx(float(step), rel=1e-4)
