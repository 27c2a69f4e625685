"""`studio convert`: our artifact in another tool's layout, and kohya/A1111 LoRA files into ours.

- `to_peft` writes a PEFT adapter folder (`adapter_config.json` +
  `adapter_model.safetensors`, keys `base_model.model.<module>...`) that
  `peft.PeftModel.from_pretrained(unet, folder)` loads with our plugin's
  outputs, for the methods PEFT has (LoRA, OFT, BOFT), or refuses saying why
  (`peft_form` says which PEFT method each file becomes).
- `to_lycoris` writes the LyCORIS file AUTOMATIC1111 and ComfyUI read: LoRA
  as LoCon (kohya keys), OFT/BOFT/SaRA as exact `full` weight differences
  (`lycoris_form` says why); `from_lycoris` reads LoCon, `full` and `diag-oft`
  files back.
- `to_kohya` writes a LoRA in kohya sd-scripts / A1111 keys:
  `lora_unet_<module path, dots as underscores>.lora_down.weight`,
  `.lora_up.weight` and `.alpha` (a scalar tensor per module).
- `from_kohya` reads such a file back into our artifact (diffusers keys +
  studio header). Kohya names lose the dots, so the base model is needed to
  find the module each key belongs to (and for the fingerprint). A per-module
  alpha is folded into `lora_up`, so the file's alpha equals its rank.

Example:
    >>> to_kohya("lora.safetensors", "lora-kohya.safetensors")  # doctest: +SKIP
    >>> from_kohya("lora-kohya.safetensors", "lora.safetensors", model="toy")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from studio import registry
from studio.artifact import (
    METHOD_KEY,
    ArtifactHeader,
    fingerprint,
    load_tensors,
    read_header,
    save_artifact,
)
from studio.errors import StudioError
from studio.orthogonal import cayley, skew_symmetric
from studio.pipeline import check_safetensors

PEFT_PREFIX = "base_model.model."
KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


def _layer_kind(shape: list[int] | None) -> str:
    """'Linear', '1x1 conv' or 'KxK conv' for a weight shape from an artifact's fingerprint."""
    if shape is None or len(shape) == 2:
        return "Linear"
    return f"{shape[2]}x{shape[3]} conv"


def _kxk_convs(header: ArtifactHeader) -> list[str]:
    """The layers of an artifact that are convolutions with a kernel larger than 1x1 (from its fingerprint)."""
    layers = header.fingerprint.get("layers", {})
    return sorted(name for name, shape in layers.items() if shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1)


def peft_form(header: ArtifactHeader) -> str:
    """One line saying which PEFT method `to_peft` writes this artifact as, and why; a `StudioError` where it refuses.

    PEFT's conventions, checked against its code (peft/tuners/oft, peft/tuners/boft) and its loader:

    - LoRA: PEFT's own layers (ours are PEFT's), any Linear or Conv2d: written as is.
    - OFT on Linear and 1x1 convs: PEFT's OFT rotates the input x R, as ours does (W R^T), with the
      same exact Cayley map and generator layout: written as PEFT OFT (`use_cayley_neumann=False`).
    - OFT on a kxk conv (k > 1): PEFT's OFT unfolds the input into kxk patches, rotates them and
      folds them back, summing the overlaps; that is not the base layer even at R = I, so no OFT
      tensors reproduce ours there. PEFT's BOFT rotates the conv's (out x in*k*k) weight exactly as
      we do, and a 1-factor BOFT with s = 1 is OFT: such files are written as PEFT BOFT.
    - BOFT with one butterfly factor: written as is.
    - BOFT with m > 1 factors: PEFT builds one factor where its CUDA extension is missing, so the m
      factors are multiplied into one block-diagonal rotation with blocks of b * 2**(m-1) (what the
      product is) and written as a 1-factor BOFT of that block size, which loads the same everywhere.
    - SaRA: PEFT has no such method; refused.

    Example:
        >>> peft_form(read_header("oft.safetensors"))  # doctest: +SKIP
        'PEFT OFT (every layer is a Linear or a 1x1 conv, where PEFT's OFT rotates as ours does)'
    """
    method = header.method
    if method == "lora":
        return "PEFT LoRA (PEFT's own layers, written as they are)"
    if method == "oft":
        convs = _kxk_convs(header)
        if not convs:
            return "PEFT OFT (every layer is a Linear or a 1x1 conv, where PEFT's OFT rotates as ours does)"
        return (f"PEFT BOFT with 1 factor and s = 1, which is OFT: PEFT's OFT folds overlapping patches on kxk convs "
                f"and does not match ours there ({len(convs)} such layers, e.g. {convs[0]})")
    if method == "boft":
        factors = int(header.config.get("n_butterfly_factor", 1))
        if factors == 1:
            return "PEFT BOFT with 1 factor (the same layout and convention as ours)"
        span = int(header.config["block_size"]) * 2 ** (factors - 1)
        return (f"PEFT BOFT with 1 factor of block size {span}: the product of our {factors} factors, because PEFT "
                "without its CUDA extension builds a single factor")
    raise StudioError(
        f"PEFT has no {method!r} method, so a {method} file cannot be written as a PEFT adapter; "
        "convert it with --to lycoris (exact weight differences) or apply it with studio.plugin"
    )


