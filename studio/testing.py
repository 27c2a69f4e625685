"""Tiny random pipelines with the real architectures' shapes, built from configs (no download).

SD1.x and SDXL checkpoints cannot be downloaded here, yet every method must run
on them. These builders keep each architecture's structure (block types,
cross-attention dims, SDXL's two text encoders and added time/text embedding)
at a fraction of the width, so tests exercise the same code paths in seconds.
`sd15_unet_config()` gives the full-size SD1.5 UNet config for benchmarks.

Example:
    >>> pipe = tiny_sd_pipeline()
    >>> pipe.unet.config.cross_attention_dim
    32
"""

from __future__ import annotations

import torch

# Our toy tokenizer tokenizes any text, so it stands in for CLIP's here.


def _tokenizer():
    from transformers import CLIPTokenizer

    from studio.pipeline import toy_model_path

    return CLIPTokenizer.from_pretrained(toy_model_path() / "tokenizer")


def _text_encoder(tokenizer, hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks: the 8x downsampling of SD's VAE.
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


def sd15_unet_config(width: float = 1.0) -> dict:
    """SD1.5's UNet config; `width` scales the channels (1.0 = the real 860M-parameter model).

    Example:
        >>> sd15_unet_config(0.125)["block_out_channels"]
        [40, 80, 160, 160]
    """
    channels = [int(c * width) for c in (320, 640, 1280, 1280)]
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": channels,
        "layers_per_block": 2,
        "cross_attention_dim": max(8, int(768 * width)),
        "attention_head_dim": 8,
        "norm_num_groups": min(32, channels[0] // 2) if width < 1 else 32,
    }


def tiny_sd_pipeline(seed: int = 0):
    """A random SD1.x-shaped `StableDiffusionPipeline` (4 UNet levels, 8x VAE), ~1 MB.

    Example:
        >>> tiny_sd_pipeline().vae_scale_factor
        8
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(tokenizer, 32), tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A random SDXL-shaped `StableDiffusionXLPipeline`: two text encoders, text_time added embedding,
    transformer depth growing with the level, no attention at the top level.

    Example:
        >>> tiny_sdxl_pipeline().unet.config.addition_embed_type
        'text_time'
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = _text_encoder(tokenizer, 16)
    text_encoder_2 = _text_encoder(tokenizer, 16, projection=True)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=32,  # both encoders' hidden states, concatenated
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled text + 6 size/crop ids
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(),
    )


@torch.no_grad()
def perturb_trainable(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Add N(0, std) noise to every trainable parameter, as training would move them (for tests).

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> before = layer.weight.clone()
        >>> perturb_trainable(layer)
        >>> bool((layer.weight != before).any())
        True
    """
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=generator).to(p) * std)


def random_artifact(path, method: str, config, seed: int = 0, pipe=None):
    """Write an artifact of `method` as if trained on `pipe` (default `tiny_sd_pipeline()`): the method
    injected with `config`, its parameters perturbed (`perturb_trainable`), saved with the studio header.
    Returns the path.

    Example:
        >>> import tempfile
        >>> from studio.adapters.lora import LoRAConfig
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     random_artifact(f"{folder}/lora.safetensors", "lora", LoRAConfig(rank=2)).name
        'lora.safetensors'
    """
    from dataclasses import asdict
    from pathlib import Path

    from studio import registry
    from studio.artifact import fingerprint, save_artifact

    adapter = registry.get(method).adapter
    pipe = pipe if pipe is not None else tiny_sd_pipeline()
    names = adapter.inject(pipe.unet, config)
    perturb_trainable(pipe.unet, seed=seed)
    return save_artifact(Path(path), adapter.state_dict(pipe.unet), method, asdict(config), fingerprint(pipe.unet, names),
                         extra_metadata=adapter.file_metadata(config))


def start_server(root, *args: str, timeout: float = 120):
    """`studio serve ARGS` in a subprocess on a free port of 127.0.0.1, in `root/cwd` with HOME and TMPDIR under
    `root` (so a caller can check nothing is written outside the data folder `root/data`), its output in
    `root/server.log`; returns (the process, its URL) once it answers. The tests' server and the web-load benchmark's.

    Example:
        >>> process, url = start_server(Path("/tmp/app"), "--workers", "2")  # doctest: +SKIP
    """
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    root = Path(root)
    for name in ("cwd", "home", "tmp"):
        (root / name).mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HOME=str(root / "home"), TMPDIR=str(root / "tmp"), PYTHONDONTWRITEBYTECODE="1")
    with (root / "server.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "studio.cli", "serve", "--data-dir", str(root / "data"), "--port", str(port), *args],
            cwd=root / "cwd", env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return process, url
        except urllib.error.HTTPError:
            return process, url  # it answers (a login page says 401)
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError(f"studio serve did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)


def form_values(client, api_name: str, **overrides) -> list:
    """Every input of a page endpoint by position, from the page's defaults; `overrides` by label (a
    `gradio_client.Client`'s view of the app).

    Example:
        >>> form_values(client, "/start_train", method="lora", rank=4)  # doctest: +SKIP
    """
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][api_name]["parameters"]
    values, unused = [], dict(overrides)
    for param in params:
        values.append(unused.pop(param["label"]) if param["label"] in unused else param.get("parameter_default"))
    if unused:
        raise ValueError(f"{api_name} has no inputs {sorted(unused)}")
    return values
