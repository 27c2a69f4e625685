import json

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


def test_report_json_meets_the_bar(capsys, tmp_path):
    # The full report of the README (200 + 40 + 2 x 100 images, 20 steps, guidance 5).
    code = main(["toy", "report", "--json", "--output", str(tmp_path / "report.json")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "report.json").read_text())
    assert result["shape_acc"] >= 0.90
    assert result["color_acc"] >= 0.90
    assert result["texture_acc"] >= 0.80
    assert result["position_acc"] >= 0.80
    assert result["heldout_shape_rate"] <= 0.10
    # Free phrasing: fillers the model never saw, reordered attributes, extra words around a caption.
    for key in ("paraphrase_shape_acc", "paraphrase_color_acc", "distractor_shape_acc", "distractor_color_acc"):
        assert result[key] >= 0.90, key
