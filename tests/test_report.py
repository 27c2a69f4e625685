import json

import pytest

from studio.cli import main
from studio.toy.report import heldout_prompt_set, seen_prompt_set


def test_prompt_sets_are_fixed_and_cover_every_attribute():
    prompts, expected = seen_prompt_set(200)
    assert prompts == seen_prompt_set(200)[0]
    assert len(set(prompts)) == 200
    for key in ("shape", "color", "texture", "position"):
        assert len({e[key] for e in expected}) >= 4
    held, shapes = heldout_prompt_set(40)
    assert set(shapes) == {"star", "heart"} and all(s in p for p, s in zip(held, shapes))


@pytest.mark.slow  # a benchmark's full run on short settings (45-70 s); `pytest -m slow`
def test_report_json_meets_the_bar_on_a_short_run(capsys, tmp_path):
    # A shorter run of the README's report command (the full one, 200 + 40 + 2 x 100 images, is the slow test below).
    code = main(["toy", "report", "--json", "--images", "60", "--heldout-images", "10", "--paraphrase-images", "40",
                 "--output", str(tmp_path / "report.json")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "report.json").read_text())
    assert result["n_images"] == 60 and result["n_paraphrase"] == 40
    # Margins for the smaller samples (one miss in 40 is 0.025).
    for key in ("shape_acc", "color_acc", "texture_acc", "position_acc"):
        assert result[key] >= 0.90, key
    assert result["heldout_shape_rate"] <= 0.10
    for key in ("paraphrase_shape_acc", "paraphrase_color_acc", "distractor_shape_acc", "distractor_color_acc"):
        assert result[key] >= 0.85, key


@pytest.mark.slow
def test_report_json_meets_the_goals(capsys, tmp_path):
    # The full report of the README (200 + 40 + 2 x 100 images, 20 steps, guidance 5) against the goals.
    code = main(["toy", "report", "--json", "--output", str(tmp_path / "report.json")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shape_acc"] >= 0.95 and result["color_acc"] >= 0.97
    assert result["texture_acc"] >= 0.95 and result["position_acc"] >= 0.95
    assert result["heldout_shape_rate"] <= 0.05
    # Free phrasing: fillers the model never saw, reordered attributes, extra words around a caption.
    for key in ("paraphrase_shape_acc", "paraphrase_color_acc", "distractor_shape_acc", "distractor_color_acc"):
        assert result[key] >= 0.90, key