def _check_square_kernels(header: ArtifactHeader) -> None:
    """PEFT's OFT and BOFT size a conv's rotation as in * k[0] * k[0]: refuse non-square kernels, naming them."""
    layers = header.fingerprint.get("layers", {})
    odd = sorted(name for name, shape in layers.items() if shape is not None and len(shape) == 4 and shape[2] != shape[3])
    if odd:
        raise StudioError(
            f"{len(odd)} layers have non-square kernels (e.g. {odd[0]}: {layers[odd[0]]}), which PEFT's {header.method.upper()} "
            "sizes wrongly (it assumes kh == kw); leave them out of target_modules to convert to peft"
        )


def _oft_as_boft(grouped: dict[str, dict[str, torch.Tensor]], header: ArtifactHeader) -> dict[str, torch.Tensor]:
    """Our OFT generators as PEFT 1-factor BOFT tensors: boft_R (1, n, b, b) holds Q itself (PEFT takes its
    skew part, 0.5 (G - G^T) = Q), boft_s is all ones in PEFT's shape ((out, 1) Linear, (1, out) Conv2d)."""
    from studio.adapters import boft, oft

    block_size = int(header.config["block_size"])
    tensors = {}
    for module, params in grouped.items():
        generators = skew_symmetric(params[oft.PARAM].float(), block_size)
        out_features = header.fingerprint["layers"][module][0]
        is_conv = len(header.fingerprint["layers"][module]) == 4
        tensors[f"{PEFT_PREFIX}{module}.{boft.R_PARAM}"] = generators.unsqueeze(0).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.{boft.S_PARAM}"] = torch.ones((1, out_features) if is_conv else (out_features, 1))
    return tensors


