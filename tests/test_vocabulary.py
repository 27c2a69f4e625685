"""The toy vocabulary, the filler-word split, free phrasings and the unknown-word warning."""

import json
import re

import numpy as np
import pytest
import torch

from studio.cli import main
from studio.toy.captions import random_caption
from studio.toy.phrasing import (
    DISTRACTOR_TEMPLATES,
    PARAPHRASE_TEMPLATES,
    caption_pair,
    caption_parts,
    distractor_prompts,
    paraphrase_prompts,
    rephrase,
)
from studio.toy.pretrain import phrasing_corpus
from studio.toy.render import SEEN_SHAPES, random_spec
from studio.toy.vocabulary import (
    HELDOUT_WORDS,
    KNOWN_WORDS,
    describe,
    filler_words,
    prompt_warnings,
    unknown_words,
    words,
)


def _training_words(n: int = 20000) -> set[str]:
    rng = np.random.default_rng(0)
    specs = [random_spec(rng) for _ in range(500)]
    texts = phrasing_corpus(specs, n, seed=1)
    texts += [random_caption(specs[i % len(specs)], rng) for i in range(2000)]
    return {w for text in texts for w in words(text)}


def test_heldout_fillers_never_reach_a_training_caption():
    train, heldout = filler_words()
    assert len(train) > 5000 and len(heldout) > 1000
    assert not set(train) & set(heldout)
    seen = _training_words()
    leaked = seen & set(heldout)
    assert not leaked, f"held-out fillers in training captions: {sorted(leaked)[:10]}"
    # ... while training captions do use many training fillers (the check above is not vacuous).
    assert len(seen & set(train)) > 2000


def test_fillers_are_not_vocabulary_words_nor_their_inflections():
    train, heldout = filler_words()
    for word in ("circles", "reddish", "stars", "red", "pink", "left", "not"):
        assert word not in train and word not in heldout


def test_paraphrase_and_distractor_prompts_use_only_heldout_fillers_and_vocabulary():
    _, heldout = filler_words()
    # The templates' own words ("of", "that is") are common function words, the rest are held-out fillers.
    template_words = {w for t in PARAPHRASE_TEMPLATES + DISTRACTOR_TEMPLATES for w in words(re.sub(r"{\w+}", "", t))}
    assert template_words <= {"of", "the", "a", "that", "is"}
    for prompt_set in (paraphrase_prompts, distractor_prompts):
        prompts, expected = prompt_set(100)
        assert prompts == prompt_set(100)[0]  # fixed
        assert {e["shape"] for e in expected} == set(SEEN_SHAPES)
        for prompt, want in zip(prompts, expected):
            extra = [w for w in words(prompt) if w not in KNOWN_WORDS]
            assert extra and all(w in heldout or w in template_words for w in extra), prompt
            assert want["shape"] in prompt.lower() and want["color"] in prompt.lower()


def test_free_phrasings_keep_every_attribute_word():
    rng = np.random.default_rng(5)
    for _ in range(300):
        parts = caption_parts(random_spec(rng), rng)
        free = rephrase(parts, rng)
        if not parts.v1:
            assert not [w for w in words(free) if w in KNOWN_WORDS - {"a", "an", "on", "the", "in"}]
            continue
        for phrase in (*parts.adjectives, parts.noun, *parts.extras):
            assert phrase.lower() in free.lower(), (parts, free)
    v1, free = caption_pair(random_spec(rng), rng)
    assert isinstance(v1, str) and isinstance(free, str)


@pytest.mark.parametrize(
    "prompt, allowed, expected",
    [
        ("a red striped circle in the top left on a white background", (), []),
        ("A RED CIRCLE.", (), []),
        ("a circle, red, striped", (), []),
        ("a polka-dot rhombus in the lower right corner", (), []),
        ("a photo of a red circle, high quality", (), ["photo", "of", "high", "quality"]),
        ("draw me a red sks", ("sks",), ["draw", "me"]),
        ("a blue star", (), ["star"]),
        ("a red circle sks sks", ("sks",), []),
    ],
)
def test_unknown_words(prompt, allowed, expected):
    assert unknown_words(prompt, allowed) == expected


