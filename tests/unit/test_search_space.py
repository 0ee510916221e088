"""Search configs: PEDL/Determined searchers and hyperparameter types, their errors, each trial's config."""

import optuna
import pytest

from harness.config import parse_config
from harness.errors import HarnessError
from harness.search.space import parse_search
from harness.search.trial import make_pruner, rungs

BASE = {
    "hyperparameters": {
        "batch": 20,
        "lr": {"type": "log", "base": 10, "minval": -3, "maxval": -1, "count": 3},
        "width": {"type": "int", "minval": 8, "maxval": 32, "count": 4},
        "optim": {"kind": {"type": "categorical", "vals": ["sgd", "adam"]}, "momentum": 0.9},
        "dropout": {"type": "double", "minval": 0.0, "maxval": 0.5, "count": 2},
        "fixed": {"type": "const", "val": 7},
    },
    "searcher": {
        "name": "grid",
        "metric": "accuracy",
        "smaller_is_better": False,
        "max_length": {"batches": 8},
    },
}


def with_searcher(**searcher):
    raw = dict(BASE, searcher=dict(BASE["searcher"], **searcher))
    return raw


def test_grid_values_follow_determined():
    spec = parse_search(BASE)
    space = spec.grid_space()
    assert space["lr"] == [-3.0, -2.0, -1.0]  # exponents; the trial gets 10**x
    assert space["width"] == [8, 16, 24, 32]
    assert space["optim.kind"] == ["sgd", "adam"]
    assert space["dropout"] == [0.0, 0.5]
    assert spec.grid_size() == 3 * 4 * 2 * 2
    assert "fixed" not in space  # a constant is not searched


def test_int_grid_is_clamped_to_the_integers_in_range_and_count_one_is_the_middle():
    raw = with_searcher()
    raw["hyperparameters"] = {"a": {"type": "int", "minval": 1, "maxval": 3, "count": 10}}
    assert parse_search(raw).grid_space() == {"a": [1, 2, 3]}
    raw["hyperparameters"] = {"a": {"type": "double", "minval": 1, "maxval": 3, "count": 1}}
    assert parse_search(raw).grid_space() == {"a": [2.0]}


def test_trial_config_is_a_plain_single_trial_config():
    spec = parse_search(with_searcher(name="adaptive_asha", max_trials=4, mode="aggressive"))
    values = {"lr": 0.01, "width": 16, "optim.kind": "adam", "dropout": 0.1}
    raw = spec.trial_config(values, seed=123)
    assert raw["hyperparameters"]["lr"] == 0.01
    assert raw["hyperparameters"]["optim"] == {"kind": "adam", "momentum": 0.9}
    assert raw["hyperparameters"]["fixed"] == {"type": "const", "val": 7}
    assert raw["searcher"] == {
        "name": "single",
        "metric": "accuracy",
        "smaller_is_better": False,
        "max_length": {"batches": 8},
    }
    assert raw["reproducibility"]["experiment_seed"] == 123
    assert "reproducibility" not in spec.trial_config(values, seed=None)  # the trial draws its own
    cfg = parse_config(raw, "trial")  # what the trial's ranks read
    assert cfg.hyperparameters["optim"]["kind"] == "adam" and cfg.hyperparameters["fixed"] == 7


def test_random_sampling_uses_the_types_and_nested_names():
    spec = parse_search(with_searcher(name="random", max_trials=3))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    values = spec.trial_hparams(study.ask())
    assert 10**-3 <= values["lr"] <= 10**-1
    assert isinstance(values["width"], int) and 8 <= values["width"] <= 32
    assert values["optim.kind"] in ("sgd", "adam")
    assert 0.0 <= values["dropout"] <= 0.5


