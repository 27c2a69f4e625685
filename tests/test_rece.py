"""RECE: closed-form erasure of a concept on the toy model, measured; its artifact through the plugin; bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from studio.adapters import rece
from studio.trainers.base import TrainConfig, train

from studio import plugin
from studio.bench.erase import quick_check
from studio.cli import main
from studio.erasure import EraseOptions, erase_prompts
from studio.errors import StudioError
from studio.eval import score
from studio.pipeline import load
from studio.sample import SampleSettings, generate


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    """RECE of "circle" on the toy model (its defaults), and of "red", each through the loop."""
    folder = tmp_path_factory.mktemp("rece")
    circle = train(TrainConfig(method="rece", output_dir=str(folder / "circle"), method_options={"concept": ["circle"]}))
    red = train(TrainConfig(method="rece", output_dir=str(folder / "red"), method_options={"concept": ["red"]}))
    return circle.artifact, red.artifact


def _draw(pipe, prompts: list[str]) -> list:
    return generate(pipe, SampleSettings(prompts=prompts, seeds=[3], steps=20, batch_size=64), progress=False)


@pytest.mark.slow  # 16 s of sampling; CI was 10:37 on a slow day. RECE's erasure runs in the fast set (the
# other tests here, the README's commands); `pytest -m slow` measures it
def test_erases_the_concept_and_keeps_the_rest(erased):
    """A small version of `studio bench erase`: 16 prompts naming the concept, 16 naming neither."""
    for concept, artifact in zip(("circle", "red"), erased):
        measured = quick_check(artifact, [concept], n_prompts=16, n_other=16)
        assert measured["before"][concept] >= 0.9
        assert measured["after"][concept] <= 0.1
        assert measured["preservation"] >= -0.05


def test_two_erasures_compose(erased):
    pipe = load("toy")
    for artifact in erased:
        plugin.apply(pipe, artifact)
    table = score(_draw(pipe, ["a red circle", "a red striped circle", "a red dotted circle", "a red plain circle"]))
    assert table.rate("shape", "circle") <= 0.25 and table.rate("color", "red") <= 0.25


def test_only_the_cross_attention_keys_and_values_change_and_remove_restores_them(erased):
    pipe = load("toy")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    sample, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 128)
    with torch.no_grad():
        original = pipe.unet(sample, 500, text).sample
        name = plugin.apply(pipe, erased[0])
        assert sorted(k.split(".", 1)[1].rsplit(".", 1)[0] for k in load_file(str(erased[0]))) == sorted(
            rece.projections(pipe.unet))
        assert not torch.equal(pipe.unet(sample, 500, text).sample, original)
        plugin.fuse(pipe)
        plugin.unfuse(pipe)
        plugin.remove(pipe, name)
        assert torch.equal(pipe.unet(sample, 500, text).sample, original)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_on_the_tiny_sdxl_fixture_only_the_targeted_layers_change(tiny_sdxl_folder, tmp_path):

    model = tiny_sdxl_folder
    result = train(TrainConfig(method="rece", model=str(model), output_dir=str(tmp_path / "out"),
                               method_options={"concept": ["dog"], "preserve": ["cat"]}))
    tensors = load_file(str(result.artifact))
    pipe = load(str(model))
    targeted = sorted(rece.projections(pipe.unet))
    assert sorted(k[len("unet."):-len(".rece_delta")] for k in tensors) == targeted
    assert all(t.abs().max() > 0 for t in tensors.values())
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plugin.apply(pipe, result.artifact)
    plugin.fuse(pipe)
    changed = {k.rsplit(".", 1)[0] for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(targeted)


def test_the_closed_form_sends_the_concept_to_its_anchor_and_keeps_the_kept():
    """UCE's closed form on random embeddings: W' c ≈ W a, W' k ≈ W k."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=generator)
    concept, anchor, kept = (torch.randn(3, 32, generator=generator) for _ in range(3))
    edited = weight.double() @ rece.uce_map([(concept, anchor)], [kept], lamb=1e-3, preserve_scale=1.0)
    assert torch.allclose(edited @ concept.double().T, weight.double() @ anchor.double().T, atol=1e-2)
    assert torch.allclose(edited @ kept.double().T, weight.double() @ kept.double().T, atol=1e-2)


