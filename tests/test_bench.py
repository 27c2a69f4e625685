"""The bench commands run end to end and report what the issue names (small settings; the real runs are in benchmarks/results)."""

import json
from pathlib import Path

import numpy as np
import pytest

from studio.bench.stats import bootstrap_median_ci
from studio.bench.train_step import (
    ci_notes,
    collect_rounds,
    goals,
    paired_ratio,
    summarize_times,
)
from studio.cli import main
from studio.errors import StudioError

PERSONALIZE_KEYS = {"fidelity", "composition", "preservation", "trainable_params", "train_seconds",
                    "fidelity_ci", "composition_ci", "preservation_ci", "fidelity_per_seed", "train_seeds"}
TRAIN_STEP_KEYS = {"seconds", "ratio_to_floor", "ratio_ci", "ci_halfwidth", "ci_target_met", "peak_memory_mb",
                   "added_memory_mb", "paper_peak_memory_mb", "paper_added_memory_mb", "trainable_params"}


@pytest.mark.slow  # a benchmark's run on short settings; `pytest -m slow`
def test_bench_personalize_reports_every_metric(tmp_path, capsys):
    out = tmp_path / "personalize.json"
    code = main(["bench", "personalize", "--methods", "lora", "sara", "--preservation-prompts", "4", "--seeds", "1",
                 "--train-seeds", "0", "--max-train-steps", "2", "--json", "--output", str(out)])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    for method in ("lora", "sara"):
        assert PERSONALIZE_KEYS <= result[method].keys()
        assert 0 <= result[method]["fidelity"] <= 1 and -1 <= result[method]["preservation"] <= 1
        assert result[method]["trainable_params"] > 0
    assert result["base"]["fidelity"] == 0.0  # the toy model never draws a star for the token