def merge_butterfly(generators: torch.Tensor, layer: str = "layer") -> torch.Tensor:
    """m butterfly factors' generators (m, n, b, b) -> the generators (1, n*b/span, span, span) of one
    block-diagonal rotation equal to their product M = F_{m-1} ... F_0, span = b * 2**(m-1).

    Each factor i only mixes entries inside groups of b * 2**i, so M is block-diagonal with blocks of
    span. Multiplying a probe that holds an identity in every group by M reads all blocks at once;
    each block's generator is its Cayley transform (the Cayley map is its own inverse). A block with
    an eigenvalue near -1 has no usable Cayley generator: refused, naming `layer`.

    Example:
        >>> g = torch.zeros(2, 4, 2, 2)
        >>> merge_butterfly(g).shape
        torch.Size([1, 2, 4, 4])
    """
    from studio.adapters.boft import rotate_input_butterfly

    m, n, b, _ = generators.shape
    span, dim = b * 2 ** (m - 1), n * b
    skew = 0.5 * (generators.double() - generators.double().transpose(-1, -2))
    blocks = cayley(skew.reshape(m * n, b, b)).reshape(m, n, b, b)
    probe = torch.eye(span, dtype=torch.float64).repeat(1, dim // span)  # (span, dim): an identity in each group
    merged = rotate_input_butterfly(probe, blocks).reshape(span, dim // span, span).transpose(0, 1)
    try:
        merged_generators = cayley(merged)
    except RuntimeError:  # I + M singular
        merged_generators = torch.full_like(merged, float("inf"))
    merged_generators = 0.5 * (merged_generators - merged_generators.transpose(-1, -2))
    # PEFT recomputes the rotation from these generators in float32: check that it gets M back.
    error = (cayley(merged_generators.float()).double() - merged).abs().max().item() if merged_generators.isfinite().all() else float("inf")
    if not error < 1e-4:
        raise StudioError(
            f"{layer}: the product of its {m} butterfly factors has an eigenvalue near -1 (a half-turn), which a single "
            "Cayley-parameterised factor cannot hold, so it has no exact PEFT form; apply this file with studio.plugin "
            "or convert it with --to lycoris"
        )
    return merged_generators.float().unsqueeze(0).contiguous()


def to_peft(path: str | Path, output: str | Path) -> Path:
    """Write the artifact at `path` as a PEFT adapter folder `output` whose outputs equal our plugin's,
    in the PEFT method `peft_form` names, or raise a `StudioError` saying why that cannot be exact.

    `target_modules` lists the artifact's layers by full name, so PEFT wraps exactly those.

    Example:
        >>> folder = to_peft("outputs/star/oft.safetensors", "star-oft")  # doctest: +SKIP
        >>> unet = PeftModel.from_pretrained(unet, folder)  # doctest: +SKIP
    """
    from peft import BOFTConfig as PeftBOFTConfig
    from peft import OFTConfig as PeftOFTConfig

    from studio.adapters import boft, oft
    from studio.plugin import split_by_module

    header = read_header(path)
    peft_form(header)  # refuses methods PEFT lacks
    adapter = registry.get(header.method).adapter
    tensors = load_tensors(path)
    unexpected = [key for key in tensors if not key.startswith(adapter.KEY_PREFIX)]
    if unexpected:
        raise StudioError(f"{path}: unexpected tensor {unexpected[0]!r} for {header.method}; only UNet adapters convert to peft")
    grouped = split_by_module(tensors, adapter)
    modules = sorted(grouped)
    if header.method == "lora":
        renamed = {PEFT_PREFIX + key[len(adapter.KEY_PREFIX):]: value for key, value in tensors.items()}
        config = {**adapter.peft_adapter_config(header.config), "target_modules": modules}
    elif header.method == "oft" and not _kxk_convs(header):
        _check_square_kernels(header)
        renamed = {f"{PEFT_PREFIX}{module}.{oft.PARAM}": params[oft.PARAM] for module, params in grouped.items()}
        # coft=False: COFT's projection is a training step; our plugin applies the generators as stored,
        # while PEFT with coft=True would project them again at every forward.
        config = PeftOFTConfig(r=0, oft_block_size=int(header.config["block_size"]), coft=False,
                               target_modules=modules, use_cayley_neumann=False).to_dict()
    elif header.method == "oft":
        _check_square_kernels(header)
        renamed = _oft_as_boft(grouped, header)
        config = PeftBOFTConfig(boft_block_size=int(header.config["block_size"]), boft_n_butterfly_factor=1,
                                target_modules=modules).to_dict()
    else:  # boft
        _check_square_kernels(header)
        block_size, factors = int(header.config["block_size"]), int(header.config.get("n_butterfly_factor", 1))
        renamed = {}
        for module, params in grouped.items():
            generators = params[boft.R_PARAM] if factors == 1 else merge_butterfly(params[boft.R_PARAM], module)
            renamed[f"{PEFT_PREFIX}{module}.{boft.R_PARAM}"] = generators
            renamed[f"{PEFT_PREFIX}{module}.{boft.S_PARAM}"] = params[boft.S_PARAM]
        config = PeftBOFTConfig(boft_block_size=block_size * 2 ** (factors - 1), boft_n_butterfly_factor=1,
                                target_modules=modules).to_dict()
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=list))
    return folder