def test_categorical_of_lists_is_sampled_by_index():
    raw = with_searcher(name="random", max_trials=2)
    raw["hyperparameters"] = {"layers": {"type": "categorical", "vals": [[8], [16, 16]]}}
    spec = parse_search(raw)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert spec.trial_hparams(study.ask())["layers"] in ([8], [16, 16])
    assert spec.grid_space() == {"layers": [0, 1]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"searcher": {"name": "bayes", "metric": "a"}}, "'searcher.name': unknown searcher 'bayes' (known:"),
        ({"searcher": {"name": "pbt", "metric": "a"}}, "'searcher.name': searcher 'pbt' is not supported"),
        (
            {"searcher": {"name": "random", "metric": "a"}},
            "'searcher.max_trials': required by searcher 'random'",
        ),
        (
            {"searcher": {"name": "grid"}},
            "'searcher.metric': a search compares trials by this validation metric",
        ),
        (
            {"hyperparameters": {"lr": {"type": "double", "minval": 0.1}}},
            "'hyperparameters.lr': type 'double' needs 'maxval'",
        ),
        (
            {"hyperparameters": {"lr": {"type": "categorical"}}},
            "'hyperparameters.lr': type 'categorical' needs",
        ),
        (
            {"hyperparameters": {"g": {"lr": {"type": "int", "minval": 5, "maxval": 1, "count": 2}}}},
            "'hyperparameters.g.lr': minval 5 is greater than maxval 1",
        ),
        (
            {"hyperparameters": {"lr": {"type": "double", "minval": 0.1, "maxval": 1}}},
            "'hyperparameters.lr': the grid searcher needs 'count' for type 'double'",
        ),
        (
            {"hyperparameters": {"lr": {"type": "uniform"}}},
            "'hyperparameters.lr.type': unknown type 'uniform'",
        ),
        (
            {"hyperparameters": {"lr": {"type": "log", "minval": 1, "maxval": 2, "base": 1, "count": 2}}},
            "'hyperparameters.lr.base': expected a positive number other than 1",
        ),
        (
            {"searcher": {"name": "adaptive_asha", "metric": "a", "max_trials": 2, "mode": "wild"}},
            "'searcher.mode': expected one of aggressive, standard, conservative, got 'wild'",
        ),
        (
            {"searcher": {"name": "adaptive", "metric": "a", "max_trials": 2, "divisor": 1}},
            "'searcher.divisor': expected an integer >= 2, got 1",
        ),
    ],
)
def test_each_config_error_is_one_line_naming_the_key(change, message):
    raw = dict(BASE, **change)
    with pytest.raises(HarnessError) as e:
        parse_search(raw, "adaptive.yaml")
    text = str(e.value)
    assert text.startswith("adaptive.yaml: config key ") and message in text, text
    assert "\n" not in text


def test_single_with_a_searched_type_says_what_to_do():
    raw = with_searcher(name="single")
    with pytest.raises(HarnessError, match="searcher 'single' trains one trial"):
        parse_search(raw)


def test_rungs_and_pruners_follow_the_modes():
    assert rungs(160, 4, 3) == [10, 40]  # 160 / 4**2, then ×4; the last rung is the full length
    assert rungs(100, 4, 5) == [1, 4, 16, 64]  # too short for 5 rungs of 4: starts at one batch
    aggressive = make_pruner({"divisor": 4, "max_rungs": 3, "mode": "aggressive"}, 160)
    assert isinstance(aggressive, optuna.pruners.SuccessiveHalvingPruner)
    conservative = make_pruner({"divisor": 4, "max_rungs": 3, "mode": "conservative"}, 160)
    assert isinstance(conservative, optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner(None, 160), optuna.pruners.NopPruner)


def test_each_trial_samples_from_its_own_well_mixed_seed():
    """Neighbouring trial numbers must not draw neighbouring values (NumPy's seeding of neighbouring integers
    does: the reason for derived_seed)."""
    from harness.search.command import derived_seed

    raw = with_searcher(name="random", max_trials=8)
    spec = parse_search(raw)
    drawn = []
    for number in range(8):
        study = optuna.create_study(
            sampler=optuna.samplers.RandomSampler(seed=derived_seed(1, number, "sample"))
        )
        drawn.append(spec.trial_hparams(study.ask()))
    widths = [d["width"] for d in drawn]
    rates = sorted(d["dropout"] for d in drawn)
    assert len(set(widths)) >= 5, widths
    assert rates[-1] - rates[0] > 0.25, rates  # spread over most of [0, 0.5]
    assert derived_seed(1, 3, "sample") == derived_seed(1, 3, "sample") != derived_seed(1, 3, "train")


