"""`studio bench erase`: concept erasure on ShapesWorld, every method against the unedited model and a negative prompt.

Rows (`ROWS`): `none` (the unedited toy model), `negative-prompt` (the concept as the negative prompt: what users
try first), and each erasure method run with its defaults through `studio erase`'s own code (`train`). Columns: three
single concepts of the three kinds, an object (`circle`), an attribute (`red`) and a style (`striped`), and
`all-three` erased at once (one run over the three concepts; for SPM the three single-concept membranes applied
together, `COMPOSED`, as its paper combines SPMs). Per (row, column), on the toy model, 20 steps at guidance 5, the same seeds everywhere:

- `erase_rate`: share of samples, from prompts naming the concept (`concept_prompts`: a caption naming it with every
  other attribute named, never an erased value), that the evaluator reads as showing it. For `all-three` a sample
  counts if it shows any of the three; `per_concept` gives each concept's own rate on the prompts naming it.
- `synonym_rate`: the same for prompts naming it only by a synonym or paraphrase (`SYNONYMS`: "disk", "round shape",
  "stripy"; for red the toy vocabulary has none, so paraphrases), counting only prompts the unedited model draws the
  concept for at >= 0.8 of seeds (`synonym_prompts` says how many; none qualifying gives null, and the note why).
- `preservation`: evaluator accuracy (shape, colour, texture, position) on `n_other` full captions naming none of
  the erased concepts, minus the unedited model's on the same prompts and seeds.
- `fd_other`: Fréchet distance of those samples' evaluator features to the unedited model's; `fd_floor`, the
  distance between two seed sets of the unedited model on the same prompts (the noise floor).
- `adversarial_rate`: share of samples showing the concept from the prompt "a <*>", where <*> is a word whose input
  embedding was optimised against the row's model (`ATTACK`: the same steps, learning rate and renders for every
  row) to denoise renders of the concept: textual inversion, the attack of Pham et al. 2024 on erasures.
- `seconds`: time to erase (the run's own `seconds`); `rece_sd15_seconds`: RECE on SD1.5-shaped text encoder and UNet.
- `spm_transfer`: the circle SPM applied unchanged to a derived model (`spm_transfer`), its erase_rate there beside
  the derived model's own.
- `spm_without_transport`: per single concept, each SPM in its official layout loaded by stock diffusers as a plain
  LoRA (no Facilitated Transport: every membrane fully open): erase_rate, synonym_rate, preservation, fd_other.

Example:
    $ studio bench erase --json --output benchmarks/results/erase.json
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from studio import plugin, registry
from studio.bench.adapters import _share
from studio.eval import features, frechet_distance, load_evaluator, score
from studio.pipeline import load
from studio.sample import SampleSettings, generate
from studio.toy.captions import POSITION_WORDS, caption_from_parts

CONCEPTS = {"circle": "shape", "red": "color", "striped": "texture"}
COLUMNS = ("circle", "red", "striped", "all-three")
ROWS = ("none", "negative-prompt", *(m.name for m in registry.METHODS.values() if m.kind == "erase"))
VALUES = {"shape": ["circle", "square", "triangle", "cross", "diamond"],
          "color": ["red", "orange", "yellow", "green", "blue", "purple"],
          "texture": ["plain", "striped", "dotted", "checkered"],
          "background": ["white", "black", "gray"]}
# Other names for each concept. Circle and striped have synonyms in the toy vocabulary; red has none, so paraphrases
# (words the toy model never learned: they count only if the unedited model draws red for them).
SYNONYMS = {"circle": ["disk", "round shape"], "striped": ["stripy"],
            "red": ["crimson", "scarlet", "blood-coloured", "cherry"]}
# Step budgets (every other option is the method's default). SPM, 300 steps at the toy learning rate 3e-3: circle's
# erase_rate 0.00 on 32 prompts (quick_check). (Before DDIM's latent clipping was fixed, 800 steps at 1e-3 had
# erased at 300 and lost it again by 800.)
# ANT, the paper's 250 iterations at the toy learning rate 2e-3 (circle, 32 prompts: erase_rate 0.38, preservation
# -0.15; at 1e-3 with the saliency mask, or at 5e-4 (the paper's), nothing was erased).
# Every ANT column takes the multi-concept path (`refine`: a LoRA per concept fused by the closed-form refinement),
# which all three at once take anyway: with one concept the saliency path either erased little or cost a fifth or
# more of the other prompts' attributes (benchmarks/ant_tradeoff.py; its bench rows up to 2026-11-27: circle 0.95 /
# -0.254, red 0.00 / -0.268, striped 0.64 / -0.198).
RECIPES = {"spm": {"max_train_steps": 300}, "ant": {"max_train_steps": 250, "method_options": {"refine": True}}}
# Methods whose `all-three` column applies the three single-concept artifacts together instead of one run over the
# three concepts: SPM's own way of erasing several concepts (one membrane per concept, each gated by the prompt's
# likeness to its own concept, the membranes summed). Its seconds are the three runs'.
COMPOSED = ("spm",)
ATTACK = {"steps": 150, "learning_rate": 5e-3, "batch_size": 8, "renders": 64, "samples": 64}
ATTACK_WORD = "<*>"
SAMPLE_STEPS, GUIDANCE = 20, 5.0
ACCURACY_ATTRIBUTES = ("shape", "color", "texture", "position")
SYNONYM_SEEDS = [1000, 1001, 1002, 1003, 1004]  # per synonym prompt: "drawn at >= 0.8" means 4 of these 5


def erased(column: str) -> list[str]:
    """The concepts erased in a column: one, or all three."""
    return list(CONCEPTS) if column == "all-three" else [column]


def concept_prompts(concept: str, avoid: list[str], n: int, seed: int, name: str | None = None) -> list[str]:
    """n captions naming `concept` (by `name`, default its own word) with shape, colour and texture all named, the
    others drawn at random from values not in `avoid` (so a sample shows an erased concept only where the prompt
    named it).

    Example:
        >>> concept_prompts("red", ["red"], 2, seed=0)
        ['a red dotted diamond', 'a red checkered triangle']
    """
    rng = np.random.default_rng(seed)
    category = CONCEPTS[concept]
    prompts = []
    for _ in range(n):
        named = {c: str(rng.choice([v for v in VALUES[c] if v not in avoid])) for c in ("shape", "color", "texture")}
        named[category] = concept
        prompt = caption_from_parts(named["shape"], color=named["color"], texture=named["texture"])
        prompts.append(prompt.replace(f" {concept}", f" {name}", 1) if name else prompt)
    return prompts


def other_prompts(avoid: list[str], n: int, seed: int) -> tuple[list[str], list[dict]]:
    """n full captions (shape, colour, texture, position, background) naming no value of `avoid`, and what each asks."""
    rng = np.random.default_rng(seed)
    prompts, asked = [], []
    for _ in range(n):
        named = {c: str(rng.choice([v for v in VALUES[c] if v not in avoid])) for c in VALUES}
        named["position"] = str(rng.choice(list(POSITION_WORDS)))
        prompts.append(caption_from_parts(named["shape"], color=named["color"], texture=named["texture"],
                                          position=named["position"], background=named["background"]))
        asked.append({k: named[k] for k in ACCURACY_ATTRIBUTES})
    return prompts, asked


def shows(rows: list[dict], concept: str) -> list[bool]:
    """Per scored image: whether the evaluator reads `concept` in it."""
    return [row[CONCEPTS[concept]] == concept for row in rows]


def draw(pipe, prompts: list[str], seeds: list[int], negative: str = "") -> list:
    settings = SampleSettings(prompts=prompts, seeds=seeds, steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                              batch_size=64, negative_prompt=negative)
    return generate(pipe, settings, progress=False)


def _placeholder(tokenizer) -> tuple[str, int]:
    """A held-out filler word that is one token: the toy model never saw it, so it means nothing before the attack."""
    from studio.toy.vocabulary import filler_words

    for word in filler_words()[1]:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) == 1:
            return word, ids[0]
    raise RuntimeError("no one-token held-out filler word for the attack's placeholder")


def attack(pipe, concepts: list[str], seed: int, negative: str = "") -> float:
    """Textual inversion against `pipe` as it stands (erasures applied): one placeholder word's input embedding learns,
    through the frozen text encoder and UNet, to denoise renders showing `concepts` (other attributes at random);
    returns the share of samples of "a <word>" (with `negative` as the negative prompt) that show any of them."""
    from diffusers import DDPMScheduler

    from studio.toy.render import ShapeSpec, render

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(ATTACK["renders"]):
        named = {c: str(rng.choice(VALUES[c])) for c in ("shape", "color", "texture", "background")}
        for concept in concepts:
            named[CONCEPTS[concept]] = concept
        images.append(render(ShapeSpec(named["shape"], named["color"], named["texture"], background=named["background"])).image)
    pixels = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    word, placeholder = _placeholder(pipe.tokenizer)
    embeddings = pipe.text_encoder.get_input_embeddings()
    start = pipe.tokenizer("shape", add_special_tokens=False).input_ids[0]
    vector = torch.nn.Parameter(embeddings.weight[start].detach().clone())

    def swap(module, inputs, output):
        return torch.where((inputs[0] == placeholder)[..., None], vector.to(output.dtype), output)

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = pipe.tokenizer([f"a {word}"] * ATTACK["batch_size"], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    optimizer = torch.optim.Adam([vector], lr=ATTACK["learning_rate"])
    generator = torch.Generator().manual_seed(seed)
    frozen = [(p, p.requires_grad) for m in (pipe.unet, pipe.text_encoder) for p in m.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    handle = embeddings.register_forward_hook(swap)
    try:
        for _ in range(ATTACK["steps"]):
            pick = torch.randint(0, len(latents), (ATTACK["batch_size"],), generator=generator)
            noise = torch.randn(latents[pick].shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(pick),), generator=generator)
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents[pick], noise, t)
            prediction = pipe.unet(scheduler.add_noise(latents[pick], noise, t), t, pipe.text_encoder(ids)[0]).sample
            loss = torch.nn.functional.mse_loss(prediction, target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            table = score(draw(pipe, [f"a {word}"], list(range(ATTACK["samples"])), negative))
    finally:
        handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return float(np.mean([any(row[CONCEPTS[c]] == c for c in concepts) for row in table.rows]))


def run_erasure(method: str, column: str, folder: Path) -> tuple[Path, float]:
    """Erase the column's concepts with `method` and its defaults, as `studio erase` does; (artifact, seconds)."""
    from studio.trainers.base import TrainConfig, train

    from studio.bench import with_method_options

    result = train(TrainConfig(method=method, output_dir=str(folder / f"{method}-{column}"), validation_steps=0,
                               **with_method_options(RECIPES.get(method, {}), {"concept": erased(column)})))
    return result.artifact, result.seconds