def to_kohya(path: str | Path, output: str | Path) -> Path:
    """Write our LoRA artifact at `path` with kohya/A1111 keys to the file `output`: the UNet's modules
    as `lora_unet_*`, the text encoder's as `lora_te_*` (on SDXL, a file with `text_encoder_2` tensors:
    `lora_te1_*` and `lora_te2_*`).

    Example:
        >>> to_kohya("outputs/star/lora.safetensors", "star-kohya.safetensors")  # doctest: +SKIP
        PosixPath('star-kohya.safetensors')
    """
    from studio.adapters import lora

    header = read_header(path)
    if header.method == "spm":
        return _spm_to_kohya(path, output, header)
    if header.method != "lora":
        raise StudioError(f"{path} holds {header.method}; only LoRA and SPM files have a kohya layout")
    stored = load_tensors(path)
    sdxl = any(key.startswith("text_encoder_2.") for key in stored)
    kohya_prefix = {"unet.": KOHYA_UNET_PREFIX, "text_encoder.": "lora_te1_" if sdxl else "lora_te_",
                    "text_encoder_2.": "lora_te2_"}
    tensors = {}
    alpha = torch.tensor(float(header.config.get("alpha", header.config.get("rank", 4))))
    for key, value in stored.items():
        prefix = next((p for p in kohya_prefix if key.startswith(p)), None)
        for ours, theirs in ((lora.A_PARAM, KOHYA_DOWN), (lora.B_PARAM, KOHYA_UP)):
            if prefix is not None and key.endswith("." + ours):
                module = key[len(prefix):-len(ours) - 1]  # text encoders' with kohya's text_model. prefix already
                stem = kohya_prefix[prefix] + module.replace(".", "_")
                tensors[stem + theirs] = value
                tensors[stem + KOHYA_ALPHA] = alpha.clone()
                break
        else:
            raise StudioError(f"{path}: unexpected tensor {key!r} for a LoRA file")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(header.config.get("rank")),
                                               "ss_network_alpha": str(float(alpha))})
    return output


def _spm_to_kohya(path: str | Path, output: str | Path, header: ArtifactHeader) -> Path:
    """An SPM file in the official SPM release layout: kohya keys (a 1x1 `lora_up` for a convolution), alpha = rank
    (our `spm_up` already holds α/r), and the release's metadata (`prompts`, `rank`, `alpha`). It loads as a plain
    LoRA, without Facilitated Transport."""
    from studio.adapters import spm

    stored = load_tensors(path)
    tensors = {}
    for key, value in stored.items():
        layer, _, param = key[len(spm.KEY_PREFIX):].rpartition(".")
        stem = KOHYA_UNET_PREFIX + layer.replace(".", "_")
        if param == spm.DOWN:
            tensors[stem + KOHYA_DOWN] = value
            tensors[stem + KOHYA_ALPHA] = torch.tensor(float(value.shape[0]))
        else:
            conv = stored[f"{spm.KEY_PREFIX}{layer}.{spm.DOWN}"].dim() == 4
            tensors[stem + KOHYA_UP] = value[:, :, None, None] if conv else value
    rank = header.config.get("rank", 1)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(output), metadata={
        "prompts": ",".join(header.config.get("concept", [])), "rank": str(rank), "alpha": str(float(rank)),
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(rank))})
    return output


