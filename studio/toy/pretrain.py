"""`studio toy pretrain`: build the embedded toy model and its evaluator from nothing.

Stages, in order, each saved under the work folder so a crash loses at most
one stage (`--restart` clears it):

1. data       render the training set (seen shapes only) and the evaluator set (all shapes)
2. tokenizer  byte-level BPE learned on the captions, saved as a `CLIPTokenizer`
3. clip       mini-CLIP trained contrastively on (image, caption) pairs
4. vae        a small `AutoencoderKL` (32 px -> 16x16x4 latents)
5. evaluator  the attribute classifier, on renders of every shape and their VAE round trips
6. unet       a `UNet2DConditionModel` on cached latents, 10% caption dropout, EMA
7. phrasing   toy model v2's tokenizer (English sub-words, 77 tokens) and text encoder, distilled so
              that any phrasing of a caption (fillers, word order, case) makes the frozen UNet predict
              what the stage-3 text encoder's v1 caption makes it predict (`studio.toy.phrasing`)

Then the pipeline is assembled in diffusers layout (`assets/toy-model`) and the
evaluator copied to `assets/toy-evaluator`. Held-out shapes (star, heart) never
reach stages 2-4, 6 or 7, and the held-out filler words never reach stage 7.

Example:
    >>> from studio.toy.pretrain import PretrainConfig
    >>> PretrainConfig(unet_steps=100).seed
    0
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from studio.errors import StudioError
from studio.toy.captions import random_caption
from studio.toy.evaluator import ATTRIBUTES, ShapesEvaluator
from studio.toy.render import (
    BACKGROUNDS,
    POSITIONS,
    SEEN_SHAPES,
    SHAPES,
    ShapeSpec,
    random_jitter,
    random_spec,
    render,
    render_scene,
)

RESOLUTION = 32
MAX_TOKENS = 32  # the v1 text encoder's context (stages 2-6)
MAX_TOKENS_V2 = 77  # the shipped text encoder's: room for filler words, as in Stable Diffusion
TEXT_DIM = 128


@dataclass
class PretrainConfig:
    """Every knob of the recipe; the defaults are what built the committed assets."""

    seed: int = 0
    train_images: int = 40000
    eval_images: int = 30000
    clip_steps: int = 1000
    clip_batch: int = 128
    vae_steps: int = 1200
    vae_batch: int = 32
    evaluator_steps: int = 2000
    evaluator_batch: int = 128
    unet_steps: int = 8000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    check_every: int = 1000
    phrasing_vocab: int = 4096
    phrasing_steps: int = 400
    phrasing_batch: int = 64
    phrasing_bank: int = 8192
    phrasing_lr: float = 5e-4
    phrasing_check_every: int = 100


# ----------------------------------------------------------------------------- data


def render_dataset(n: int, seed: int, shapes: tuple[str, ...], multi_object_share: float = 0.0) -> dict:
    """Render `n` images with labels; a share of them hold 0 or 2-3 objects (for the count head)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    specs: list[ShapeSpec | None] = []
    labels = {name: np.full(n, -1, dtype=np.int64) for name in ATTRIBUTES}
    for i in tqdm(range(n), desc=f"render {n}", leave=False):
        if rng.random() < multi_object_share:
            background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
            k = int(rng.choice([0, 2, 3]))
            corners = rng.permutation(4)[:k]
            objs = [
                ShapeSpec(**{**random_spec(rng, shapes).__dict__, "background": background,
                             "position": list(POSITIONS)[1 + c], "size": "small"})
                for c in corners
            ]
            out = render_scene(objs, RESOLUTION, RESOLUTION, background, [random_jitter(rng) for _ in objs])
            specs.append(None)
        else:
            spec = random_spec(rng, shapes)
            out = render(spec, RESOLUTION, RESOLUTION, random_jitter(rng))
            specs.append(spec)
        images[i] = out.image
        for name, values in ATTRIBUTES.items():
            if name in out.labels:
                labels[name][i] = values.index(out.labels[name])
    return {"images": images, "specs": specs, "labels": labels}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_share: float = 0.05):
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    warmup = max(1, int(total_steps * warmup_share))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(captions: list[str], folder: Path, vocab_size: int = 2000, max_length: int = MAX_TOKENS):
    """Byte-level BPE with CLIP's normalizer and pre-tokenizer, saved as a `CLIPTokenizer`.

    Every byte symbol and its end-of-word form is in the vocab, so unseen words
    fall back to bytes instead of the unknown token.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    clip_split = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(clip_split), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # CLIP's vocab order: bytes, bytes + </w>, merges, specials.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]:
        vocab.setdefault(symbol, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ----------------------------------------------------------------------------- mini-CLIP


def clip_configs(tokenizer):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_DIM,
    )
    vision = CLIPVisionConfig(
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=RESOLUTION,
        patch_size=8,
        projection_dim=TEXT_DIM,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TEXT_DIM)


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_normalize(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def train_clip(cfg: PretrainConfig, data: dict, tokenizer, folder: Path):
    from transformers import CLIPModel

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 2)
    model = CLIPModel(clip_configs(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    schedule = warmup_cosine(optimizer, cfg.clip_steps)
    images, specs = data["images"], data["specs"]
    bar = tqdm(range(cfg.clip_steps), desc="mini-CLIP")
    for _ in bar:
        idx = rng.integers(len(images), size=cfg.clip_batch)
        captions = [random_caption(specs[i], rng) for i in idx]
        out = model(
            input_ids=tokenize(tokenizer, captions),
            pixel_values=clip_normalize(to_tensor(images[idx])),
            return_loss=True,
        )
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.save_pretrained(folder)
    return model


def split_clip(clip):
    """The trained towers as the pipeline's `CLIPTextModel` and IP-Adapter's `CLIPVisionModelWithProjection`."""
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    vision_config = clip.config.vision_config
    vision_config.projection_dim = clip.config.projection_dim
    vision_encoder = CLIPVisionModelWithProjection(vision_config)
    vision_encoder.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision_encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return text_encoder.eval(), vision_encoder.eval()


# ----------------------------------------------------------------------------- VAE


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Two blocks: 2x downsampling to 16x16x4 latents. At 4x (8x8) the objects, 10-15 px
        # wide, span 2-4 latent cells and a small VAE loses their textures and corners.
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        mid_block_add_attention=False,  # 256 latent tokens: attention costs more than it helps here
        sample_size=RESOLUTION,
    )


def train_vae(cfg: PretrainConfig, data: dict, folder: Path):
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 3)
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, cfg.vae_steps)
    bar = tqdm(range(cfg.vae_steps), desc="VAE")
    for _ in bar:
        idx = rng.integers(len(data["images"]), size=cfg.vae_batch)
        x = to_tensor(data["images"][idx]) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + 1e-4 * kl
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.3f}")
    vae.eval()
    # Scale latents to unit variance, as SD does with its 0.18215.
    with torch.no_grad():
        sample = to_tensor(data["images"][:2048]) * 2 - 1
        latents = torch.cat([vae.encode(c).latent_dist.sample() for c in sample.split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(folder)
    return vae


# ----------------------------------------------------------------------------- evaluator


def degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur and noise a batch at random, so the evaluator also judges imperfect samples."""
    n = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=generator) * 0.7
    x = x * (1 - mix) + blurred * mix
    noise = torch.randn(x.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.06
    return (x + noise).clamp(0, 1)


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """Encode and decode uint8 images through the VAE (posterior mean), back to uint8."""
    out = np.empty_like(images)
    for start in tqdm(range(0, len(images), batch), desc="VAE round trip", leave=False):
        x = to_tensor(images[start : start + batch]) * 2 - 1
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        out[start : start + batch] = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return out


@torch.no_grad()
def vae_ceiling(vae, evaluator, data: dict, n: int = 1000) -> dict:
    """Evaluator accuracy on VAE round-trips of single-object renders: the best samples can score."""
    single = np.flatnonzero(data["labels"]["count"] == ATTRIBUTES["count"].index("1"))[:n]
    logits, _ = evaluator(to_tensor(vae_round_trip(vae, data["images"][single])))
    return {
        k: round(float((logits[k].argmax(1) == torch.from_numpy(data["labels"][k][single])).float().mean()), 3)
        for k in ("shape", "color", "texture", "position", "size", "background")
    }


def train_evaluator(cfg: PretrainConfig, data: dict, folder: Path, vae=None) -> ShapesEvaluator:
    """Train on renders and, if `vae` is given, on their VAE round trips half of the time.

    Samples reach the evaluator through the model's decoder, so it learns to
    read attributes from decoder-made pixels as well as from clean renders.
    """
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed + 4)
    rng = np.random.default_rng(cfg.seed + 4)
    net = ShapesEvaluator()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = warmup_cosine(optimizer, cfg.evaluator_steps)
    labels = {k: torch.from_numpy(v) for k, v in data["labels"].items()}
    # Round trips of the first images only (10k are plenty and cost ~2 minutes on 2 cores).
    decoded = vae_round_trip(vae, data["images"][:10000]) if vae is not None else data["images"][:0]
    net.train()
    bar = tqdm(range(cfg.evaluator_steps), desc="evaluator")
    for _ in bar:
        idx = rng.integers(len(data["images"]), size=cfg.evaluator_batch)
        pixels = data["images"][idx]
        use_decoded = (rng.random(cfg.evaluator_batch) < 0.5) & (idx < len(decoded))
        pixels[use_decoded] = decoded[idx[use_decoded]]
        x = degrade(to_tensor(pixels), generator)
        idx = torch.from_numpy(idx)
        logits, _ = net(x)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx], ignore_index=-1) for k in ATTRIBUTES)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    net.save(folder)
    return net


