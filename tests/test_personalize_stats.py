"""`studio bench personalize` statistics: the two-level bootstrap interval and the per-training-seed report."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.bench.personalize import check_train_seeds, personalize, seed_summary
from studio.bench.stats import two_level_bootstrap_ci
from studio.cli import main
from studio.errors import StudioError


def _stars(rng: np.random.Generator, rates: list[float], n: int) -> list[np.ndarray]:
    """1/0 samples ("is a star"), `n` per training seed, each seed with its own true rate."""
    return [(rng.random(n) < rate).astype(float) for rate in rates]


def test_two_level_interval_contains_the_mean_narrows_and_is_seeded():
    rng = np.random.default_rng(0)
    widths = []
    for n in (32, 512):
        per_seed = _stars(rng, [0.8, 0.8, 0.8, 0.8], n)
        mean = np.mean([s.mean() for s in per_seed])
        low, high = two_level_bootstrap_ci(per_seed)
        assert low < mean < high and low < 0.8 < high
        assert two_level_bootstrap_ci(per_seed) == (low, high)  # the same seed gives the same interval
        widths.append(high - low)
    assert widths[1] < widths[0] / 2.5  # 16x the samples: about a quarter of the width


def test_two_level_interval_widens_with_the_spread_between_training_seeds():
    rng = np.random.default_rng(1)
    alike = two_level_bootstrap_ci(_stars(rng, [0.8, 0.8, 0.8, 0.8], 256))
    apart = two_level_bootstrap_ci(_stars(rng, [0.65, 0.95, 0.65, 0.95], 256))  # the same mean, seeds far apart
    assert apart[1] - apart[0] > 2 * (alike[1] - alike[0])


def test_two_level_interval_edge_cases_and_bad_input():
    assert two_level_bootstrap_ci([[1.0] * 5, [1.0] * 3]) == (1.0, 1.0)
    low, high = two_level_bootstrap_ci([[0.0, 1.0, 1.0, 1.0]])  # one training seed: samples only
    assert low < 0.75 < high
    with pytest.raises(StudioError, match="at least one training seed"):
        two_level_bootstrap_ci([])
    with pytest.raises(StudioError, match="training seed #1"):
        two_level_bootstrap_ci([[1.0], []])
    with pytest.raises(StudioError, match="finite"):
        two_level_bootstrap_ci([[1.0, float("nan")]])
    with pytest.raises(StudioError, match="level 95"):
        two_level_bootstrap_ci([[1.0, 0.0]], level=95)
    with pytest.raises(StudioError, match="resamples 0"):
        two_level_bootstrap_ci([[1.0, 0.0]], resamples=0)


def test_seed_summary_keys_and_check_train_seeds():
    summary = seed_summary("fidelity", [[1, 0, 1, 1], [1, 1, 1, 1]])
    assert summary["fidelity"] == 0.875 and summary["fidelity_per_seed"] == [0.75, 1.0]
    assert summary["fidelity_ci"][0] <= 0.875 <= summary["fidelity_ci"][1]
    assert check_train_seeds((0, 1)) == [0, 1]
    with pytest.raises(StudioError, match="seed 3 2 times"):
        check_train_seeds([3, 4, 3])
    with pytest.raises(StudioError, match="at least one"):
        check_train_seeds([])
    with pytest.raises(StudioError, match="seed -1 is negative"):
        check_train_seeds([-1])


@pytest.fixture
def one_thread():
    """One CPU thread: on a busy 2-core machine two threads make each toy step tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # the personalize bench on short settings; `pytest -m slow`
def test_personalize_reports_means_intervals_and_per_seed_values(one_thread):
    result = personalize(["lora"], n_preservation=2, n_seeds=1, steps=1, train_seeds=[3, 4], sample_seed_offset=5)
    lora = result["lora"]
    for key in ("fidelity", "composition", "preservation"):
        per_seed = lora[f"{key}_per_seed"]
        low, high = lora[f"{key}_ci"]
        assert len(per_seed) == 2
        assert lora[key] == pytest.approx(np.mean(per_seed), abs=1e-4)
        assert low <= lora[key] + 1e-4 and lora[key] - 1e-4 <= high
    assert lora["train_seeds"] == [3, 4] and len(lora["train_seconds_per_seed"]) == 2
    base = result["base"]
    assert base["train_seeds"] == [3, 4] and base["sample_seeds"] == [5, 5]
    assert base["n_token_samples"] == 4 and base["n_composition_samples"] == 2


def test_personalize_refuses_bad_settings_naming_them(capsys):
    assert main(["bench", "personalize", "--methods", "lora", "--train-seeds", "0", "0"]) == 2
    assert "--train-seeds lists seed 0 2 times" in capsys.readouterr().err
    assert main(["bench", "personalize", "--methods", "lora", "--seeds", "0"]) == 2
    assert "--seeds 0" in capsys.readouterr().err
    assert main(["bench", "personalize", "--methods", "lora", "--sample-seed-offset", "-3"]) == 2
    assert "--sample-seed-offset -3" in capsys.readouterr().err


def test_sweep_options_convert_to_the_config_types():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        from personalize_sweep import parse_options
    finally:
        sys.path.pop(0)
    assert parse_options("oft", ["coft=true", "eps=1e-3", "block_size=16"]) == {"coft": True, "eps": 1e-3, "block_size": 16}
    assert parse_options("boft", ["n_butterfly_factor=3"]) == {"n_butterfly_factor": 3}
    with pytest.raises(StudioError, match="coft"):
        parse_options("boft", ["coft=true"])  # BOFT has no COFT
    with pytest.raises(StudioError, match="block_size given twice"):
        parse_options("oft", ["block_size=16", "block_size=8"])
    with pytest.raises(StudioError, match="--eps 'small': must be a number > 0"):
        parse_options("oft", ["eps=small"])


def test_tables_print_the_intervals_and_per_seed_values(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        from tables import personalize_table
    finally:
        sys.path.pop(0)
    method = {"fidelity": 0.812, "fidelity_ci": [0.76, 0.85], "fidelity_per_seed": [0.79, 0.82],
              "composition": 0.5, "composition_ci": [0.41, 0.6], "preservation": -0.004,
              "preservation_ci": [-0.012, 0.003], "trainable_params": 402752, "train_seconds": 310.0,
              "learning_rate": 0.00025, "max_train_steps": 2000}
    base = {"fidelity": 0.0, "accuracy": 0.993, "n_preservation": 100, "n_token_samples": 256,
            "n_composition_samples": 128, "train_seeds": [0, 1], "sample_seeds": [0, 63],
            "interval": {"method": "two-level percentile bootstrap"}}
    path = tmp_path / "personalize.json"
    path.write_text(json.dumps({"oft": method, "base": base}))
    table = personalize_table(path)
    assert "| oft | 0.81 [0.76, 0.85] | 0.79 / 0.82 | 0.50 [0.41, 0.60] | -0.004 [-0.012, +0.003] | 402,752 | 2000 |" in table
    assert "Per training seed (0, 1): 256 fidelity and 128 composition samples" in table
    old = {"oft": {k: v for k, v in method.items() if not k.endswith(("_ci", "_per_seed"))},
           "base": {"fidelity": 0.0, "accuracy": 0.993}}  # results from before intervals still print
    path.write_text(json.dumps(old))
    assert "| oft | 0.81 | — | 0.50 | -0.004 |" in personalize_table(path)