def from_kohya(path: str | Path, output: str | Path, model: str = "toy") -> Path:
    """Read a kohya/A1111 LoRA file made for `model` and write it as our artifact `output`: `lora_unet_*`
    into the UNet's keys, `lora_te_*`/`lora_te1_*` into `text_encoder.` and `lora_te2_*` into `text_encoder_2.`.

    Example:
        >>> from_kohya("star-kohya.safetensors", "star.safetensors", model="toy")  # doctest: +SKIP
        PosixPath('star.safetensors')
    """
    from studio.adapters import lora
    from studio.pipeline import load
    from studio.targets import file_module_name

    path = Path(path)
    tensors = load_tensors(path)
    # kohya prefix -> (pipeline part, what an error calls it)
    parts = {KOHYA_UNET_PREFIX: ("unet", "UNet"), "lora_te_": ("text_encoder", "text encoder"),
             "lora_te1_": ("text_encoder", "text encoder"), "lora_te2_": ("text_encoder_2", "second text encoder")}
    stems = sorted({k[: -len(KOHYA_DOWN)] for k in tensors if k.endswith(KOHYA_DOWN)})
    kohya_prefix = {s: next((p for p in parts if s.startswith(p)), None) for s in stems}
    if not stems or None in kohya_prefix.values():
        raise StudioError(f"{path} is not a kohya LoRA file (no lora_unet_*/lora_te*_*.lora_down.weight tensors)")
    for stem in stems:
        if stem + KOHYA_UP not in tensors:
            kind = "text-encoder" if parts[kohya_prefix[stem]][0] != "unet" else "UNet"
            raise StudioError(f"{path}: {kind} LoRA tensor {stem}{KOHYA_DOWN} has no {stem}{KOHYA_UP}; the file is incomplete")
    ranks = {tensors[s + KOHYA_DOWN].shape[0] for s in stems}
    if len(ranks) > 1:
        raise StudioError(f"{path} mixes LoRA ranks {sorted(ranks)}; only files with one rank convert")
    rank = ranks.pop()
    pipe = load(model, device="cpu", dtype="fp32")
    ours, modules, base_fingerprint = {}, {}, {}
    for prefix, (part, what) in parts.items():
        part_stems = [s for s in stems if kohya_prefix[s] == prefix]
        if not part_stems:
            continue
        net = getattr(pipe, part, None)
        if net is None:
            raise StudioError(f"{path} has {what} tensors ({part_stems[0]}, ...) but {model} has no {what}; "
                              "pass the --model it was made for (lora_te1_/lora_te2_ files are SDXL's)")
        by_kohya_name = {file_module_name(net, name).replace(".", "_"): name for name, _ in net.named_modules()}
        unknown = [s for s in part_stems if s[len(prefix):] not in by_kohya_name]
        if unknown:
            raise StudioError(
                f"{len(unknown)} modules of {path} are not in {model}'s {what} (e.g. {unknown[0]}); "
                "pass the --model it was made for (original-layout SDXL names like input_blocks_* are not supported)"
            )
        for stem in part_stems:
            name = by_kohya_name[stem[len(prefix):]]
            down, up = tensors[stem + KOHYA_DOWN], tensors[stem + KOHYA_UP]
            weight = getattr(net.get_submodule(name), "weight", None)
            if weight is None or up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel():
                raise StudioError(f"{path}: {stem} (down {list(down.shape)}, up {list(up.shape)}) does not fit {model}'s "
                                  f"{what} layer {name} ({list(weight.shape) if weight is not None else 'no weight'}); "
                                  "pass the --model it was made for")
            alpha = float(tensors[stem + KOHYA_ALPHA]) if stem + KOHYA_ALPHA in tensors else float(rank)
            module = file_module_name(net, name)
            ours[f"{part}.{module}.{lora.A_PARAM}"] = down
            ours[f"{part}.{module}.{lora.B_PARAM}"] = up * (alpha / rank)
            modules.setdefault(part, []).append(name)
    for part, names in modules.items():
        found = fingerprint(getattr(pipe, part), names)
        if part == "unet":
            base_fingerprint.update(found)
        else:
            base_fingerprint[part] = found
    if "unet" not in modules:
        base_fingerprint.update({"model": type(pipe.unet).__name__, "layers": {}})
    text_encoders = tuple(part for part in modules if part != "unet")
    config = lora.LoRAConfig(rank=rank, alpha=float(rank), target_modules=modules.get("unet", []))
    te_targets = sorted({name.rsplit(".", 1)[-1] for part in text_encoders for name in modules[part]})
    metadata = lora.file_metadata(config, text_encoders=text_encoders, text_encoder_targets=te_targets)
    return save_artifact(output, ours, "lora", config.__dict__, base_fingerprint, metadata)


