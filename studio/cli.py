"""The `studio` command line.

Each sub-command is a thin layer over a public function: it parses flags,
calls the function, prints the result. A `StudioError` (bad input) is printed
as one line on stderr with exit status 2, never as a traceback.

Example:
    $ studio sample "a red striped circle" --seed 0 1 2 --output-dir outputs/red
    $ studio toy report --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import typing
from pathlib import Path

from studio.errors import StudioError, TrainingStopped
from studio.pipeline import SCHEDULERS, TOY_MODEL


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags every command that loads a base model shares."""
    parser.add_argument("--model", default=TOY_MODEL, help="'toy' (default), a diffusers folder, a .safetensors/.ckpt file, or a hub id")
    parser.add_argument("--model-config", default=None, help="diffusers folder giving the architecture of a single-file --model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--xformers", action="store_true", help="use xformers attention (CUDA only)")


def load_model(args: argparse.Namespace):
    from studio.pipeline import load

    return load(args.model, device=args.device, dtype=args.dtype, xformers=args.xformers, config=args.model_config)


def parse_adapter_arg(spec: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (path, scale); the scale defaults to 1.

    Example:
        >>> parse_adapter_arg("star.safetensors:0.8")
        (PosixPath('star.safetensors'), 0.8)
    """
    from studio.plugin import check_scale

    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            value = float(scale)
        except ValueError:
            pass  # a ':' inside the path, no scale
        else:
            return Path(path), check_scale(value, f"--adapter {spec}")
    path = Path(spec)
    if not path.exists():
        raise StudioError(f"adapter file {path} not found (use --adapter FILE[:SCALE]; a T2I-Adapter is its folder)")
    return path, 1.0


def warn_toy_vocabulary(prompts: list[str], artifacts: list[Path]) -> None:
    """Tell (on stderr, not failing) which prompt words the toy model ignores; artifacts' trigger words are fine.

    Example:
        >>> warn_toy_vocabulary(["a photo of a red circle"], [])  # doctest: +SKIP
        warning: ignored by the toy model: photo, of (in 'a photo of a red circle')
    """
    from studio.artifact import read_header
    from studio.toy.vocabulary import prompt_warnings

    allowed = [w for path in artifacts for w in read_header(path).trigger_words]
    for line in prompt_warnings(prompts, allowed):
        print(f"warning: {line}", file=sys.stderr)


def sample_settings_from_args(args: argparse.Namespace, prompts: list[str]):
    """The `SampleSettings` the flags ask for, each checked against its declared range (nothing loaded yet).

    Example:
        >>> args = build_parser().parse_args(["sample", "a red circle", "--steps", "-5"])
        >>> sample_settings_from_args(args, args.prompts)
        Traceback (most recent call last):
        studio.errors.StudioError: --steps -5: must be a whole number from 1 to 1000
    """
    from studio.options import config_from_options
    from studio.sample import SampleSettings

    if not prompts:
        raise StudioError("no prompt given: pass at least one prompt, or --prompts-file with one prompt per line")
    options = {"prompts": list(prompts), "seeds": ",".join(args.seed), "negative_prompt": args.negative_prompt,
               "steps": args.steps, "guidance_scale": args.guidance_scale, "scheduler": args.scheduler,
               "width": args.width, "height": args.height, "batch_size": args.batch_size, "image_prompt": args.image_prompt,
               "control": args.control or None}
    settings = config_from_options(SampleSettings, {k: v for k, v in options.items() if v is not None})
    settings.validate()
    from studio import plugin

    # Per-call inputs against the artifacts' methods, from their headers (no model loaded yet).
    methods = plugin.artifact_methods([parse_adapter_arg(spec)[0] for spec in args.adapter])
    given = {key for key in plugin.INPUT_FLAGS if getattr(settings, key)}
    plugin.check_inputs(methods, given)
    if settings.control:
        from studio.adapters.t2i_adapter import check_controls
        from studio.artifact import artifact_file, read_header
        from studio.convert import is_studio_file

        paths = [artifact_file(parse_adapter_arg(spec)[0]) for spec in args.adapter]
        configs = [read_header(path).config if is_studio_file(path) else {"color": None}  # an official release's: unknown
                   for path, method in zip(paths, methods.values()) if method == "t2i-adapter"]
        check_controls(configs, settings.control_images())
    return settings


def cmd_sample(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from studio import plugin
    from studio.sample import read_prompts_file, sample

    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    settings = sample_settings_from_args(args, prompts)  # before the (slow) model load
    output_dir = Path(args.output_dir or Path("outputs") / "samples" / time.strftime("%Y%m%d-%H%M%S"))
    adapters = [parse_adapter_arg(spec) for spec in args.adapter]
    if args.model == TOY_MODEL:
        warn_toy_vocabulary(prompts + [settings.negative_prompt], [p for p, _ in adapters])
    pipe = load_model(args)
    for path, scale in adapters:
        plugin.apply(pipe, path, scale)
    options = {k: v for k, v in asdict(settings).items() if k not in ("prompts", "seeds")}
    result = sample(pipe, settings.prompts, seeds=settings.seeds, output_dir=output_dir,
                    record={"adapters": [{"file": str(p), "scale": s} for p, s in adapters]}, **options)
    print(f"wrote {len(result.files)} images, grid.png and settings.json to {result.output_dir} in {result.seconds:.1f}s")
    return 0


def cmd_toy_pretrain(args: argparse.Namespace) -> int:
    from studio.toy.pretrain import PretrainConfig, pretrain

    for flag, value in (("--unet-steps", args.unet_steps), ("--phrasing-steps", args.phrasing_steps)):
        if value is not None and value < 1:
            raise StudioError(f"{flag} must be at least 1 (got {value})")
    config = PretrainConfig(seed=args.seed)
    if args.unet_steps is not None:
        config.unet_steps = args.unet_steps
    if args.phrasing_steps is not None:
        config.phrasing_steps = args.phrasing_steps
    timings = pretrain(args.output_model, args.output_evaluator, args.work_dir, config, restart=args.restart,
                       reuse_model=args.reuse_model)
    print(json.dumps({"seconds": timings}))
    return 0


def cmd_toy_report(args: argparse.Namespace) -> int:
    from studio.toy.report import report

    for flag, value, least in (("--images", args.images, 1), ("--heldout-images", args.heldout_images, 0),
                               ("--paraphrase-images", args.paraphrase_images, 0)):
        if value < least:
            raise StudioError(f"{flag} must be at least {least} (got {value})")
    pipe = load_model(args)
    result = report(
        pipe, n_images=args.images, n_heldout=args.heldout_images, n_paraphrase=args.paraphrase_images, steps=args.steps,
        guidance_scale=args.guidance_scale, seed=args.seed, progress=not args.json,
    )
    return print_result(result, args)


def print_result(result: dict, args: argparse.Namespace) -> int:
    """Write `result` to `--output` (if given) and print it: one JSON line with `--json`, else a table."""
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}  {value}")
    return 0


def check_counts(args: argparse.Namespace, *flags: str) -> None:
    """Refuse a count flag (`--prompts`, `--workers`, ...) below 1 before anything loads: a bench would measure
    nothing, or fail later with a message about something else; a server with no worker would never run a job.

    Example:
        >>> check_counts(argparse.Namespace(prompts=4), "--prompts")
    """
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < 1:
            raise StudioError(f"{flag} {value}: must be a whole number >= 1")


def cmd_bench_personalize(args: argparse.Namespace) -> int:
    from studio.bench.personalize import personalize

    check_counts(args, "--preservation-prompts", "--seeds", "--max-train-steps")

    result = personalize(args.methods, n_preservation=args.preservation_prompts, n_seeds=args.seeds,
                         work_dir=args.work_dir, steps=args.max_train_steps, train_seeds=args.train_seeds,
                         sample_seed_offset=args.sample_seed_offset)
    return print_result(result, args)


def previous_results(path: str) -> dict:
    """What a bench's `--output` file already holds (entries a partial re-run keeps); {} when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        return {}


def cmd_bench_adapters(args: argparse.Namespace) -> int:
    from studio.bench.adapters import BENCHES, adapters

    check_counts(args, "--references", "--max-train-steps")
    result = adapters(args.adapters, n_refs=args.references, steps=args.max_train_steps, work_dir=args.work_dir,
                      train_seed=args.train_seed)
    if args.output and Path(args.output).is_file():  # one adapter re-measured: the others' entries stay in the file
        kept = previous_results(args.output)
        result = {name: result.get(name, kept.get(name)) for name in BENCHES if name in result or name in kept}
    return print_result(result, args)


def cmd_bench_erase(args: argparse.Namespace) -> int:
    from studio.bench.erase import COLUMNS, ROWS, erase_bench, erased, rece_sd15_timing

    check_counts(args, "--prompts", "--other-prompts", "--seeds")
    widest = max(len(erased(column)) for column in args.concepts or COLUMNS)
    if args.prompts < widest:  # a column's prompts are shared among the concepts it erases
        raise StudioError(f"--prompts {args.prompts}: all-three shares the prompts among its {widest} concepts; give at "
                          f"least {widest}")
    if args.only_speed:
        given = [flag for flag, value in (("--methods", args.methods), ("--concepts", args.concepts)) if value]
        if given:
            raise StudioError(f"--only-speed measures RECE's time on the SD1.5-shaped model alone: drop {' and '.join(given)}")
        result = rece_sd15_timing()
    else:
        result = erase_bench(args.methods, args.concepts, n_prompts=args.prompts, n_other=args.other_prompts,
                             n_seeds=args.seeds, work_dir=args.work_dir)
    if args.output and Path(args.output).is_file():  # rows and concepts not re-measured stay as the file has them
        kept = previous_results(args.output)
        merged = {**kept, **result}
        for row in ROWS:
            if isinstance(kept.get(row), dict) and row in result:
                merged[row] = {**kept[row], **result[row]}
        result = {**{row: merged[row] for row in ROWS if row in merged}, **{k: v for k, v in merged.items() if k not in ROWS}}
    return print_result(result, args)


def cmd_bench_quantize(args: argparse.Namespace) -> int:
    from studio.bench.quantize import quantize_bench

    check_counts(args, "--prompts", "--seeds")
    if args.no_speed and args.only_speed:
        raise StudioError("--no-speed and --only-speed contradict each other; give one")
    if args.only_speed:
        from studio.bench.quantize import int8_speed

        result = int8_speed()
    else:
        result = quantize_bench(args.methods, args.bits, n_prompts=args.prompts, n_seeds=args.seeds,
                                work_dir=args.work_dir, speed=not args.no_speed)
    if args.output and Path(args.output).is_file():  # rows, settings and speed not re-measured stay as the file has them
        kept = previous_results(args.output)
        for key, value in kept.items():
            if key not in result:
                result[key] = value
            elif isinstance(value, dict) and isinstance(result[key], dict) and key != "protocol":
                result[key] = {**value, **result[key]}
    return print_result(result, args)


def cmd_bench_train_step(args: argparse.Namespace) -> int:
    from studio.bench.train_step import ci_notes, train_step

    result = train_step(args.models, args.entries, rounds=args.rounds, steps=args.steps, device=args.device,
                        until_ci=args.until_ci, ci_target=args.ci_target, max_rounds=args.max_rounds,
                        max_minutes=args.max_minutes, threads=args.threads)
    for note in ci_notes(result):
        print(f"warning: {note}", file=sys.stderr)
    return print_result(result, args)


def add_config_flag(parser: argparse.ArgumentParser, f, hint, help_prefix: str = "") -> None:
    """One config field as a flag: a bool as a switch (--NAME / --no-NAME), anything else takes a value
    (converted and range-checked by `config_from_options`, so every entry point refuses alike)."""

    from studio.options import RANGE_KEY, allowed, flag
    from studio.trainers.base import UNSET_MEANS

    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    default = UNSET_MEANS.get(f.name, "none") if default is None else repr(default)
    described = f"{help_prefix}{allowed(hint, f.metadata.get(RANGE_KEY))}; default {default}"
    if hint is bool:
        parser.add_argument(flag(f.name), default=None, action=argparse.BooleanOptionalAction, help=f"{help_prefix}default {default}")
    else:
        parser.add_argument(flag(f.name), default=None, help=described.replace("%", "%%"))


# `studio train` trains adapters, `studio erase` erases concepts, `studio quantize` makes a low-bit UNet: each
# kind's command, its default method, and the loop options it takes (an erasure or a quantization has no data, so
# none of the data options; None: all of them).
COMMANDS = {"adapter": "train", "erase": "erase", "quantize": "quantize"}
KIND_WORDS = {"adapter": "an adapter", "erase": "an erasure", "quantize": "a quantization"}
DEFAULT_METHOD = {"adapter": "lora", "erase": "rece", "quantize": "efficientdm"}
_NO_DATA_LOOP_OPTIONS = ("method", "output_dir", "seed", "max_train_steps", "learning_rate", "lr_scheduler", "mixed_precision",
                         "gradient_accumulation_steps", "gradient_checkpointing", "checkpointing_steps", "resume",
                         "validation_prompt", "validation_steps")
LOOP_OPTIONS = {"adapter": None, "erase": _NO_DATA_LOOP_OPTIONS,
                "quantize": _NO_DATA_LOOP_OPTIONS + ("train_batch_size",)}  # the distillation's (trajectory, step) pairs
# The options of a step-by-step loop, refused for a method computed in one go (RECE, PTQ).
STEP_OPTIONS = ("max_train_steps", "learning_rate", "lr_scheduler", "mixed_precision", "gradient_accumulation_steps",
                "gradient_checkpointing", "checkpointing_steps", "resume", "validation_prompt", "validation_steps",
                "train_batch_size")
REPEATED_OPTIONS = ("concept", "preserve")  # given once per value: --concept circle --concept red


def add_train_args(parser: argparse.ArgumentParser, kind: str = "adapter") -> None:
    """The loop's options (`TrainConfig` fields) that `kind` takes and every option of the registered methods of
    `kind` ("adapter": `studio train`, "erase": `studio erase`, "quantize": `studio quantize`) as flags; default
    None = not given."""
    import typing

    from studio import registry
    from studio.trainers.base import TrainConfig

    parser.add_argument("--config", dest="config_file", default=None, help="TOML file whose keys are these flags")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("method_options", "model") and (LOOP_OPTIONS[kind] is None or f.name in LOOP_OPTIONS[kind]):
            add_config_flag(parser, f, hints[f.name])
    parser.set_defaults(method=None)
    owners: dict[str, list] = {}  # option name -> the methods that have it (LoRA and ResAdapter share --rank)
    for method in registry.METHODS.values():
        if method.kind == kind:
            for f in dataclasses.fields(method.config_class):
                owners.setdefault(f.name, []).append((method, f))
    for name, owned in owners.items():
        method, f = owned[0]
        others = "".join(f" ({m.name}'s default: {_default_text(g)})" for m, g in owned[1:] if _default_text(g) != _default_text(f))
        names = ", ".join(m.name for m, _ in owned)
        if name in REPEATED_OPTIONS:
            parser.add_argument(f"--{name}", action="append", default=None, metavar="TEXT",
                                help=f"{names} option: repeat for several")
            continue
        add_config_flag(parser, f, typing.get_type_hints(method.config_class)[name], help_prefix=f"{names} option{others}: ")


def _default_text(f) -> str:
    """A config field's default as the help shows it."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return repr(default)


def train_config_from_args(args: argparse.Namespace, kind: str = "adapter"):
    """Defaults < the TOML file < flags given on the command line; the method must be of `kind` (`studio train`
    trains adapters, `studio erase` runs erasures, `studio quantize` quantizations)."""
    import tomllib

    from studio import registry
    from studio.options import config_from_options, flag
    from studio.trainers.base import (
        TrainConfig,
        check_prior_data,
        check_text_encoder_options,
    )

    values: dict = {}
    if args.config_file:
        path = Path(args.config_file)
        if not path.is_file():
            raise StudioError(f"config file {path} not found")
        try:
            values.update({k.replace("-", "_"): v for k, v in tomllib.loads(path.read_text()).items()})
        except tomllib.TOMLDecodeError as err:
            raise StudioError(f"{path} is not valid TOML: {err}") from None
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command", "config_file")})
    values.setdefault("model", args.model)
    for name in REPEATED_OPTIONS:  # --concept circle,red is --concept circle --concept red (the page writes it so)
        if isinstance(values.get(name), list):
            values[name] = [part.strip() for item in values[name] for part in str(item).split(",") if part.strip()] \
                or [""]  # given but empty: refused by name below
    values.setdefault("method", DEFAULT_METHOD[kind])
    method = registry.get(values["method"])
    if method.kind != kind:
        raise StudioError(f"--method {method.name} is {KIND_WORDS[method.kind]}, not {KIND_WORDS[kind]}: run it with "
                          f"`studio {COMMANDS[method.kind]} --method {method.name}`")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    method_fields = {f.name for f in dataclasses.fields(method.config_class)}
    options = {k: v for k, v in values.items() if k in method_fields}
    other = sorted(k for k in values if k not in train_fields | method_fields | {"device", "dtype", "xformers"})
    if other:
        owners = [m.name for m in registry.METHODS.values()
                  if other[0] in {f.name for f in dataclasses.fields(m.config_class)}]
        where = f"an option of --method {' / '.join(owners)}" if owners else f"not an option of studio {args.command}"
        raise StudioError(f"{flag(other[0])} is {where}, not of --method {method.name}: "
                          f"choose that method or drop {flag(other[0])}")
    stepwise = sorted(k for k in values if k in STEP_OPTIONS)
    if method.trainer.closed_form and stepwise:
        raise StudioError(f"{flag(stepwise[0])} is not used by --method {method.name}: it is computed in one go, with no "
                          f"training steps; drop {flag(stepwise[0])}")
    config = config_from_options(TrainConfig, {k: v for k, v in values.items() if k in train_fields})
    config.method_options = options
    if kind == "erase":  # what can be checked without the model: the concepts (on the toy model, its vocabulary)
        from studio.erasure import (
            EraseOptions,
            check_options,
            erase_prompts,
            model_tokenizer,
        )

        erase_options = EraseOptions(**{k: options[k] for k in ("concept", "preserve", "anchor") if k in options})
        check_options(erase_options, model_tokenizer(config.model))
        if config.model == TOY_MODEL:
            erase_prompts(erase_options, toy=True)
    if kind == "quantize" and options.get("prompts_file"):  # read before any model loads
        from studio.sample import read_prompts_file

        read_prompts_file(options["prompts_file"])
    method.config(options)  # each method option converted and range-checked, like the loop's
    check_text_encoder_options(config, method.adapter)
    check_prior_data(config, method.trainer)
    return config


def _reporting_process() -> bool:
    """Whether this process reports a run's result (under `accelerate launch`, the main one; the others have
    trained their share and return quietly)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def cmd_train(args: argparse.Namespace) -> int:
    from studio.trainers.base import train

    config = train_config_from_args(args)
    result = train(config)
    if not _reporting_process():
        return 0
    print(json.dumps({"artifact": str(result.artifact), "steps": result.steps, "seconds": round(result.seconds, 1),
                      "trainable_params": result.trainable_params, "final_loss": result.final_loss,
                      "skipped_images": result.data_summary["skipped"]}))
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    from studio.erasure import before_after
    from studio.trainers.base import train

    config = train_config_from_args(args, kind="erase")
    result = train(config)
    if not _reporting_process():
        return 0
    grid = before_after(config, result.artifact)
    print(json.dumps({"artifact": str(result.artifact), "seconds": round(result.seconds, 1), "steps": result.steps,
                      "before_after": str(grid)}))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from studio.quantize import comparison_sheet
    from studio.trainers.base import train

    config = train_config_from_args(args, kind="quantize")
    result = train(config)
    if not _reporting_process():
        return 0
    sheet = comparison_sheet(config, result.artifact)
    print(json.dumps({"artifact": str(result.artifact), "seconds": round(result.seconds, 1), "steps": result.steps,
                      "bits": config.method_options.get("bits", "w4a8"),
                      "size_bytes": result.artifact.stat().st_size, "fp_vs_quantized": str(sheet)}))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from studio.artifact import read_header, verify_content

    header = read_header(args.file)
    verify_content(args.file)  # inspecting a file says whether it is intact
    result = {"method": header.method, "version": header.version, "config": header.config, "sha256": header.sha256,
              "fingerprint": {"model": header.fingerprint.get("model"), "layers": len(header.fingerprint.get("layers", {}))},
              "metadata": sorted(header.extra)}
    if args.model is not None:  # also check it fits that base model (layer shapes only, no weights loaded)
        from studio.artifact import check_fingerprint
        from studio.pipeline import unet_skeleton

        check_fingerprint(header.fingerprint, unet_skeleton(args.model, args.model_config), args.file)
        result["fits_model"] = args.model
    print(json.dumps(result, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from studio import registry
    from studio.artifact import artifact_file, read_header
    from studio.convert import (
        from_kohya,
        from_lycoris,
        is_lycoris_file,
        is_studio_file,
        lycoris_form,
        peft_form,
        to_kohya,
        to_lycoris,
        to_peft,
    )

    source = artifact_file(args.file)
    if not source.is_file():
        raise StudioError(f"{source} not found; pass an artifact file (.safetensors)")
    method = registry.get(read_header(source).method) if is_studio_file(source) else None
    if method is not None and method.attaches != "weights":
        layouts = getattr(method.adapter, "CONVERTS_TO", ())  # SPM: its release's (kohya) layout
        if not layouts:  # its file is the official layout already
            raise StudioError(f"{source} holds {method.name}, already in the layout of its stock loader "
                              f"({method.adapter.STOCK_LOADER}); there is nothing to convert")
        if args.to not in layouts:
            raise StudioError(f"{source} holds {method.name}, which converts only --to {' / '.join(layouts)} "
                              f"({method.adapter.CONVERTS_TO_WHY})")
    if args.to == "peft":
        written = to_peft(source, args.output)
        form = peft_form(read_header(source))
    elif args.to == "lycoris":
        written = to_lycoris(source, args.output, model=args.model)
        form = lycoris_form(read_header(source))
    elif args.to == "kohya":
        written, form = to_kohya(source, args.output), "kohya/A1111 LoRA keys"
    elif method is not None and hasattr(method.adapter, "STOCK_LOADER"):  # --to diffusers: our LoRA has its keys
        raise StudioError(f"{source} is already a studio file with diffusers keys; {method.adapter.STOCK_LOADER} "
                          "loads it as is")
    elif method is not None:
        raise StudioError(f"{source} holds {method.name}, which has no diffusers layout: apply it with studio.plugin "
                          "(or studio sample --adapter), or write it --to lycoris (exact weight differences)")
    elif is_lycoris_file(source):  # full / diag-oft modules: their exact weight differences, in SaRA's layout
        written = from_lycoris(source, args.output, model=args.model)
        form = ("a LoRA" if read_header(written).method == "lora"
                else "a dense weight difference per layer (SaRA's layout holding every changed entry; exact)")
    else:
        written, form = from_kohya(source, args.output, model=args.model), "a LoRA"
    print(f"wrote {written} as {form}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import signal

    user, sep, password = (args.auth or "").partition(":")
    if args.auth is not None and not (sep and user and password):
        raise StudioError(f"--auth needs USER:PASSWORD (got {args.auth!r})")
    check_counts(args, "--workers", "--max-sessions")
    data_dir = Path(args.data_dir).resolve()
    # Uploads and every temporary file stay inside the data folder (set before gradio is imported).
    (data_dir / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = os.environ["TMPDIR"] = str(data_dir / "tmp")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from studio.ui.app import build_app

    if args.model != TOY_MODEL:  # fail before the server starts, with the same message the page would show
        from studio.pipeline import unet_skeleton

        unet_skeleton(args.model, args.model_config)
    app = build_app(data_dir, model=args.model, model_config=args.model_config, workers=args.workers)
    # SIGTERM ends the server like Ctrl-C, through the exit handlers: running jobs are stopped, and
    # training jobs checkpoint, rather than left behind. Once: a second SIGTERM while the exit handlers run
    # (stopping the jobs) would raise SystemExit inside them ("Exception ignored in atexit callback").
    def stop(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("Diffusion Studio stopping (running jobs checkpoint and stop)", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"Diffusion Studio on http://{args.host}:{args.port} (data in {data_dir}; {args.workers} worker(s)); Ctrl-C stops it")
    app.queue(default_concurrency_limit=8).launch(
        quiet=not args.share,  # gradio's own banner suggests launch(share=True); ours is --share
        server_name=args.host, server_port=args.port, share=args.share, auth=(user, password) if args.auth else None,
        allowed_paths=[str(data_dir)], max_file_size="200mb", show_error=False, footer_links=["api"],
        # gradio keeps a copy of the page's state per browser session (about 0.7 MB for this page), 10,000 of them
        # by default: the server's memory would grow with every new visitor. The oldest sessions beyond this go.
        state_session_capacity=args.max_sessions,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from studio import registry

    parser = OneLineParser(prog="studio", description="Diffusion Studio: customize and edit diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("sample", help="generate images from prompts")
    p.add_argument("prompts", nargs="*", help="one or more prompts")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", nargs="+", default=["0"], help="one or more seeds (whole numbers >= 0); each prompt is drawn once per seed")
    p.add_argument("--steps", default=None, help="denoising steps, 1 to 1000 (default 20)")
    p.add_argument("--guidance-scale", default=None, help="classifier-free guidance, 0 to 100 (default 5)")
    p.add_argument("--scheduler", default=None, help=f"one of: {', '.join(SCHEDULERS)} (default: the model's own)")
    p.add_argument("--width", default=None, help="multiple of 8 (default: the model's training size)")
    p.add_argument("--height", default=None, help="multiple of 8 (default: the model's training size)")
    p.add_argument("--batch-size", default=None, help="images per pipeline call (default 8)")
    p.add_argument("--output-dir", default=None, help="default outputs/samples/<time>")
    p.add_argument("--adapter", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a studio artifact at a scale (repeatable; they compose in order)")
    p.add_argument("--image-prompt", default=None, metavar="IMG", help="an image as prompt, for an applied IP-Adapter")
    p.add_argument("--control", action="append", default=[], metavar="IMG[:KIND]",
                   help="a control image (a mask, an edge map) for an applied T2I-Adapter; KIND routes it to the adapter "
                        "of that condition when several are applied (repeatable)")
    add_model_args(p)
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser("train", help=f"train an adapter ({', '.join(registry.METHODS)})")
    p.add_argument("--model", default=TOY_MODEL, help="'toy' (default), a diffusers folder, a .safetensors file, or a hub id")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("erase", help=f"erase concepts from a model ({', '.join(m for m, v in registry.METHODS.items() if v.kind == 'erase')})")
    p.add_argument("--model", default=TOY_MODEL, help="'toy' (default), a diffusers folder, a .safetensors file, or a hub id")
    add_train_args(p, kind="erase")
    p.set_defaults(func=cmd_erase)

    p = commands.add_parser("quantize", help=f"make a low-bit UNet ({', '.join(m for m, v in registry.METHODS.items() if v.kind == 'quantize')}): weights and activations at --bits")
    p.add_argument("--model", default=TOY_MODEL, help="'toy' (default), a diffusers folder, a .safetensors file, or a hub id")
    add_train_args(p, kind="quantize")
    p.set_defaults(func=cmd_quantize)

    p = commands.add_parser("convert", help="write an artifact in another tool's layout")
    p.add_argument("file")
    p.add_argument("--to", required=True, choices=["diffusers", "kohya", "peft", "lycoris"],
                   help="diffusers: a kohya/A1111 LoRA or LyCORIS file into ours (diffusers keys + studio header); "
                        "kohya: our LoRA with kohya/A1111 keys; peft: a PEFT adapter folder (LoRA, OFT, BOFT; exact or "
                        "refused); lycoris: the LyCORIS file AUTOMATIC1111/ComfyUI read (LoRA as LoCon, others as exact "
                        "full weight differences)")
    p.add_argument("--output", required=True)
    p.add_argument("--model", default=TOY_MODEL,
                   help="the base model the file was made for: --to diffusers (to find its layers) and --to lycoris "
                        "(OFT/BOFT/SaRA differences need its weights)")
    p.set_defaults(func=cmd_convert)

    p = commands.add_parser("serve", help="the web app: train, compose and sample in the browser")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="ask for this login")
    p.add_argument("--data-dir", default="outputs/studio", help="jobs, uploads and artifacts live here (default outputs/studio)")
    p.add_argument("--workers", type=int, default=2, help="jobs that run at once (each in its own process)")
    p.add_argument("--max-sessions", type=int, default=200,
                   help="browser sessions whose page state the server keeps in memory, about 0.7 MB each; beyond it "
                        "the oldest are dropped (that page must be reloaded) (default 200)")
    p.add_argument("--model", default=TOY_MODEL, help="the base model the page starts with ('toy', a diffusers folder, ...)")
    p.add_argument("--model-config", default=None, help="diffusers folder giving the architecture of a single-file --model")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("inspect", help="print an artifact's header")
    p.add_argument("file")
    p.add_argument("--model", default=None, help="also check the file fits this base model ('toy', a diffusers folder)")
    p.add_argument("--model-config", default=None, help="diffusers folder giving the architecture of a single-file --model")
    p.set_defaults(func=cmd_inspect)

    bench = commands.add_parser("bench", help="measure the methods").add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = bench.add_parser("personalize", help="teach the toy model the held-out star with each method; fidelity and preservation")
    p.add_argument("--methods", nargs="+", default=None, help="default: every adapter method; lora-te: LoRA with --train-text-encoder")
    p.add_argument("--preservation-prompts", type=int, default=100)
    p.add_argument("--seeds", type=int, default=64, help="sampling seeds per colour and training seed: fidelity "
                   "scores 4 colours x this many samples, composition 2 x this many (default 64: 256 and 128)")
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1], help="train each method once per seed "
                   "(TrainConfig seed); scores are means over them, with a 95%% bootstrap interval (default 0 1; the "
                   "recipe sweep, benchmarks/personalize_sweep.py, uses 100 101)")
    p.add_argument("--sample-seed-offset", type=int, default=0, help="sampling seeds are OFFSET .. OFFSET + --seeds - 1 "
                   "(default 0; the recipe sweep uses 1000)")
    p.add_argument("--max-train-steps", type=int, default=None, help="override every method's step budget")
    p.add_argument("--work-dir", default=None, help="keep the trained artifacts here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--output", default=None, help="also write the JSON to this file")
    p.set_defaults(func=cmd_bench_personalize)
    p = bench.add_parser("adapters", help="image-prompt and structure adapters on the toy model: ip_match, ip_text_compat, ...")
    p.add_argument("--adapters", nargs="+", default=None, choices=["ip-adapter", "t2i-adapter", "res-adapter"], help="default: all")
    p.add_argument("--references", type=int, default=128,
                   help="reference scenes (image prompts, control images), one sample each per setting")
    p.add_argument("--max-train-steps", type=int, default=None, help="override the recipe's step budget")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="keep the trained artifacts here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--output", default=None,
                   help="also write the JSON to this file (entries of adapters not measured now are kept from it)")
    p.set_defaults(func=cmd_bench_adapters)
    p = bench.add_parser("erase", help="concept erasure on the toy model: erase_rate, synonym_rate, preservation, ...")
    p.add_argument("--methods", nargs="+", default=None, choices=["none", "negative-prompt", *(m for m, v in registry.METHODS.items() if v.kind == "erase")],
                   help="rows (default: all); the unedited model is always measured, as the reference")
    p.add_argument("--concepts", nargs="+", default=None, choices=["circle", "red", "striped", "all-three"],
                   help="columns (default: all)")
    p.add_argument("--prompts", type=int, default=48, help="prompts naming the concept, each drawn once per seed")
    p.add_argument("--other-prompts", type=int, default=100, help="prompts naming none of it, for preservation and FD")
    p.add_argument("--only-speed", action="store_true",
                   help="only RECE's time on the SD1.5-shaped model, with this process's threads (the file's other "
                        "entries kept)")
    p.add_argument("--seeds", type=int, default=2, help="sampling seeds per prompt")
    p.add_argument("--work-dir", default=None, help="keep the erasures here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--output", default=None, help="also write the JSON to this file (rows not re-measured are kept)")
    p.set_defaults(func=cmd_bench_erase)

    p = bench.add_parser("quantize", help="low-bit toy UNets (ptq, efficientdm, qat): agreement, psnr, fd, size; int8 speed")
    p.add_argument("--methods", nargs="+", default=None, choices=[m for m, v in registry.METHODS.items() if v.kind == "quantize"],
                   help="rows (default: all; qat is timed against efficientdm's w4a8, so it needs that one)")
    p.add_argument("--bits", nargs="+", default=None, choices=["w8a8", "w4a8", "w4a4"], help="columns (default: all)")
    p.add_argument("--prompts", type=int, default=128, help="prompts drawn by every model, once per seed")
    p.add_argument("--seeds", type=int, default=2, help="sampling seeds per prompt")
    p.add_argument("--no-speed", action="store_true", help="skip the int8 kernel timing on the SD1.5-shaped UNet")
    p.add_argument("--only-speed", action="store_true", help="only the int8 kernel timing (the file's other entries kept)")
    p.add_argument("--work-dir", default=None, help="keep the quantized files here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--output", default=None, help="also write the JSON to this file (entries not re-measured are kept)")
    p.set_defaults(func=cmd_bench_quantize)

    p = bench.add_parser("train-step", help="seconds and peak memory of a training step: ours, PEFT, floor, full")
    p.add_argument("--models", nargs="+", default=None, choices=["toy", "sd15"])
    p.add_argument("--entries", nargs="+", default=None, help="default: floor full lora oft boft sara peft-lora peft-oft peft-boft")
    p.add_argument("--rounds", type=int, default=4, help="timing rounds (with --until-ci: the least)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per entry per round")
    p.add_argument("--until-ci", action="store_true", help="keep adding rounds until every 95%% interval lies within "
                   "the ratio ± --ci-target (or --max-rounds / --max-minutes stops it)")
    p.add_argument("--ci-target", type=float, default=0.03, help="interval half-width goal, relative (0.03 = ±3%%)")
    p.add_argument("--max-rounds", type=int, default=50, help="with --until-ci: stop after this many rounds")
    p.add_argument("--max-minutes", type=float, default=None, help="stop timing a model after about this many minutes")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per measurement (default: one per core; "
                   "1 keeps a busy shared machine from slowing steps a hundredfold)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--output", default=None, help="also write the JSON to this file")
    p.set_defaults(func=cmd_bench_train_step)

    toy = commands.add_parser("toy", help="the embedded ShapesWorld model").add_subparsers(dest="toy_command", required=True, metavar="TOY_COMMAND")
    p = toy.add_parser("pretrain", help="rebuild the toy model and evaluator from scratch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet-steps", type=int, default=None, help="override the UNet step count (fewer = faster, worse)")
    p.add_argument("--phrasing-steps", type=int, default=None, help="override the v2 text encoder's distillation step count")
    p.add_argument("--reuse-model", default=None, help="take stages 2-6 from this v1 toy model folder (its evaluator in "
                   "--output-evaluator) and run only the v2 text encoder stage")
    p.add_argument("--work-dir", default=".cache/toy-pretrain", help="stage outputs; finished stages are reused")
    p.add_argument("--restart", action="store_true", help="discard finished stages in --work-dir")
    p.add_argument("--output-model", default="assets/toy-model")
    p.add_argument("--output-evaluator", default="assets/toy-evaluator")
    p.set_defaults(func=cmd_toy_pretrain)

    p = toy.add_parser("report", help="measure how well a model draws ShapesWorld")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--images", type=int, default=200, help="seen-shape prompts to sample")
    p.add_argument("--heldout-images", type=int, default=40, help="star/heart prompts to sample")
    p.add_argument("--paraphrase-images", type=int, default=100,
                   help="prompts to sample in each of the paraphrase and distractor sets (0: neither)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the JSON to this file")
    add_model_args(p)
    p.set_defaults(func=cmd_toy_report)
    return parser


def check_command(argv: list[str]) -> None:
    """Parse a `studio` command line and check every option as running it would, without running it:
    the web app calls this before it creates a job, so the page refuses what the CLI refuses, alike.

    Example:
        >>> check_command(["train", "--max-train-steps", "-10"])
        Traceback (most recent call last):
        studio.errors.StudioError: --max-train-steps -10: must be a whole number from 1 to 10000000
    """
    parser = build_parser()
    try:
        args = parser.parse_args(join_negative_values(argv))
    except SystemExit:  # a usage error: the command was built wrongly
        shown = " ".join(arg if arg and arg.isprintable() and " " not in arg else repr(arg) for arg in argv)
        raise StudioError(f"not a valid studio command: {shown}") from None  # one line, whatever the values
    kinds = {command: kind for kind, command in COMMANDS.items()}
    if args.command in kinds:
        train_config_from_args(args, kinds[args.command])
    elif args.command == "sample":
        sample_settings_from_args(args, args.prompts)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors in one line (like every other bad input), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        if re.search(r"unrecognized arguments: (true|false|yes|no)\b", message, re.IGNORECASE):
            message += "; yes/no options are switches: --NAME or --no-NAME, with no value"
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def join_negative_values(argv: list[str]) -> list[str]:
    """`--flag -1e-4` -> `--flag=-1e-4`: argparse takes a negative number in exponent form for a flag, so
    the range check, not a usage error, answers it.

    Example:
        >>> join_negative_values(["train", "--learning-rate", "-1e-4", "--seed", "3"])
        ['train', '--learning-rate=-1e-4', '--seed', '3']
    """
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and NEGATIVE_NUMBER.fullmatch(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-(inf|nan)", re.IGNORECASE)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `studio` console script."""
    try:
        args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    except SystemExit as done:  # --help (0) or a usage error (2, its line already printed)
        return int(done.code or 0)
    try:
        return args.func(args)
    except TrainingStopped as stopped:  # asked for (Ctrl-C, SIGTERM, the page's Stop): not an error
        print(stopped, file=sys.stderr)
        return 130
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