# ----------------------------------------------------------------------------- UNet


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 96),
        # No attention at 16x16 (the cost), cross-attention at 8x8 and 4x4.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def make_train_scheduler():
    from diffusers import DDPMScheduler

    # Stable Diffusion's own training schedule.
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
    )


@torch.no_grad()
def encode_text(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    return text_encoder(tokenize(tokenizer, captions))[0]


@torch.no_grad()
def cache_latents(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in tqdm(np.array_split(images, max(1, len(images) // 512)), desc="cache latents", leave=False):
        dist = vae.encode(to_tensor(chunk) * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(cfg: PretrainConfig, data: dict, tokenizer, text_encoder, vae, evaluator, folder: Path):
    from diffusers.training_utils import EMAModel

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 5)
    unet = make_unet()
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    scheduler = make_train_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, cfg.unet_steps)
    latent_mean, latent_std = cache_latents(vae, data["images"])
    scale = vae.config.scaling_factor
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    empty = encode_text(text_encoder, tokenizer, [""])
    specs = data["specs"]
    text_encoder.eval()
    bar = tqdm(range(cfg.unet_steps), desc="UNet")
    for step in bar:
        idx = rng.integers(len(specs), size=cfg.unet_batch)
        captions = [random_caption(specs[i], rng) for i in idx]
        cond = encode_text(text_encoder, tokenizer, captions)
        drop = torch.from_numpy(rng.random(cfg.unet_batch) < cfg.caption_dropout)
        cond[drop] = empty
        i_t = torch.from_numpy(idx)
        latents = (latent_mean[i_t] + latent_std[i_t] * torch.randn_like(latent_mean[i_t])) * scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,))
        noisy = scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, cond).sample
        # Min-SNR-gamma weighting (Hang et al. 2023) for epsilon prediction.
        weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.check_every and (step + 1) % cfg.check_every == 0:
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
            scores = quick_check(unet, vae, tokenizer, text_encoder, evaluator, seed=cfg.seed)
            ema.restore(unet.parameters())
            tqdm.write(f"step {step + 1}: {json.dumps(scores)}")
            unet.train()
    ema.copy_to(unet.parameters())
    unet.eval()
    unet.save_pretrained(folder)
    return unet


# ----------------------------------------------------------------------------- phrasing (toy model v2)


def phrasing_corpus(specs: list, n: int, seed: int) -> list[str]:
    """Captions for the v2 tokenizer: v1 captions, free phrasings of them, and every training filler."""
    from studio.toy.phrasing import caption_pair
    from studio.toy.vocabulary import PROMPT_PHRASES, filler_words

    rng = np.random.default_rng(seed)
    corpus = [text for i in range(n) for text in caption_pair(specs[i % len(specs)], rng)]
    # Each training filler a few times, so the BPE can afford whole common words.
    return corpus + list(filler_words()[0]) * 3 + list(PROMPT_PHRASES) * 3


def widen_text_encoder(text_encoder, old_tokenizer, new_tokenizer, max_positions: int):
    """A copy of `text_encoder` for `new_tokenizer`'s vocabulary and `max_positions` tokens.

    Tokens both vocabularies have keep their embedding; new ones start at the
    mean embedding. Positions past the old context repeat the last old one.
    """
    from transformers import CLIPTextModel

    config = text_encoder.config.to_dict()
    config.update(vocab_size=len(new_tokenizer), max_position_embeddings=max_positions,
                  bos_token_id=new_tokenizer.bos_token_id, eos_token_id=new_tokenizer.eos_token_id,
                  pad_token_id=new_tokenizer.pad_token_id)
    student = CLIPTextModel(type(text_encoder.config)(**config))
    state = {k: v for k, v in text_encoder.state_dict().items() if "embeddings" not in k}
    student.load_state_dict(state, strict=False)
    old_tokens = text_encoder.embeddings.token_embedding.weight.detach()
    old_positions = text_encoder.embeddings.position_embedding.weight.detach()
    old_vocab = old_tokenizer.get_vocab()
    with torch.no_grad():
        tokens = student.embeddings.token_embedding.weight
        tokens.copy_(old_tokens.mean(0, keepdim=True) + 0.02 * torch.randn_like(tokens))
        for token, index in new_tokenizer.get_vocab().items():
            if token in old_vocab:
                tokens[index] = old_tokens[old_vocab[token]]
        positions = student.embeddings.position_embedding.weight
        positions[: len(old_positions)] = old_positions
        positions[len(old_positions):] = old_positions[-1]
    return student


def cross_attention_layers(unet) -> list:
    """The UNet's cross-attention modules (`attn2`): the only place the text embedding enters."""
    return [m for name, m in unet.named_modules() if name.endswith("attn2")]


@torch.no_grad()
def cross_attention_targets(unet, text_encoder, tokenizer, noisy, t, captions: list[str]) -> tuple[list, list]:
    """Each `attn2`'s input (the image side) and output, in a UNet pass with the v1 embedding of `captions`."""
    layers = cross_attention_layers(unet)
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.__setitem__(id(m), args[0])) for m in layers]
    try:
        embedding = encode_text(text_encoder, tokenizer, captions)
        unet(noisy, t, embedding)
    finally:
        for hook in hooks:
            hook.remove()
    inputs = [seen[id(m)] for m in layers]
    outputs = [m(h, encoder_hidden_states=embedding) for m, h in zip(layers, inputs)]
    return inputs, outputs