def is_studio_file(path: str | Path) -> bool:
    """Whether the .safetensors file at `path` carries our header."""
    return METHOD_KEY in (check_safetensors(Path(path)).get("__metadata__") or {})


# LyCORIS (the layout AUTOMATIC1111 and ComfyUI read for LoCon, LoHa, OFT, ... files): kohya names,
# `lora_unet_<module path, dots as underscores>.<param>`, and per module the params of one algorithm.
LYCORIS_FULL_DIFF = "diff"  # algo "full": the weight difference W' - W (and "diff_b" for the bias)
LYCORIS_FULL_BIAS = "diff_b"
LYCORIS_OFT_BLOCKS, LYCORIS_ALPHA, LYCORIS_RESCALE = "oft_blocks", "alpha", "rescale"
KOHYA_LORA_PARAMS = {KOHYA_DOWN[1:], KOHYA_UP[1:], KOHYA_ALPHA[1:]}


def lycoris_form(header: ArtifactHeader) -> str:
    """One line saying which LyCORIS algorithm `to_lycoris` writes this artifact as, and why.

    LyCORIS's own OFT forms (`diag-oft`, `boft`) rotate a weight's *output* side, blockwise over its
    rows (W' = R^T W), with R = (I + Q)(I - Q)^-1; ours rotate the *input* side (W' = W R^T). A
    rotation of one side is not a rotation of the other, so no diag-oft/boft blocks reproduce our
    OFT or BOFT (tests/test_convert_formats.py shows it numerically): those are written as LyCORIS's
    `full` weight differences, exact and as large as the layers they touch. LoRA is LyCORIS's LoCon,
    whose keys are kohya's.

    Example:
        >>> lycoris_form(read_header("lora.safetensors"))  # doctest: +SKIP
        'LyCORIS LoCon (lora_down / lora_up / alpha: the kohya layout)'
    """
    if header.method == "lora":
        return "LyCORIS LoCon (lora_down / lora_up / alpha: the kohya layout)"
    if header.method in ("oft", "boft"):
        return (f"LyCORIS full weight differences (exact; LyCORIS's diag-oft and boft rotate a weight's output side, "
                f"our {header.method.upper()} its input side, so their blocks cannot hold these rotations)")
    return f"LyCORIS full weight differences (exact; LyCORIS has no {header.method} algorithm)"


