"""IP-Adapter (Ye et al. 2023): an image prompt through decoupled cross-attention, on diffusers' own layers.

- Image projection: the image encoder's projected `image_embeds` -> Linear to
  4 tokens x cross_attention_dim -> LayerNorm (diffusers' `ImageProjection`,
  the official file's `image_proj.proj` / `image_proj.norm`).
- Decoupled cross-attention on the cross-attention layers only (attn2): new
  `to_k_ip` / `to_v_ip` (no bias), initialised from the layer's `to_k` / `to_v`;
  the same query attends to the text and to the image tokens, output = text
  attention + scale x image attention (diffusers' `IPAdapterAttnProcessor2_0`).

We build exactly what `pipe.load_ip_adapter` builds, through the UNet's own
`_load_ip_adapter_weights`, so training, our plugin and the stock loader run
the same modules, and our file is the official layout: `image_proj.*` and
`ip_adapter.{i}.to_k_ip.weight` / `.to_v_ip.weight`, where i counts the UNet's
attention processors in order and only cross-attention ones (odd i) have keys.
The studio header rides along in the safetensors metadata, which the stock
loader ignores. Four image tokens are what diffusers reads from a `proj`
projection, so the token count is fixed.

Example:
    >>> from studio.testing import tiny_sd_pipeline
    >>> unet = tiny_sd_pipeline().unet
    >>> names = inject(unet, IPAdapterConfig(), image_embed_dim=8)
    >>> sorted(state_dict(unet))[:2]
    ['image_proj.norm.bias', 'image_proj.norm.weight']
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from studio.errors import StudioError
from studio.options import ranged
from studio.pipeline import quiet_dtype_notice

TOKENS = 4  # diffusers reads a `proj` image projection as 4 tokens
IMAGE_PROJ = "image_proj."
IP_LAYERS = "ip_adapter."
IMAGE_ENCODER_FOLDER = "image_encoder"  # beside the file: what load_ip_adapter loads when the pipeline has none
STOCK_LOADER = 'pipe.load_ip_adapter(FOLDER, subfolder="", weight_name=FILE)'  # what reads our files as they are


@dataclass
class IPAdapterConfig:
    """IP-Adapter options. `drop_rate`: the share of training examples that lose their image prompt, the same share
    that lose their caption, and the same share that lose both (the paper's 0.05), for guidance at sampling."""

    drop_rate: float = ranged(0.05, 0, 0.3)  # three shares of it: at most 0.9 of the examples lose something


CONFIG = IPAdapterConfig


def cross_attention_processors(unet: nn.Module) -> list[tuple[int, str]]:
    """(official key id, processor name) of every cross-attention processor: ids 1, 3, 5, ... in the order of
    `unet.attn_processors`, as diffusers' loader counts them.

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> cross_attention_processors(tiny_sd_pipeline().unet)[0]
        (1, 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor')
    """
    names = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    return [(1 + 2 * i, name) for i, name in enumerate(names)]


def initial_state_dict(unet: nn.Module, image_embed_dim: int) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh IP-Adapter for `unet` in the official nested layout: a default-initialised projection (PyTorch's
    Linear init) and `to_k_ip` / `to_v_ip` copied from each cross-attention layer's `to_k` / `to_v`."""
    cross = unet.config.cross_attention_dim
    projection = nn.Linear(image_embed_dim, TOKENS * cross)
    image_proj = {"proj.weight": projection.weight.detach(), "proj.bias": projection.bias.detach(),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_layers = {}
    for key_id, name in cross_attention_processors(unet):
        attention = unet.get_submodule(name.rsplit(".", 1)[0])
        ip_layers[f"{key_id}.to_k_ip.weight"] = attention.to_k.weight.detach().clone()
        ip_layers[f"{key_id}.to_v_ip.weight"] = attention.to_v.weight.detach().clone()
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def nested(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A flat official file (`image_proj.*`, `ip_adapter.*`) -> the nested dict diffusers' loaders take.

    Example:
        >>> nested({"image_proj.proj.weight": torch.zeros(1), "ip_adapter.1.to_k_ip.weight": torch.zeros(1)})["ip_adapter"]
        {'1.to_k_ip.weight': tensor([0.])}
    """
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        for prefix, part in ((IMAGE_PROJ, "image_proj"), (IP_LAYERS, "ip_adapter")):
            if key.startswith(prefix):
                out[part][key[len(prefix):]] = value
    if not out["image_proj"] or not out["ip_adapter"]:
        raise StudioError("not an IP-Adapter file: it needs image_proj.* and ip_adapter.* tensors (the official layout)")
    return out


def recognises(keys: list[str]) -> bool:
    """Whether a file's keys are the official IP-Adapter layout (what diffusers' loader reads).

    Example:
        >>> recognises(["image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"])
        True
    """
    return any(k.startswith(IMAGE_PROJ) for k in keys) and any(k.startswith(IP_LAYERS) for k in keys)


def inject(unet: nn.Module, config: IPAdapterConfig, image_embed_dim: int) -> list[str]:
    """Give `unet` a fresh, trainable IP-Adapter (image projection + decoupled cross-attention), freeze the rest;
    return the names of the cross-attention layers it extends (their `to_k`, for the file's fingerprint)."""
    if unet.config.cross_attention_dim is None:
        raise StudioError("IP-Adapter needs a UNet with cross-attention")
    unet.requires_grad_(False)
    with quiet_dtype_notice():
        unet._load_ip_adapter_weights([initial_state_dict(unet, image_embed_dim)], low_cpu_mem_usage=False)
    for parameter in trainable_parameters(unet):
        parameter.requires_grad_(True)
    return [name.rsplit(".", 2)[0] + ".to_k" for _, name in cross_attention_processors(unet)]


def adapter_parameter_count(unet: nn.Module, image_embed_dim: int) -> int:
    """The parameters an IP-Adapter adds to `unet`: the projection (Linear + LayerNorm) and, per cross-attention
    layer, `to_k_ip` and `to_v_ip` (cross_attention_dim -> the layer's width, no bias).

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> adapter_parameter_count(tiny_sd_pipeline().unet, image_embed_dim=8)
        15552
    """
    cross = unet.config.cross_attention_dim
    projection = image_embed_dim * TOKENS * cross + TOKENS * cross + 2 * cross
    layers = sum(2 * cross * unet.get_submodule(name.rsplit(".", 1)[0]).to_k.out_features
                 for _, name in cross_attention_processors(unet))
    return projection + layers


def trainable_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The adapter's parameters: the image projection's and every processor's `to_k_ip` / `to_v_ip`."""
    params = list(unet.encoder_hid_proj.parameters())
    for _, name in cross_attention_processors(unet):
        processor = unet.attn_processors[name]
        params += list(processor.to_k_ip.parameters()) + list(processor.to_v_ip.parameters())
    return params


def state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter of `unet` in the official flat layout (`image_proj.proj.weight`, `ip_adapter.1.to_k_ip.weight`, ...)."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    tensors = {f"{IMAGE_PROJ}proj.weight": projection.image_embeds.weight, f"{IMAGE_PROJ}proj.bias": projection.image_embeds.bias,
               f"{IMAGE_PROJ}norm.weight": projection.norm.weight, f"{IMAGE_PROJ}norm.bias": projection.norm.bias}
    processors = unet.attn_processors
    for key_id, name in cross_attention_processors(unet):
        tensors[f"{IP_LAYERS}{key_id}.to_k_ip.weight"] = processors[name].to_k_ip[0].weight
        tensors[f"{IP_LAYERS}{key_id}.to_v_ip.weight"] = processors[name].to_v_ip[0].weight
    return {key: value.detach().clone().contiguous() for key, value in tensors.items()}


def file_metadata(config) -> dict[str, str]:
    """Extra header entries for our file (none beyond the studio header)."""
    return {}


@torch.no_grad()
def encode_images(pipe, images: list) -> torch.Tensor:
    """The image encoder's projected embeddings of PIL images, (n, dim), as the pipeline computes them."""
    pixels = pipe.feature_extractor(images, return_tensors="pt").pixel_values
    encoder = pipe.image_encoder
    return encoder(pixels.to(encoder.device, encoder.dtype)).image_embeds.float()


class IPAdapterAttachment:
    """An IP-Adapter file on a pipeline, through diffusers' own loader, undone exactly on `remove`.

    diffusers' `unload_ip_adapter` drops the pipeline's image encoder and rebuilds every attention processor
    from scratch; we keep what was there (processors, image encoder, feature extractor) and put it back.
    """

    def __init__(self, pipe, tensors: dict[str, torch.Tensor], path: Path, scale: float) -> None:
        unet = pipe.unet
        if getattr(unet, "encoder_hid_proj", None) is not None:
            raise StudioError(f"{path}: this pipeline already has an IP-Adapter (or another image projection); "
                              "remove it first (studio.plugin.remove, or pipe.unload_ip_adapter())")
        state = nested(tensors)
        self.pipe, self.scale, self.enabled = pipe, scale, True
        self.saved = {"processors": dict(unet.attn_processors), "image_encoder": getattr(pipe, "image_encoder", None),
                      "feature_extractor": getattr(pipe, "feature_extractor", None)}
        if self.saved["image_encoder"] is None:
            folder = path.parent / IMAGE_ENCODER_FOLDER
            if not folder.is_dir():
                raise StudioError(f"{path}: an image prompt needs an image encoder, and neither the pipeline nor the "
                                  f"file's folder ({folder}) has one; load a model with image_encoder/")
            from transformers import CLIPVisionModelWithProjection

            encoder = CLIPVisionModelWithProjection.from_pretrained(folder).to(unet.device, unet.dtype)
            pipe.register_modules(image_encoder=encoder)
        try:
            with quiet_dtype_notice():
                pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
        except Exception as error:
            self._restore()
            raise StudioError(f"{path}: diffusers could not load this IP-Adapter on this pipeline ({error}); "
                              "was it trained for another base model?") from None
        self._apply_scale()
        self.layers = [f"unet.{name}" for _, name in cross_attention_processors(unet)]

    def _apply_scale(self) -> None:
        self.pipe.set_ip_adapter_scale(self.scale if self.enabled else 0.0)

    def set_scale(self, scale: float) -> None:
        self.scale = scale
        self._apply_scale()

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        self._apply_scale()

    def call_inputs(self, image_prompt=None, **_) -> dict:
        """The pipeline call's arguments for this artifact's per-call input: the image prompt."""
        return {"ip_adapter_image": image_prompt} if image_prompt is not None else {}

    def _restore(self) -> None:
        unet = self.pipe.unet
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = None
        unet.set_attn_processor(self.saved["processors"])
        self.pipe.register_modules(image_encoder=self.saved["image_encoder"],
                                   feature_extractor=self.saved["feature_extractor"])

    def remove(self) -> None:
        self._restore()


def attach(pipe, tensors: dict[str, torch.Tensor], path: Path, scale: float, name: str) -> IPAdapterAttachment:
    """Put an IP-Adapter file (ours or the official release's layout) on `pipe` at `scale`."""
    return IPAdapterAttachment(pipe, tensors, path, scale)