def distill_phrasing(cfg: PretrainConfig, data: dict, tokenizer, text_encoder, vae, unet, evaluator, folder: Path):
    """Train toy model v2's tokenizer and text encoder; the UNet, VAE and v1 text encoder stay frozen.

    The text embedding reaches the UNet only through its cross-attention
    layers, so the loss is theirs: for a v1 caption c and a free phrasing p of
    it (`studio.toy.phrasing`), every `attn2` given the student's embedding of
    p must give what it gives with the v1 embedding of c, for the image-side
    inputs the UNet really produces (recorded from UNet passes on noisy
    latents of the image c describes, at random timesteps, with c). Equal
    cross-attention outputs at every layer mean an equal UNet output, and no
    UNet pass is needed per step; the UNet, VAE and every adapter trained on
    them stay valid.
    """
    from studio.toy.phrasing import caption_parts, rephrase

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 7)
    new_tokenizer = train_tokenizer(phrasing_corpus(data["specs"], 20000, cfg.seed + 7), folder / "tokenizer",
                                    vocab_size=cfg.phrasing_vocab, max_length=MAX_TOKENS_V2)
    student = widen_text_encoder(text_encoder, tokenizer, new_tokenizer, MAX_TOKENS_V2).train()
    unet.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    layers = cross_attention_layers(unet)

    # The bank of recorded cross-attention inputs and outputs, one v1 caption per entry.
    scheduler = make_train_scheduler()
    specs = data["specs"]
    idx = rng.integers(len(specs), size=cfg.phrasing_bank)
    latent_mean, latent_std = cache_latents(vae, data["images"][idx])
    latents = (latent_mean + latent_std * torch.randn_like(latent_mean)) * vae.config.scaling_factor
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),))
    noisy = scheduler.add_noise(latents, torch.randn_like(latents), t)
    parts = [caption_parts(specs[i], rng) for i in idx]
    bank_inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    bank_outputs: list[list[torch.Tensor]] = [[] for _ in layers]
    for start in tqdm(range(0, len(idx), 256), desc="record cross-attention", leave=False):
        chunk = slice(start, start + 256)
        inputs, outputs = cross_attention_targets(unet, text_encoder, tokenizer, noisy[chunk], t[chunk],
                                                  [p.v1 for p in parts[chunk]])
        for k in range(len(layers)):
            bank_inputs[k].append(inputs[k])
            bank_outputs[k].append(outputs[k])
    bank_inputs = [torch.cat(x) for x in bank_inputs]
    bank_outputs = [torch.cat(x) for x in bank_outputs]
    variances = [o.var() for o in bank_outputs]

    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.phrasing_lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, cfg.phrasing_steps)
    bar = tqdm(range(cfg.phrasing_steps), desc="phrasing")
    for step in bar:
        pick = rng.integers(len(idx), size=cfg.phrasing_batch)
        embedding = student(tokenize(new_tokenizer, [rephrase(parts[i], rng) for i in pick]))[0]
        pick_t = torch.from_numpy(pick)
        loss = sum(
            F.mse_loss(layer(bank_inputs[k][pick_t], encoder_hidden_states=embedding), bank_outputs[k][pick_t])
            / variances[k]
            for k, layer in enumerate(layers)
        ) / len(layers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.5f}")
        if cfg.phrasing_check_every and (step + 1) % cfg.phrasing_check_every == 0:
            student.eval()
            scores = phrasing_check(unet, vae, new_tokenizer, student, evaluator, seed=cfg.seed)
            tqdm.write(f"step {step + 1}: loss {loss.item():.5f} {json.dumps(scores)}")
            student.train()
    student.eval()
    student.save_pretrained(folder / "text_encoder")
    return new_tokenizer, student


