"""The bench commands run end to end and report what the issue names (small settings; the real runs are in benchmarks/results)."""

import json

from studio.cli import main

PERSONALIZE_KEYS = {"fidelity", "composition", "preservation", "trainable_params", "train_seconds"}


def test_bench_personalize_reports_every_metric(tmp_path, capsys):
    out = tmp_path / "personalize.json"
    code = main(["bench", "personalize", "--methods", "lora", "sara", "--preservation-prompts", "4", "--seeds", "1",
                 "--max-train-steps", "2", "--json", "--output", str(out)])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    for method in ("lora", "sara"):
        assert PERSONALIZE_KEYS <= result[method].keys()
        assert 0 <= result[method]["fidelity"] <= 1 and -1 <= result[method]["preservation"] <= 1
        assert result[method]["trainable_params"] > 0
    assert result["base"]["fidelity"] == 0.0  # the toy model never draws a star for the token


def test_bench_train_step_reports_ratios_and_memory(capsys):
    code = main(["bench", "train-step", "--models", "toy", "--entries", "lora", "boft", "peft-boft",
                 "--rounds", "1", "--steps", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"floor", "lora", "boft", "peft-boft", "setup"}
    for entry in ("floor", "lora", "boft", "peft-boft"):
        toy = result[entry]["toy"]
        assert toy["seconds"] > 0 and toy["peak_memory_mb"] > 0 and "ratio_to_floor" in toy
    assert result["floor"]["toy"]["trainable_params"] == 0
    assert "speedup_vs_peft" in result["boft"]["toy"]
    assert result["peft-boft"]["toy"]["peft_boft_factors"] in (1, 2)
