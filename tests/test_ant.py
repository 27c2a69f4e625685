"""ANT: the saliency mask, the sparse artifact through the plugin, a short run that trains only salient weights; the
multi-concept path (a LoRA per concept, fused in closed form into the cross-attention keys and values)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from studio.adapters import ant
from studio.trainers.base import TrainConfig, train

from studio import plugin
from studio.errors import StudioError
from studio.pipeline import load


def test_the_mask_keeps_the_most_salient_entries_of_every_map():
    first = torch.tensor([[9.0, -8.0], [0.1, 0.2]])
    second = torch.tensor([[7.0, 0.0], [-6.0, 0.1]])
    assert ant.salient_mask([first], 0.5).tolist() == [[True, True], [False, False]]
    assert ant.salient_mask([first, second], 0.5).tolist() == [[True, False], [False, False]]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ant")
    return train(TrainConfig(method="ant", output_dir=str(folder), max_train_steps=3, validation_steps=0,
                             method_options={"concept": ["circle"], "saliency_prompts": 2, "saliency_seeds": 1}))


def test_only_salient_weights_change_and_remove_restores(short_run):
    tensors = load_file(str(short_run.artifact))
    changed = sum(v.numel() for k, v in tensors.items() if k.endswith(ant.VALUES))
    total = sum(m.weight.numel() for m in ant.target_layers(load("toy").unet).values())
    assert 0 < changed <= 0.5 * total  # at most the salient half of each tensor (fewer: the maps are intersected)
    pipe = load("toy")
    sample, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 128)
    with torch.no_grad():
        original = pipe.unet(sample, 500, text).sample
        name = plugin.apply(pipe, short_run.artifact)
        assert not torch.equal(pipe.unet(sample, 500, text).sample, original)
        plugin.remove(pipe, name)
        assert torch.equal(pipe.unet(sample, 500, text).sample, original)


def test_preserve_steps_must_leave_steps_to_erase(tmp_path):
    with pytest.raises(StudioError, match="--preserve-steps 50 leaves no step to erase"):
        train(TrainConfig(method="ant", output_dir=str(tmp_path), max_train_steps=1,
                          method_options={"concept": ["circle"], "preserve_steps": 50}))


@pytest.mark.slow
def test_the_bench_recipe_erases_circle_and_keeps_the_rest(tmp_path):
    """A small version of `studio bench erase` for ANT (its recipe: 250 steps, one concept through the multi-concept
    path); about three minutes. The bench: circle erase_rate 0.00, preservation +0.006."""
    from studio.bench import with_method_options
    from studio.bench.erase import RECIPES, quick_check

    result = train(TrainConfig(method="ant", output_dir=str(tmp_path), validation_steps=0,
                               **with_method_options(RECIPES["ant"], {"concept": ["circle"]})))
    measured = quick_check(result.artifact, ["circle"])
    assert measured["before"]["circle"] >= 0.9
    assert measured["after"]["circle"] <= 0.1
    assert measured["preservation"] >= -0.05


@pytest.mark.slow
def test_the_saliency_path_erases_part_of_circle(tmp_path):
    """One concept without `refine`: the paper's saliency path, 250 steps; on the toy model it misses the issue's goals
    (README, `benchmarks/ant_tradeoff.py`: 0.84 of circle prompts still drew a circle, preservation -0.21): this
    holds it to what it reaches, some erasure without ruin."""
    from studio.bench.erase import RECIPES, quick_check

    result = train(TrainConfig(method="ant", output_dir=str(tmp_path), validation_steps=0,
                               method_options={"concept": ["circle"]}, max_train_steps=RECIPES["ant"]["max_train_steps"]))
    measured = quick_check(result.artifact, ["circle"])
    assert measured["before"]["circle"] >= 0.9
    assert measured["after"]["circle"] <= 0.9
    assert measured["preservation"] >= -0.25


def test_on_the_tiny_sdxl_fixture_it_trains_and_changes_only_its_layers(tiny_sdxl_folder, tmp_path):
    from studio.testing import tiny_sdxl_pipeline

    model = tiny_sdxl_folder
    result = train(TrainConfig(method="ant", model=str(model), output_dir=str(tmp_path / "out"), max_train_steps=2,
                               learning_rate=1e-2, method_options={"concept": ["dog"], "denoising_steps": 4,
                                                                   "preserve_steps": 1, "saliency_prompts": 1,
                                                                   "saliency_seeds": 1}))
    pipe = tiny_sdxl_pipeline()
    targeted = set(ant.target_layers(pipe.unet))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plugin.apply(pipe, result.artifact)
    plugin.fuse(pipe)
    changed = {k.rsplit(".", 1)[0] for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= targeted
    assert all(k.endswith(".weight") for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k]))


def test_the_refinement_is_the_least_squares_solution():
    """`refine`'s closed form makes the gradient of its objective zero: Σ_k ‖W C_k − (W⁰ + f ΔW_k) C_k‖²
    + s_p ‖W K − W⁰ K‖² + λ ‖W − W⁰‖²."""
    generator = torch.Generator().manual_seed(0)
    original = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    tokens = [torch.randn(7, 5, generator=generator, dtype=torch.float64) for _ in range(2)]
    deltas = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(2)]
    kept = torch.randn(9, 5, generator=generator, dtype=torch.float64)
    lamb, preserve_scale, fuse_scale = 0.3, 0.2, 4.3
    grams = [c.T @ c for c in tokens]
    inverse = ant.refinement_inverse(grams, kept, lamb, preserve_scale)
    weight = ant.refine(original, deltas, grams, inverse, fuse_scale).requires_grad_(True)
    objective = (sum(((weight - original - fuse_scale * d) @ c.T).square().sum() for d, c in zip(deltas, tokens))
                 + preserve_scale * ((weight - original) @ kept.T).square().sum()
                 + lamb * (weight - original).square().sum())
    objective.backward()
    assert weight.grad.abs().max() < 1e-9
    assert not torch.allclose(weight, original)


@pytest.mark.parametrize("options", [{"concept": ["circle", "red"]}, {"concept": ["circle"], "refine": True}])
def test_the_multi_concept_path_changes_only_the_cross_attention_keys_and_values(tmp_path, options):
    """The multi-concept path (several concepts, or one with `refine`): its file holds every entry of each
    attn2.to_k/to_v and nothing else; it applies and comes off exactly."""
    from studio.adapters.rece import projections

    result = train(TrainConfig(method="ant", output_dir=str(tmp_path), max_train_steps=2, validation_steps=0,
                               method_options={**options, "lora_rank": 4, "denoising_steps": 4, "preserve_steps": 1}))
    tensors = load_file(str(result.artifact))
    pipe = load("toy")
    layers = projections(pipe.unet)
    assert {k.rsplit(".", 1)[0] for k in tensors} == {f"unet.{name}" for name in layers}
    for name, layer in layers.items():
        assert tensors[f"unet.{name}.{ant.VALUES}"].numel() == layer.weight.numel()
    text = torch.randn(1, 77, 128)
    with torch.no_grad():
        before = {name: layer(text) for name, layer in layers.items()}
        applied = plugin.apply(pipe, result.artifact)
        assert any(not torch.equal(layer(text), before[name]) for name, layer in layers.items())
        plugin.remove(pipe, applied)
        assert all(torch.equal(layer(text), before[name]) for name, layer in layers.items())


def test_a_concept_lora_rank_above_the_projections_is_refused(tmp_path):
    with pytest.raises(StudioError, match="--lora-rank 4096 is more than layer"):
        train(TrainConfig(method="ant", output_dir=str(tmp_path), max_train_steps=1,
                          method_options={"concept": ["circle", "red"], "lora_rank": 4096}))