@torch.no_grad()
def phrasing_check(unet, vae, tokenizer, text_encoder, evaluator, seed: int, n: int = 48) -> dict:
    """Shape and colour accuracy on free phrasings with *training* fillers (the held-out ones are for the report)."""
    from studio.eval import score
    from studio.toy.phrasing import PARAPHRASE_TEMPLATES, template_prompts
    from studio.toy.vocabulary import filler_words

    pipe = assemble_pipeline(tokenizer, text_encoder, None, vae, unet)
    pipe.set_progress_bar_config(disable=True)
    prompts, expected = template_prompts(n, seed + 98, PARAPHRASE_TEMPLATES, filler_words()[0])
    images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images
    accuracy = score(images, expected, evaluator).accuracy()
    return {k: round(accuracy[k], 3) for k in ("shape", "color")}


def sample_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, steps_offset=1,
    )


def assemble_pipeline(tokenizer, text_encoder, vision_encoder, vae, unet):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION},
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sample_scheduler(),
        safety_checker=None, feature_extractor=feature_extractor, image_encoder=vision_encoder,
        requires_safety_checker=False,
    )


@torch.no_grad()
def quick_check(unet, vae, tokenizer, text_encoder, evaluator, seed: int, n: int = 60) -> dict:
    """Sample `n` probe prompts (20 steps, guidance 5) and score them: is conditioning learned yet?"""
    pipe = assemble_pipeline(tokenizer, text_encoder, None, vae, unet)
    pipe.set_progress_bar_config(disable=True)
    from studio.eval import score
    from studio.toy.report import seen_prompt_set

    prompts, expected = seen_prompt_set(n, seed + 99)
    images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images
    return {k: round(v, 3) for k, v in score(images, expected, evaluator).accuracy().items()}