def test_a_trial_that_stopped_early_before_a_crash_is_recorded_without_training_on(tmp_path, capsys):
    """The search died after the trial said "stopped early" and before the study recorded it: the next run
    records it as stopped early and launches nothing."""
    import argparse
    import socket

    from harness.search import study as search_study
    from harness.search.command import Search
    from harness.search.trial import STOPPED_EARLY

    spec = parse_search(with_searcher(name="adaptive_asha", max_trials=1, mode="aggressive"))
    args = argparse.Namespace(output=str(tmp_path), storage=None, study=None, np=1, parallel=1, launcher=None,
                              hosts=None, max_restarts=None, model_def="/nonexistent")  # fmt: skip
    search = Search(args, spec)
    search.workers = 1
    study = search.study()
    trial = study.ask()
    trial.set_user_attr(STOPPED_EARLY, 12)
    dead = f"{socket.gethostname()}:{2**22 + 12345}"  # no such process
    study._storage.set_trial_system_attr(trial._trial_id, search_study.OWNER, dead)
    search.worker()
    assert search.fatal is None
    assert [t.state.name for t in study.get_trials()] == ["PRUNED"]
    assert "trial 0: stopped early at batch 12" in capsys.readouterr().out
    assert not (tmp_path / "trials" / "0" / "console.log").exists()  # nothing was launched


def test_pedls_first_adaptive_searcher_with_a_step_budget():
    raw = dict(
        BASE, searcher={"name": "adaptive", "metric": "error", "target_trial_steps": 8, "step_budget": 40}
    )
    spec = parse_search(raw)
    assert spec.max_trials == 5
    assert spec.trial_config({p.name: p.example() for p in spec.params}, 1)["searcher"] == {
        "name": "single",
        "metric": "error",
        "max_steps": 8,
    }


# ----------------------------------------------------------------------------------------------------------
# Determined's searcher keys across its releases (0.12 -> 0.38)


def trial_cfg(spec):
    return parse_config(spec.trial_config({p.name: p.example() for p in spec.params}, 0))


def test_adaptive_asha_target_trial_steps_is_the_trial_length():
    """0.12's adaptive_asha gave the trial length as target_trial_steps (PEDL steps)."""
    raw = with_searcher(name="adaptive_asha", max_trials=4, target_trial_steps=3)
    del raw["searcher"]["max_length"]
    raw["batches_per_step"] = 10
    assert trial_cfg(parse_search(raw)).searcher.max_length.value == 30


def test_adaptive_budget_and_max_length_give_the_number_of_trials():
    spec = parse_search(with_searcher(name="adaptive", budget={"batches": 40}, max_length={"batches": 8}))
    assert spec.max_trials == 5 and trial_cfg(spec).searcher.max_length.value == 8
    with pytest.raises(
        HarnessError, match="searcher.budget': in epochs, but searcher.max_length is in batches"
    ):
        parse_search(with_searcher(name="adaptive", budget={"epochs": 4}, max_length={"batches": 8}))


@pytest.mark.parametrize("name", ["async_halving", "sync_halving"])
def test_halving_searchers_run_as_one_asha_bracket(name):
    spec = parse_search(with_searcher(name=name, num_rungs=3, max_trials=6, divisor=2))
    assert spec.adaptive and spec.pruning() == {"divisor": 2, "max_rungs": 3, "mode": "aggressive"}
    assert bool(spec.warnings) == (name == "sync_halving")
    assert trial_cfg(spec).searcher.name == "single"  # num_rungs is the search's, not the trial's


def test_null_means_determineds_default_and_whole_float_divisors():
    spec = parse_search(
        with_searcher(
            name="adaptive_asha",
            max_trials=3,
            mode=None,
            divisor=3.0,
            max_rungs=None,
            max_concurrent_trials=None,
            smaller_is_better=None,
        )
    )
    assert (spec.mode, spec.divisor, spec.max_rungs, spec.max_concurrent_trials) == ("standard", 3, 5, 0)
    assert spec.smaller_is_better is True and trial_cfg(spec).searcher.smaller_is_better is True


def test_keys_without_effect_warn_and_time_budgets_are_refused():
    spec = parse_search(
        with_searcher(name="adaptive_asha", max_trials=3, bracket_rungs=[2, 3], stop_once=False)
    )
    assert any("bracket_rungs" in w for w in spec.warnings) and any("stop_once" in w for w in spec.warnings)
    assert not parse_search(with_searcher(name="adaptive_asha", max_trials=3, stop_once=True)).warnings
    with pytest.raises(HarnessError, match="searcher.max_time': Determined 0.38's time budget"):
        parse_search(with_searcher(name="adaptive_asha", max_trials=3, max_time=60, time_metric="batches"))