@pytest.mark.slow  # a benchmark's full run on short settings (45-70 s); `pytest -m slow`
def test_bench_train_step_reports_ratios_intervals_and_memory(capsys):
    code = main(["bench", "train-step", "--models", "toy", "--entries", "boft", "peft-boft",
                 "--rounds", "5", "--steps", "1", "--until-ci", "--max-rounds", "5", "--ci-target", "0.5", "--threads", "1", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert set(result) == {"floor", "boft", "peft-boft", "goals", "round_times", "setup"}
    for entry in ("floor", "boft", "peft-boft"):
        toy = result[entry]["toy"]
        assert TRAIN_STEP_KEYS <= toy.keys()
        assert toy["seconds"] > 0 and toy["peak_memory_mb"] > 0 and toy["paper_peak_memory_mb"] > 0
        low, high = toy["ratio_ci"]
        assert low <= toy["ratio_to_floor"] <= high
        assert len(result["round_times"]["toy"][entry]) == 5 and all(len(r) == 1 for r in result["round_times"]["toy"][entry])
    assert result["floor"]["toy"]["ratio_ci"] == [1.0, 1.0] and result["floor"]["toy"]["trainable_params"] == 0
    boft = result["boft"]["toy"]
    assert boft["speedup_ci"][0] <= boft["speedup_vs_peft"] <= boft["speedup_ci"][1]
    assert boft["time_vs_peft_ci"][0] <= boft["time_vs_peft"] <= boft["time_vs_peft_ci"][1]
    assert "speedup_vs_peft" not in result["floor"]["toy"] and "speedup_vs_peft" not in result["peft-boft"]["toy"]
    assert result["peft-boft"]["toy"]["peft_boft_factors"] in (1, 2)
    assert set(result["goals"]["toy"]) == {"boft x floor", "peft-boft / boft time (speedup)"}
    assert result["setup"]["threads"] == 1
    timing = result["setup"]["timing"]["toy"]
    assert timing["rounds"] == 5 and timing["stopped"] in ("target met", "max rounds")
    wide = [e for e in ("boft", "peft-boft") if not result[e]["toy"]["ci_target_met"]]
    assert (timing["stopped"] == "max rounds") == bool(wide)
    for entry in wide:  # the CLI names every entry whose interval missed the target
        assert f"{entry} ±" in captured.err


def test_bootstrap_interval_contains_the_median_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    widths = []
    for n in (25, 400):
        values = 1.0 + 0.05 * rng.standard_normal(n)  # median 1.0
        low, high = bootstrap_median_ci(values)
        assert low < 1.0 < high and low <= np.median(values) <= high
        assert bootstrap_median_ci(values) == (low, high)  # seeded: the same values give the same interval
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # 16x the samples: about a quarter of the width
    assert bootstrap_median_ci([2.5] * 7) == (2.5, 2.5)
    with pytest.raises(StudioError, match="non-empty"):
        bootstrap_median_ci([])
    with pytest.raises(StudioError, match="level 95"):
        bootstrap_median_ci([1.0, 2.0], level=95)


def test_paired_ratio_cancels_slow_periods():
    rng = np.random.default_rng(2)
    load = rng.uniform(1.0, 3.0, 20)  # the machine is up to 3x slower in some rounds
    floor = [[l * 2.0] for l in load]
    lora = [[l * 2.2 * (1 + 0.005 * rng.standard_normal())] for l in load]
    paired = paired_ratio(lora, floor)
    assert paired["ci"][0] <= 1.1 <= paired["ci"][1] and paired["halfwidth"] < 0.03
    unpaired = [a[0] / b[0] for a, b in zip(lora, floor[1:] + floor[:1])]  # each over another round's floor
    low, high = bootstrap_median_ci(unpaired)
    assert high - low > 10 * (paired["ci"][1] - paired["ci"][0])
    with pytest.raises(StudioError, match="same rounds"):
        paired_ratio(lora, floor[:3])


def _noisy_rounds(noise: float, seed: int = 3):
    rng = np.random.default_rng(seed)
    return lambda: {"floor": [1.0 + noise * rng.standard_normal()], "lora": [1.2 + noise * rng.standard_normal()]}


def test_collect_rounds_adds_rounds_until_the_interval_is_narrow_or_a_cap_stops_it():
    times, stopped = collect_rounds(_noisy_rounds(0.0), rounds=2)
    assert stopped == "fixed rounds" and len(times["lora"]) == 2
    assert not summarize_times(times)["lora"]["ci_target_met"]  # an interval of 2 rounds is not trusted, however narrow
    times, stopped = collect_rounds(_noisy_rounds(0.005), rounds=3, until_ci=True)
    assert stopped == "target met" and len(times["lora"]) == 5  # never checked before 5 rounds
    assert summarize_times(times)["lora"]["ci_target_met"]
    times, stopped = collect_rounds(_noisy_rounds(0.3), rounds=5, until_ci=True, max_rounds=8)
    assert stopped == "max rounds" and len(times["lora"]) == 8
    assert not summarize_times(times)["lora"]["ci_target_met"]
    now = [0.0]
    noisy = _noisy_rounds(0.3)

    def minute_long_round():
        now[0] += 60
        return noisy()

    times, stopped = collect_rounds(minute_long_round, rounds=5, until_ci=True, max_seconds=200, clock=lambda: now[0])
    assert stopped == "max minutes" and len(times["lora"]) == 3  # a fourth round would end at 240 s
    with pytest.raises(StudioError, match="--max-rounds 3"):
        collect_rounds(_noisy_rounds(0.0), rounds=5, until_ci=True, max_rounds=3)


def test_goals_verdicts_and_ci_notes():
    results = {
        "lora": {"sd15": {"ratio_to_floor": 1.1, "ratio_ci": [1.08, 1.12], "time_vs_peft": 1.02,
                          "time_vs_peft_ci": [0.99, 1.05], "ci_halfwidth": 0.029, "ci_target_met": True,
                          "peak_memory_mb": 100.0, "paper_peak_memory_mb": 200.0}},
        "oft": {"sd15": {"ratio_to_floor": 1.1, "ratio_ci": [1.0, 1.2], "time_vs_peft": 1.05,
                         "time_vs_peft_ci": [1.02, 1.08], "ci_halfwidth": 0.09, "ci_target_met": False}},
        "sara": {"sd15": {"ratio_to_floor": 1.5, "ratio_ci": [1.48, 1.52], "ci_halfwidth": 0.013, "ci_target_met": True,
                          "peak_memory_mb": 113.0, "paper_peak_memory_mb": 190.0}},
        "setup": {"timing": {"sd15": {"rounds": 50, "stopped": "max rounds", "max_load_average": 2.1}},
                  "ci_target": 0.03, "until_ci": True, "cpu_count": 2},
    }
    checked = goals(results, "sd15")
    assert checked["lora x floor"]["verdict"] == "met"
    assert checked["lora / peft-lora time"]["verdict"] == "undecided"  # the interval straddles 1.03
    assert checked["oft / peft-oft time"] == {"value": 1.05, "ci": [1.02, 1.08], "goal": "<= 1.0", "verdict": "missed"}
    assert checked["sara / lora peak memory (batch 1)"]["verdict"] == "missed"
    assert checked["sara / lora peak memory (batch 2, 64x64)"] == {"value": 0.95, "goal": "<= 1.1", "verdict": "met"}
    assert ci_notes(results) == ["sd15: 50 rounds (max rounds); intervals wider than ±3%: oft ±9.0%"]
    results["setup"]["timing"]["sd15"] = {"rounds": 1, "stopped": "max minutes", "max_load_average": 7.6}
    assert ci_notes(results) == [
        "sd15: 1 rounds (max minutes); an interval needs at least 5 rounds to be trusted",
        "sd15: the machine was busy (load average up to 7.6 on 2 cores): other processes' load can slow entries unequally"]


@pytest.mark.slow  # a benchmark's full run on short settings (45-70 s); `pytest -m slow`
def test_adapters_bench_runs_and_cleans_up(tmp_path, monkeypatch):
    """A tiny `studio bench adapters` run: every metric present and a share, the SD1.5 count the paper's 22M, and
    the temporary training output removed."""
    import tempfile

    from studio.bench.adapters import IP_SCALES, adapters

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = adapters(["ip-adapter"], n_refs=2, steps=2)["ip-adapter"]
    assert set(result["scales"]) == {str(s) for s in IP_SCALES}
    for per_scale in result["scales"].values():
        for metric in ("ip_match", "ip_text_compat"):
            assert 0 <= per_scale[metric]["ci"][0] <= per_scale[metric]["value"] <= per_scale[metric]["ci"][1] <= 1
    assert result["best_scale"] in IP_SCALES and result["references"] == 2
    assert 21e6 < result["params_sd15"] < 23e6
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a benchmark's full run on short settings (45-70 s); `pytest -m slow`
def test_structure_and_resolution_adapter_benches_run(tmp_path, monkeypatch):
    """Tiny T2I-Adapter and ResAdapter bench runs: every metric a share (IoU in [0, 1]), each per kind / size, the
    judges checked on true renders, the SD1.5 counts near the papers' (T2I full 77M; ResAdapter under 1M)."""
    import tempfile

    from studio.bench.adapters import RES_SIZES, T2I_KINDS, adapters

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = adapters(["t2i-adapter", "res-adapter"], n_refs=3, steps=2)
    t2i, res = result["t2i-adapter"], result["res-adapter"]
    assert set(t2i["kinds"]) == set(T2I_KINDS)
    for scores in [t2i["base"], *t2i["kinds"].values()]:
        for metric in ("t2i_iou", "t2i_text_acc"):
            assert 0 <= scores[metric]["ci"][0] <= scores[metric]["value"] <= scores[metric]["ci"][1] <= 1
    assert 0.5 < t2i["iou_ceiling_1px_shift"] < 1 and t2i["segmentation_check"] > 0.8
    assert 70e6 < t2i["params_sd15"] < 85e6 and t2i["params_sd15_light"] < t2i["params_sd15"]
    assert set(res["sizes"]) == {f"{w}x{h}" for w, h in RES_SIZES}
    for per_size in res["sizes"].values():
        assert {"base", "single_object_correct", "evaluator_on_renders", "denoising_loss", "base_denoising_loss"} <= set(per_size)
    assert 0 <= res["native_agreement"]["value"] <= 1 and res["worst_size"] in res["sizes"]
    assert 0.3e6 < res["params_sd15"] < 1.2e6
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a benchmark's run on short settings; `pytest -m slow`
def test_erase_bench_structure(monkeypatch, capsys, tmp_path):
    """`studio bench erase` on a tiny protocol: every metric the issue names, per row and concept, and the CLI
    keeps the concepts it did not re-measure in the output file."""
    import json

    from studio.bench import erase
    from studio.cli import main

    monkeypatch.setitem(erase.ATTACK, "steps", 2)
    monkeypatch.setitem(erase.ATTACK, "samples", 4)
    output = tmp_path / "erase.json"
    output.write_text(json.dumps({"negative-prompt": {"circle": {"kept": True}}, "rece": {"circle": {"kept": True}}}))
    assert main(["bench", "erase", "--methods", "none", "negative-prompt", "--concepts", "red", "--prompts", "2",
                 "--other-prompts", "3", "--seeds", "1", "--json", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["negative-prompt"]["circle"] == {"kept": True} and result["rece"] == {"circle": {"kept": True}}
    for row in ("none", "negative-prompt"):
        cell = result[row]["red"]
        for key in ("erase_rate", "synonym_rate", "synonym_prompts", "preservation", "fd_other", "adversarial_rate"):
            assert key in cell
    assert result["none"]["red"]["erase_rate"]["value"] == 1.0  # the unedited model draws red when asked


def test_erase_bench_only_speed_keeps_the_rest_of_the_file(monkeypatch, tmp_path, capsys):
    """`studio bench erase --only-speed` re-measures RECE's SD1.5 time alone; the table in --output stays."""
    import studio.bench.erase as erase

    monkeypatch.setattr(erase, "rece_sd15_timing", lambda: {"rece_sd15_seconds": 2.5, "rece_sd15_threads": 2})
    output = tmp_path / "erase.json"
    output.write_text(json.dumps({"rece": {"circle": {"erase_rate": 0.0}}, "rece_sd15_seconds": 5.9}))
    assert main(["bench", "erase", "--only-speed", "--json", "--output", str(output)]) == 0
    assert json.loads(output.read_text()) == {"rece": {"circle": {"erase_rate": 0.0}}, "rece_sd15_seconds": 2.5,
                                              "rece_sd15_threads": 2}


def test_erase_bench_composes_spm_single_concepts_for_all_three(monkeypatch, tmp_path):
    """SPM's all-three column is its three single-concept membranes applied together (as its paper combines SPMs):
    a concept's run made for its own column is reused, the others are made; every other method runs once over the
    three concepts."""
    import studio.bench.erase as erase

    runs, applied = [], []
    monkeypatch.setattr(erase, "run_erasure", lambda method, column, folder: runs.append((method, column)) or
                        (Path(f"{method}-{column}.safetensors"), 10.0))
    monkeypatch.setattr(erase.plugin, "apply", lambda pipe, path, name=None: applied.append((str(path), name)))
    monkeypatch.setattr(erase, "measure", lambda *args: {"raw": {}})
    monkeypatch.setattr(erase, "spm_transfer", lambda *args: {})
    monkeypatch.setattr(erase, "spm_without_transport", lambda *args: {"synonym_rate": 0.0})
    monkeypatch.setattr(erase, "load", lambda model: None)
    monkeypatch.setattr(erase, "rece_sd15_timing", lambda: {})
    result = erase.erase_bench(["none", "spm", "rece"], ["circle", "all-three"], work_dir=str(tmp_path))
    assert runs == [("spm", "circle"), ("spm", "red"), ("spm", "striped"), ("rece", "circle"), ("rece", "all-three")]
    assert applied[1:4] == [("spm-circle.safetensors", "spm-circle"), ("spm-red.safetensors", "spm-red"),
                            ("spm-striped.safetensors", "spm-striped")]
    assert result["spm"]["all-three"]["seconds"] == 30.0 and result["rece"]["all-three"]["seconds"] == 10.0
    assert result["spm_without_transport"] == {"circle": {"synonym_rate": 0.0}}  # single concepts only


def test_quantize_bench_times_qat_only_with_its_row(tmp_path, monkeypatch):
    """QAT's timing runs with the `qat` row (against EfficientDM's W4A8 run, which it needs); EfficientDM alone
    leaves it out (`--output` keeps the file's)."""
    import studio.bench.quantize as bench
    from studio.errors import StudioError

    with pytest.raises(StudioError, match="the qat row is QAT timed to EfficientDM's W4A8 agreement"):
        bench.quantize_bench(["qat"], ["w4a8"], speed=False)
    monkeypatch.setattr(bench, "load_evaluator", lambda: None)
    monkeypatch.setattr(bench, "Reference", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench, "run", lambda method, bits, folder: (tmp_path / f"{method}-{bits}", 1.0))
    monkeypatch.setattr(bench, "measure", lambda artifact, reference: {"agreement": 0.9})
    monkeypatch.setattr(bench, "qat_time_to", lambda *args: pytest.fail("QAT timed without its row"))
    result = bench.quantize_bench(["efficientdm"], ["w4a8"], speed=False, work_dir=str(tmp_path))
    assert result["efficientdm"] == {"w4a8": {"agreement": 0.9, "seconds": 1.0}} and "qat_time_ratio" not in result


@pytest.mark.slow  # trains five tiny quantizations (about 3 minutes); `pytest -m slow`
def test_quantize_bench_reports_every_metric(tmp_path, monkeypatch):
    import studio.bench.quantize as bench

    monkeypatch.setattr(bench, "RECIPES", {"efficientdm": {"max_train_steps": 2}})
    monkeypatch.setattr(bench, "QAT_FIRST_STEPS", 2)
    monkeypatch.setattr(bench, "QAT_CAP", 1.5)
    result = bench.quantize_bench(None, ["w8a8", "w4a8"], n_prompts=4, n_seeds=1, speed=False, work_dir=str(tmp_path))
    for method, settings in (("ptq", ["w8a8", "w4a8"]), ("efficientdm", ["w8a8", "w4a8"]), ("qat", ["w4a8"])):
        assert sorted(result[method]) == sorted(settings)
        for row in result[method].values():
            assert 0 <= row["agreement"] <= 1 and row["psnr"] > 0 and row["size_bytes"] < row["fp32_size_bytes"]
    assert result["efficientdm"]["w4a8"]["size_bytes"] < result["efficientdm"]["w8a8"]["size_bytes"]
    assert result["qat_time_ratio"] > 0 and result["qat_curve"]
    assert 0 <= result["int8_agreement"]["agreement_with_fake_quant"] <= 1