# ----------------------------------------------------------------------------- driver


def stages_from_model(model: Path, evaluator: Path, work: Path) -> None:
    """Lay out a finished toy model's parts as the work folder's stages 2-6 (stage 7 is left to run).

    The mini-CLIP is put back together from the text and vision towers; its
    text projection, unused by every later stage, is left at its initial value.
    """
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextModel,
        CLIPVisionModelWithProjection,
    )

    if not (model / "unet" / "config.json").exists() or not (evaluator / "model.safetensors").exists():
        raise StudioError(f"--reuse-model {model}: expected a toy model folder (unet/, text_encoder/, ...) "
                          f"and its evaluator in {evaluator}")
    text = CLIPTextModel.from_pretrained(model / "text_encoder")
    vision = CLIPVisionModelWithProjection.from_pretrained(model / "image_encoder")
    if text.config.max_position_embeddings != MAX_TOKENS:
        raise StudioError(f"--reuse-model {model}: its text encoder is already a v2 one "
                          f"({text.config.max_position_embeddings} tokens); give a v1 model")
    clip = CLIPModel(CLIPConfig(text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),
                                projection_dim=TEXT_DIM))
    clip.text_model.load_state_dict(text.state_dict())
    clip.vision_model.load_state_dict(vision.vision_model.state_dict())
    clip.visual_projection.load_state_dict(vision.visual_projection.state_dict())
    for name in ("tokenizer", "clip", "vae", "evaluator", "unet"):
        if (work / name).exists():
            shutil.rmtree(work / name)
    shutil.copytree(model / "tokenizer", work / "tokenizer")
    clip.save_pretrained(work / "clip")
    shutil.copytree(model / "vae", work / "vae")
    shutil.copytree(model / "unet", work / "unet")
    shutil.copytree(evaluator, work / "evaluator")
    earlier = json.loads((model / "pretrain.json").read_text())["stage_seconds"] if (model / "pretrain.json").exists() else {}
    for name, seconds in earlier.items():
        if name in ("tokenizer", "clip", "vae", "evaluator", "unet"):
            (work / f"{name}.seconds").write_text(str(seconds))