def test_warnings_name_unknown_words_and_stay_silent_for_known_ones():
    assert prompt_warnings(["a red circle", "a blue dotted square in the top left"]) == []
    (line,) = prompt_warnings(["a photo of a red circle", "a red circle"])
    assert "photo, of" in line and "a photo of a red circle" in line
    (line,) = prompt_warnings(["a green heart"])
    assert "heart (held out" in line
    assert HELDOUT_WORDS == {"star", "heart"}
    assert "circle / disk / round shape" in describe() and "held out" in describe()


def _tiny_artifact(path, trigger_words=None):
    from studio.artifact import TRIGGER_WORDS_KEY, save_artifact

    metadata = {TRIGGER_WORDS_KEY: json.dumps(trigger_words)} if trigger_words is not None else {}
    return save_artifact(path, {"x": torch.zeros(1)}, "lora", {}, {}, extra_metadata=metadata)


def test_sample_warns_about_unknown_words_but_not_trigger_words(tmp_path, capsys, monkeypatch):
    import studio.cli as cli

    class Stop(Exception):
        pass

    def no_model(_args):  # the warning comes before the model loads; stop there
        raise Stop

    monkeypatch.setattr(cli, "load_model", no_model)
    artifact = _tiny_artifact(tmp_path / "a.safetensors", ["sks"])
    with pytest.raises(Stop):
        main(["sample", "a photo of a red sks", "a red circle", "--adapter", str(artifact)])
    err = capsys.readouterr().err
    assert "ignored by the toy model: photo, of (in 'a photo of a red sks')" in err
    assert "sks" not in err.split("(in")[0] and "a red circle'" not in err
    with pytest.raises(Stop):
        main(["sample", "a red sks"])  # no artifact says sks is a trigger word
    assert "ignored by the toy model: sks" in capsys.readouterr().err


def test_page_warns_on_the_toy_model_only_and_spares_the_stack_trigger_words(tmp_path):
    from studio.ui.app import Studio

    studio = Studio(tmp_path)
    try:
        toy = {"model": "toy", "model_config": None}
        note = studio.prompt_note(toy, [], "a photo of a red circle\na red circle", "")
        assert "photo, of" in note and note.count("ignored") == 1
        artifact = _tiny_artifact(tmp_path / "a.safetensors", ["sks"])
        stack = [{"path": str(artifact), "name": "a", "scale": 1.0, "enabled": True}]
        assert studio.prompt_note(toy, stack, "a red sks", "") == ""
        assert "sks" in studio.prompt_note(toy, [], "a red sks", "")
        assert studio.prompt_note({"model": "some/sd15", "model_config": None}, [], "a photo", "") == ""
    finally:
        studio.queue.shutdown()


def test_a_toy_training_records_its_trigger_words(tmp_path):
    from studio.artifact import read_header

    code = main(["train", "--method", "lora", "--data", "shapesworld:shape=star,count=2,caption=a {color} sks",
                 "--max-train-steps", "1", "--output-dir", str(tmp_path / "run")])
    assert code == 0
    assert read_header(tmp_path / "run" / "lora.safetensors").trigger_words == ["sks"]


def test_trigger_like_nonwords_stay_in_both_captions():
    # Stage 7 keeps v1's meaning for non-words ("sks"), which adapters key on, while it drops English fillers.
    from studio.toy.vocabulary import english_word_set

    rng = np.random.default_rng(7)
    found = 0
    for _ in range(500):
        parts = caption_parts(random_spec(rng), rng)
        extra = [w for w in words(parts.v1) if w not in KNOWN_WORDS]
        if extra:
            found += 1
            assert not set(extra) & english_word_set()
            assert set(extra) <= set(words(rephrase(parts, rng)))
    assert 50 < found < 200


@pytest.mark.parametrize("argv, message", [
    (["toy", "report", "--paraphrase-images", "-5"], "--paraphrase-images must be at least 0 (got -5)"),
    (["toy", "report", "--images", "0"], "--images must be at least 1 (got 0)"),
    (["toy", "pretrain", "--phrasing-steps", "-1"], "--phrasing-steps must be at least 1 (got -1)"),
])
def test_new_counts_out_of_range_are_refused_before_any_work(argv, message, capsys, tmp_path):
    assert main(argv + (["--work-dir", str(tmp_path / "w")] if argv[1] == "pretrain" else [])) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