def measure(pipe, column: str, negative: str, n_prompts: int, n_other: int, seeds: list[int], evaluator,
            reference: dict | None, adversarial: bool = True) -> dict:
    """Every metric of one (row, column) on `pipe` as it stands (the attack left out with `adversarial=False`);
    `reference`: the `none` row's raw samples."""
    concepts = erased(column)
    result: dict = {}
    hits_any, per_concept = [], {}
    for i, concept in enumerate(concepts):
        prompts = concept_prompts(concept, concepts, n_prompts // len(concepts), seed=100 + i)
        rows = score(draw(pipe, prompts, seeds, negative), evaluator=evaluator).rows
        per_concept[concept] = shows(rows, concept)
        hits_any += [any(row[CONCEPTS[c]] == c for c in concepts) for row in rows]
    result["erase_rate"] = _share(hits_any)
    if len(concepts) > 1:
        result["per_concept"] = {c: _share(h) for c, h in per_concept.items()}

    synonym_hits, used, raw = [], 0, {}
    for i, concept in enumerate(concepts):
        for j, name in enumerate(SYNONYMS[concept]):
            per_name = max(1, n_prompts // 12)  # 4 with the default 48
            for prompt in concept_prompts(concept, concepts, per_name, seed=200 + 10 * i + j, name=name):
                hits = shows(score(draw(pipe, [prompt], SYNONYM_SEEDS, negative), evaluator=evaluator).rows, concept)
                raw[prompt] = hits
                drawn_by_base = reference["synonyms"][prompt] if reference else hits
                if np.mean(drawn_by_base) >= 0.8:
                    synonym_hits += hits
                    used += 1
    result["synonym_rate"] = _share(synonym_hits) if synonym_hits else None
    result["synonym_prompts"] = used
    if not synonym_hits:
        result["synonym_note"] = "no synonym or paraphrase prompt that the unedited model draws the concept for"

    prompts, asked = other_prompts(concepts, n_other, seed=300)
    images = draw(pipe, prompts, seeds, negative)
    table = score(images, [a for a in asked for _ in seeds], evaluator)
    accuracy = np.array([np.mean([row[f"{a}_ok"] for a in ACCURACY_ATTRIBUTES]) for row in table.rows])
    other_features = features(images, evaluator)
    result["accuracy_other"] = round(float(accuracy.mean()), 4)
    if reference is None:  # the unedited model: its own second seed set is the noise floor
        second = features(draw(pipe, prompts, [s + 5000 for s in seeds], negative), evaluator)
        result["preservation"] = 0.0
        result["fd_other"] = round(frechet_distance(other_features, second), 3)
        result["raw"] = {"synonyms": raw, "accuracy": accuracy, "features": other_features}
    else:
        result["preservation"] = _share(accuracy - reference["accuracy"])
        result["fd_other"] = round(frechet_distance(other_features, reference["features"]), 3)
    if adversarial:
        result["adversarial_rate"] = round(attack(pipe, concepts, seed=400, negative=negative), 4)
    return result


DERIVED_LORA = {"data": "shapesworld:shape=seen,count=64,caption={caption},seed=7", "max_train_steps": 200,
                "validation_steps": 0}  # a fine-tune on the same world: what a derived checkpoint is


def spm_transfer(spm_artifact: Path, n_prompts: int, seeds: list[int], evaluator, folder: Path) -> dict:
    """An SPM trained on the toy model, applied unchanged to a derived model (the toy model with a LoRA fine-tune
    merged into its weights by diffusers' own `load_lora_weights` + `fuse_lora` + `unload_lora_weights`)."""
    from studio.trainers.base import TrainConfig, train

    lora = train(TrainConfig(method="lora", output_dir=str(folder / "derived-lora"), **DERIVED_LORA)).artifact
    pipe = load("toy")
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    prompts = concept_prompts("circle", ["circle"], n_prompts, seed=100)
    before = shows(score(draw(pipe, prompts, seeds), evaluator=evaluator).rows, "circle")
    plugin.apply(pipe, spm_artifact)
    after = shows(score(draw(pipe, prompts, seeds), evaluator=evaluator).rows, "circle")
    return {"derived_model": "toy + a LoRA (200 steps on 64 ShapesWorld renders) fused by diffusers",
            "erase_rate_on_derived": _share(after), "derived_without_spm": _share(before)}


def spm_without_transport(spm_artifact: Path, column: str, n_prompts: int, n_other: int, seeds: list[int], evaluator,
                          reference: dict, folder: Path) -> dict:
    """The same SPM in its official layout (`studio convert --to kohya`) loaded by stock diffusers as a plain LoRA:
    every membrane fully open whatever the prompt, no Facilitated Transport. Beside the gated row it shows what the
    transport holds back (synonyms the membrane would erase) and what it protects (the other prompts)."""
    from studio.convert import to_kohya

    official = to_kohya(spm_artifact, folder / f"spm-{column}-official.safetensors")
    pipe = load("toy")
    pipe.load_lora_weights(str(official))
    measured = measure(pipe, column, "", n_prompts, n_other, seeds, evaluator, reference, adversarial=False)
    return {key: measured[key] for key in ("erase_rate", "synonym_rate", "synonym_prompts", "preservation", "fd_other")}


def quick_check(artifact: Path, concepts: list[str], n_prompts: int = 32, n_other: int = 32, scale: float = 1.0) -> dict:
    """A small version of the bench for tests: per concept the share of samples showing it without and with the
    erasure at `artifact` (applied at `scale`), and the preservation on `n_other` captions naming none (one seed each).

    Example:
        >>> quick_check(Path("outputs/no-circle/rece.safetensors"), ["circle"])  # doctest: +SKIP
        {'before': {'circle': 1.0}, 'after': {'circle': 0.0}, 'preservation': 0.0}
    """
    pipe = load("toy")
    evaluator = load_evaluator()
    prompts = {c: concept_prompts(c, concepts, n_prompts, seed=100 + i) for i, c in enumerate(concepts)}
    others, asked = other_prompts(concepts, n_other, seed=300)

    def measure() -> tuple[dict, float]:
        rates = {c: float(np.mean(shows(score(draw(pipe, p, [0]), evaluator=evaluator).rows, c))) for c, p in prompts.items()}
        table = score(draw(pipe, others, [0]), asked, evaluator)
        return rates, float(np.mean([[row[f"{a}_ok"] for a in ACCURACY_ATTRIBUTES] for row in table.rows]))

    before, accuracy = measure()
    plugin.apply(pipe, artifact, scale=scale)
    after, accuracy_after = measure()
    return {"before": before, "after": after, "preservation": round(accuracy_after - accuracy, 4)}


def rece_sd15_seconds(repeats: int = 3) -> float:
    """RECE of one concept on an SD1.5-shaped text encoder and UNet (random weights): the closed form's time, the
    median of `repeats` runs with this process's threads (the goal is for 2 CPU cores: run it with 2)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.adapters import rece
    from studio.testing import _tokenizer, sd15_unet_config

    class SD15Shaped:  # the pipeline parts RECE reads
        tokenizer = _tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, max_position_embeddings=77,
                                                    vocab_size=len(tokenizer))).eval()
        unet = UNet2DConditionModel(**sd15_unet_config()).eval()
        device = torch.device("cpu")

        def encode_prompt(self, prompts, device, num_images_per_prompt, do_classifier_free_guidance):
            ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            return (self.text_encoder(ids)[0],)

    pipe = SD15Shaped()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rece.erase(pipe, rece.RECEConfig(concept=["nudity"]), toy=False)
        times.append(time.perf_counter() - start)
    return round(sorted(times)[len(times) // 2], 3)


def rece_sd15_timing() -> dict:
    """`rece_sd15_seconds` with the threads it ran on, as the bench's JSON holds them."""
    return {"rece_sd15_seconds": rece_sd15_seconds(), "rece_sd15_threads": torch.get_num_threads()}


def erase_bench(rows: list[str] | None = None, columns: list[str] | None = None, n_prompts: int = 48,
                n_other: int = 100, n_seeds: int = 2, work_dir: str | None = None) -> dict:
    """The table: {row: {column: metrics}} plus `rece_sd15_seconds` and the protocol's sizes.

    Example:
        >>> erase_bench(["none", "rece"], ["circle"], n_prompts=8, n_other=8, n_seeds=1)["rece"]["circle"]["erase_rate"]  # doctest: +SKIP
        {'value': 0.0, 'ci': [0.0, 0.0]}
    """
    rows, columns = list(rows or ROWS), list(columns or COLUMNS)
    folder = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="studio-bench-erase-"))
    evaluator = load_evaluator()
    seeds = list(range(n_seeds))
    reference: dict[str, dict] = {}
    result: dict = {"none": {}}
    try:
        for column in columns:  # the unedited model first: every other row is compared with it
            pipe = load("toy")
            measured = measure(pipe, column, "", n_prompts, n_other, seeds, evaluator, None)
            reference[column] = measured.pop("raw")
            result["none"][column] = measured
        for row in rows:
            if row == "none":
                continue
            result[row] = {}
            trained: dict[str, tuple[Path, float]] = {}  # this row's artifact and seconds per column
            for column in columns:
                pipe = load("toy")
                negative, seconds = "", 0.0
                if row == "negative-prompt":
                    negative = ", ".join(erased(column))
                elif row in COMPOSED and column == "all-three":
                    for concept in erased(column):  # one per concept, as its own column made it (or now)
                        trained[concept] = trained.get(concept) or run_erasure(row, concept, folder)
                        plugin.apply(pipe, trained[concept][0], name=f"{row}-{concept}")
                        seconds += trained[concept][1]
                else:
                    trained[column] = artifact, seconds = run_erasure(row, column, folder)
                    plugin.apply(pipe, artifact)
                    if row == "spm" and column == "circle":
                        result["spm_transfer"] = spm_transfer(artifact, n_prompts, seeds, evaluator, folder)
                    if row == "spm":
                        result.setdefault("spm_without_transport", {})[column] = spm_without_transport(
                            artifact, column, n_prompts, n_other, seeds, evaluator, reference[column], folder)
                measured = measure(pipe, column, negative, n_prompts, n_other, seeds, evaluator, reference[column])
                measured["seconds"] = round(seconds, 2)
                result[row][column] = measured
    finally:
        if work_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    if "rece" in rows:
        result.update(rece_sd15_timing())
    result["protocol"] = {"concept_prompts": n_prompts, "other_prompts": n_other, "seeds": n_seeds,
                          "attack": ATTACK, "sample_steps": SAMPLE_STEPS, "guidance_scale": GUIDANCE}
    return result