def pretrain(
    output_model: str | Path = "assets/toy-model",
    output_evaluator: str | Path = "assets/toy-evaluator",
    work_dir: str | Path = ".cache/toy-pretrain",
    config: PretrainConfig | None = None,
    restart: bool = False,
    reuse_model: str | Path | None = None,
) -> dict:
    """Run every stage (skipping those already finished in `work_dir`) and write the assets.

    `reuse_model` takes stages 2-6 from an existing toy model folder (a v1
    model, with its evaluator beside it in `output_evaluator`) instead of
    training them: it upgrades a v1 model to v2 by running stage 7 alone.
    Returns the wall time of each stage in seconds.

    Example:
        >>> pretrain(work_dir="/tmp/tp", config=PretrainConfig(unet_steps=10))  # doctest: +SKIP
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    cfg = config or PretrainConfig()
    work = Path(work_dir)
    if restart and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if reuse_model is not None:
        stages_from_model(Path(reuse_model), Path(output_evaluator), work)
    if (work / "config.json").exists():
        earlier = json.loads((work / "config.json").read_text())
        changed = sorted(k for k, v in asdict(cfg).items() if earlier.get(k) != v)
        if changed:
            tqdm.write(f"[pretrain] note: {work} was started with other values of {changed}; "
                       "finished stages are reused as they are (--restart to redo them)")
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    timings: dict[str, float] = {}
    start = time.time()

    def stage(name: str, marker: str | None, load, train):
        """Reuse a stage finished by an earlier run (its `marker` file exists), else run it."""
        t0 = time.time()
        finished = marker is not None and (work / name / marker).exists()
        result = load(work / name) if finished else train(work / name)
        seconds = round(time.time() - t0, 1)
        # What the stage cost when it was trained, kept beside it, so a resumed run still reports it.
        cost_file = work / f"{name}.seconds"
        if not finished:
            cost_file.write_text(str(seconds))
        timings[name] = float(cost_file.read_text()) if cost_file.exists() else seconds
        tqdm.write(f"[pretrain] {name} {'reused' if finished else 'done'} in {seconds:.0f}s "
                   f"(trained in {timings[name]:.0f}s; this run {time.time() - start:.0f}s)")
        return result

    def render_both(_folder):
        return (
            render_dataset(cfg.train_images, cfg.seed, SEEN_SHAPES),
            render_dataset(cfg.eval_images, cfg.seed + 1, SHAPES, multi_object_share=0.15),
        )

    def learn_tokenizer(folder):
        rng = np.random.default_rng(cfg.seed)
        corpus = [random_caption(train_data["specs"][i % cfg.train_images], rng) for i in range(20000)]
        return train_tokenizer(corpus, folder)

    train_data, eval_data = stage("data", None, None, render_both)
    tokenizer = stage("tokenizer", "tokenizer_config.json", CLIPTokenizer.from_pretrained, learn_tokenizer)
    clip = stage("clip", "config.json", CLIPModel.from_pretrained, lambda f: train_clip(cfg, train_data, tokenizer, f))
    text_encoder, vision_encoder = split_clip(clip)
    vae = stage("vae", "config.json", AutoencoderKL.from_pretrained, lambda f: train_vae(cfg, train_data, f)).eval()
    evaluator = stage("evaluator", "model.safetensors", ShapesEvaluator.load, lambda f: train_evaluator(cfg, eval_data, f, vae))
    tqdm.write(f"[pretrain] evaluator on VAE reconstructions (the ceiling for samples): {vae_ceiling(vae, evaluator, eval_data)}")
    unet = stage(
        "unet", "config.json", UNet2DConditionModel.from_pretrained,
        lambda f: train_unet(cfg, train_data, tokenizer, text_encoder, vae, evaluator, f),
    )

    def load_phrasing(folder):
        return CLIPTokenizer.from_pretrained(folder / "tokenizer"), CLIPTextModel.from_pretrained(folder / "text_encoder")

    tokenizer_v2, text_encoder_v2 = stage(
        "phrasing", "text_encoder/config.json", load_phrasing,
        lambda f: distill_phrasing(cfg, train_data, tokenizer, text_encoder, vae, unet, evaluator, f),
    )

    pipe = assemble_pipeline(tokenizer_v2, text_encoder_v2.eval(), vision_encoder, vae, unet)
    if Path(output_model).exists():
        shutil.rmtree(output_model)
    pipe.save_pretrained(output_model)
    if Path(output_evaluator).exists():
        shutil.rmtree(output_evaluator)
    shutil.copytree(work / "evaluator", output_evaluator)
    timings["total"] = round(sum(timings.values()), 1)
    this_run = round(time.time() - start, 1)
    (Path(output_model) / "pretrain.json").write_text(json.dumps(
        {"config": asdict(cfg), "stage_seconds": timings, "this_run_seconds": this_run,
         "torch_threads": torch.get_num_threads()}, indent=2))
    tqdm.write(f"[pretrain] wall time {timings['total'] / 60:.1f} min in all stages "
               f"({this_run / 60:.1f} min in this run, the rest reused); model in {output_model}")
    return timings