def to_lycoris(path: str | Path, output: str | Path, model: str = "toy") -> Path:
    """Write the artifact at `path` as a LyCORIS file `output` (the form `lycoris_form` names).

    A `full` difference is W' - W of each layer, so it needs the base weights: `model` is the base model
    the artifact was made on (checked against its fingerprint). A LoRA needs no model.

    Example:
        >>> to_lycoris("outputs/star/oft.safetensors", "star-oft-lycoris.safetensors", model="toy")  # doctest: +SKIP
    """
    from studio.artifact import check_fingerprint
    from studio.pipeline import load
    from studio.plugin import split_by_module

    header = read_header(path)
    if header.method == "lora":
        return to_kohya(path, output)
    adapter = registry.get(header.method).adapter
    tensors = load_tensors(path)
    unexpected = [key for key in tensors if not key.startswith(adapter.KEY_PREFIX)]
    if unexpected:
        raise StudioError(f"{path}: unexpected tensor {unexpected[0]!r} for {header.method}; only UNet adapters convert to lycoris")
    unet = load(model, device="cpu", dtype="fp32").unet
    check_fingerprint(header.fingerprint, unet, path)
    diffs = {}
    with torch.no_grad():
        for module, params in split_by_module(tensors, adapter).items():
            weight = unet.get_submodule(module).weight.float()
            changed = adapter.transform(weight, params, 1.0, header.config)
            diffs[f"{KOHYA_UNET_PREFIX}{module.replace('.', '_')}.{LYCORIS_FULL_DIFF}"] = (changed - weight).contiguous()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(diffs, str(output), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"})})
    return output


def _lycoris_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A LyCORIS/kohya state dict grouped by module: `lora_unet_x.lora_down.weight` -> {"lora_unet_x": {"lora_down.weight": ...}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, dot, param = key.partition(".")
        if dot:
            grouped.setdefault(stem, {})[param] = value
    return grouped


def _lycoris_algo(params: dict[str, torch.Tensor]) -> str:
    """Which LyCORIS algorithm a module's params belong to: 'lora', 'full', 'diag-oft', or another name we do not read."""
    names = set(params)
    if {KOHYA_DOWN[1:], KOHYA_UP[1:]} <= names:
        return "lora" if names <= KOHYA_LORA_PARAMS else "lora with " + ", ".join(sorted(names - KOHYA_LORA_PARAMS))
    if LYCORIS_FULL_DIFF in names:
        return "full"
    if LYCORIS_OFT_BLOCKS in names:
        return "diag-oft" if params[LYCORIS_OFT_BLOCKS].ndim == 3 else "boft"
    if any(n.startswith("hada_") for n in names):
        return "loha"
    if any(n.startswith("lokr_") for n in names):
        return "lokr"
    return "unknown (" + ", ".join(sorted(names)) + ")"


def is_lycoris_file(path: str | Path) -> bool:
    """Whether the .safetensors file at `path` holds LyCORIS modules other than plain LoRA/LoCon
    (those are kohya files: `from_kohya` reads them).

    Example:
        >>> is_lycoris_file("star-oft-lycoris.safetensors")  # doctest: +SKIP
        True
    """
    return any(_lycoris_algo(params) != "lora" for params in _lycoris_modules(load_tensors(path)).values())


def _diag_oft_weight(weight: torch.Tensor, params: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """LyCORIS diag-OFT's changed weight, in float64: blocks of the weight's rows (its output side)
    rotated, W'_k = R_k^T W_k, R = (I + Q)(I - Q)^-1 with Q = B - B^T over every block; when the file's
    alpha is > 0, Q is scaled down to norm alpha * out_dim if larger; then rows times `rescale` if present."""
    blocks = params[LYCORIS_OFT_BLOCKS].double()
    n_blocks, size, _ = blocks.shape
    out_dim = weight.shape[0]
    if n_blocks * size != out_dim:
        raise StudioError(f"{module}: diag-oft blocks {tuple(blocks.shape)} do not cover the layer's {out_dim} outputs")
    skew = blocks - blocks.transpose(1, 2)
    constraint = float(params[LYCORIS_ALPHA]) * out_dim if LYCORIS_ALPHA in params else 0.0
    norm = skew.norm() + 1e-8
    if constraint > 0 and norm > constraint:
        skew = skew * (constraint / norm)
    eye = torch.eye(size, dtype=torch.float64)
    rotations = (eye + skew) @ torch.linalg.inv(eye - skew)
    rows = weight.double().reshape(n_blocks, size, -1)
    changed = torch.einsum("knm,knx->kmx", rotations, rows).reshape(weight.shape)
    if LYCORIS_RESCALE in params:
        changed = params[LYCORIS_RESCALE].double().reshape(out_dim, *[1] * (weight.dim() - 1)) * changed
    return changed


def _lycoris_delta(algo: str, params: dict[str, torch.Tensor], weight: torch.Tensor, module: str) -> torch.Tensor:
    """The weight difference W' - W (float32) that one LyCORIS module makes to the base weight `weight`."""
    misfit = StudioError(f"{module}: the file's {algo} tensors do not fit this layer's weight {list(weight.shape)}; "
                         "pass the --model the file was made for")
    if algo == "full":
        diff_b = params.get(LYCORIS_FULL_BIAS)
        if diff_b is not None and bool(diff_b.any()):
            raise StudioError(f"{module}: the file changes the bias (diff_b), which no studio method holds; only weight differences import")
        if params[LYCORIS_FULL_DIFF].shape != weight.shape:
            raise misfit
        return params[LYCORIS_FULL_DIFF].float()
    if algo == "lora":
        down, up = params[KOHYA_DOWN[1:]].double(), params[KOHYA_UP[1:]].double()
        if up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel():
            raise misfit
        rank = down.shape[0]
        alpha = float(params[KOHYA_ALPHA[1:]]) if KOHYA_ALPHA[1:] in params else float(rank)
        return ((up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)) * (alpha / rank)).reshape(weight.shape).float()
    return (_diag_oft_weight(weight, params, module) - weight.double()).float()  # diag-oft


def from_lycoris(path: str | Path, output: str | Path, model: str = "toy") -> Path:
    """Read a LyCORIS file made for `model` and write it as our artifact `output`.

    Plain LoRA/LoCon files become a LoRA (`from_kohya`, text-encoder modules included). Files with `full`
    or `diag-oft` modules (LoCon modules may sit beside them) become a SaRA-layout artifact holding every changed entry of each
    layer's weight difference: exact, and applied, scaled and removed by `studio.plugin` like any
    artifact. LoHa, LoKr, LyCORIS BOFT, bias differences and text-encoder modules are refused, named.

    Example:
        >>> from_lycoris("star-oft-lycoris.safetensors", "star-oft-dense.safetensors", model="toy")  # doctest: +SKIP
    """
    from studio.adapters import sara
    from studio.pipeline import load

    path = Path(path)
    modules = _lycoris_modules(load_tensors(path))
    algos = {stem: _lycoris_algo(params) for stem, params in modules.items()}
    if algos and set(algos.values()) == {"lora"}:
        return from_kohya(path, output, model=model)
    text = sorted(stem for stem in modules if stem.startswith(tuple(p.rstrip("_") for p in KOHYA_TEXT_PREFIXES)))
    if text:
        raise StudioError(f"{path} has {len(text)} text-encoder modules ({text[0]}, ...); beside full or diag-oft modules only "
                          "UNet modules import: remove the lora_te* keys to keep the UNet part")
    unreadable = sorted({algo for algo in algos.values() if algo not in ("lora", "full", "diag-oft")})
    if unreadable:
        example = next(stem for stem, algo in algos.items() if algo == unreadable[0])
        raise StudioError(f"{path} has LyCORIS modules of {', '.join(unreadable)} (e.g. {example}); only LoRA/LoCon, full and "
                          "diag-oft modules import")
    if not algos or not all(stem.startswith(KOHYA_UNET_PREFIX) for stem in algos):
        raise StudioError(f"{path} is not a LyCORIS file (no lora_unet_* modules)")
    unet = load(model, device="cpu", dtype="fp32").unet
    by_kohya_name = {name.replace(".", "_"): name for name, _ in unet.named_modules()}
    unknown = [stem for stem in algos if stem[len(KOHYA_UNET_PREFIX):] not in by_kohya_name]
    if unknown:
        raise StudioError(f"{len(unknown)} modules of {path} are not in {model}'s UNet (e.g. {unknown[0]}); pass the --model it was made for")
    ours, names = {}, []
    for stem, algo in sorted(algos.items()):
        module = by_kohya_name[stem[len(KOHYA_UNET_PREFIX):]]
        weight = unet.get_submodule(module).weight.detach().float()
        delta = _lycoris_delta(algo, modules[stem], weight, module).reshape(-1)
        indices = torch.nonzero(delta).flatten()
        if weight.numel() >= 2**31:
            raise StudioError(f"{module}: a weight of {weight.numel()} entries is too large for SaRA's int32 indices")
        ours[f"{sara.KEY_PREFIX}{module}.{sara.INDICES}"] = indices.to(torch.int32)
        ours[f"{sara.KEY_PREFIX}{module}.{sara.VALUES}"] = delta[indices].contiguous()
        names.append(module)
    config = sara.SaRAConfig(fraction=1.0, rank_weight=0.0, target_modules=names)
    return save_artifact(output, ours, "sara", asdict(config), fingerprint(unet, names), sara.file_metadata(config))