def test_the_toy_prompts_pair_each_caption_with_its_anchored_twin():
    pairs, kept = erase_prompts(EraseOptions(concept=["red", "striped"]), toy=True)
    assert ("a red striped circle", "an orange plain circle") in pairs
    assert not any({"red", "striped"} & set(k.split()) for k in kept) and "a blue dotted square" in kept


@pytest.mark.parametrize("argv, message", [
    (["--concept", ""], "--concept '': an empty concept erases nothing"),
    (["--concept", "!!!", "--model", "TINY"], "--concept '!!!' tokenizes to nothing the model reads"),
    (["--concept", "circle", "--preserve", "circle"], "--preserve 'circle' is also erased"),
    ([], "no concept to erase"),
    (["--concept", "disk"], "concept 'disk' is a name for the toy model's 'circle'"),
    (["--concept", "circle", "--max-train-steps", "5"], "--max-train-steps is not used by --method rece"),
    (["--concept", "circle", "--method", "lora"], "--method lora is an adapter, not an erasure"),
])
def test_bad_concepts_are_refused_in_one_line(argv, message, tmp_path, capsys):
    if "TINY" in argv:
        from studio.testing import tiny_sd_pipeline

        tiny_sd_pipeline().save_pretrained(tmp_path / "tiny")
        argv = [str(tmp_path / "tiny") if a == "TINY" else a for a in argv]
        capsys.readouterr()
    assert main(["erase", *argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err  # a model other than the toy one shows its loading bars first
    assert err.endswith("\n") and err.splitlines()[-1].startswith(f"error: {message}") and err.count("error:") == 1
    assert not (tmp_path / "out").exists()


def test_an_erasure_takes_no_data(tmp_path):
    with pytest.raises(StudioError, match="--data is not used by --method rece"):
        train(TrainConfig(method="rece", data="shapesworld:count=2", output_dir=str(tmp_path),
                          method_options={"concept": ["circle"]}))


@pytest.mark.slow  # the README's `studio erase` commands run in the fast set (tests/test_readme_commands.py)
def test_the_cli_writes_the_artifact_and_a_before_after_sheet(tmp_path, capsys):
    assert main(["erase", "--concept", "striped", "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "rece.safetensors").is_file() and (tmp_path / "before-after.png").is_file()


@pytest.fixture(scope="module")
def studio_app(tmp_path_factory):
    from studio.ui.app import Studio

    return Studio(tmp_path_factory.mktemp("studio"), workers=0)


@pytest.mark.parametrize("concept, preserve, message", [
    ("", "", "no concept to erase: pass --concept WORD"),
    ("!!!", "", "--concept '!!!' tokenizes to nothing the model reads"),
    ("circle", "circle", "--preserve 'circle' is also erased (--concept 'circle')"),
])
def test_the_erase_tab_refuses_bad_concepts_before_a_job_exists(studio_app, concept, preserve, message):
    import gradio as gr

    common, per_method = studio_app.fields("erase")
    every = common + [f for fields in per_method.values() for f in fields]
    values = [f.default if f.name not in ("concept", "preserve") else "" for f in every]
    values[[f.name for f in every].index("concept")] = concept
    values[[f.name for f in every].index("preserve")] = preserve
    with pytest.raises(gr.Error) as raised:
        studio_app.start("erase", studio_app.default_model, "rece", "none", "", None, *values)
    assert raised.value.message.startswith(message)
    assert studio_app.queue.list() == []


def test_convert_says_where_a_rece_file_goes(erased, tmp_path, capsys):
    assert main(["convert", str(erased[0]), "--to", "diffusers", "--output", str(tmp_path / "out")]) == 2
    assert "holds rece, which has no diffusers layout: apply it with studio.plugin" in capsys.readouterr().err
    assert main(["convert", str(erased[0]), "--to", "lycoris", "--output", str(tmp_path / "l.safetensors")]) == 0
