"""The Gradio app behind `studio serve`: Model, Train, Compose & Sample and Jobs tabs.

The app holds no method logic: every run it starts is a `studio` command line (shown in the
page, to copy) queued as a background job (`studio.ui.jobs`), and its forms are built from the
registry and the methods' config dataclasses, so a method that is registered appears here with
no UI code of its own. A tab exists only for a kind of method that has methods: today
"adapter" (Train), "erase" (Erase) and "quantize" (Quantize).

Example:
    >>> from studio.ui.app import build_app  # doctest: +SKIP
    >>> build_app("outputs/studio").launch()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import shutil
import time
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from studio.ui import uploads
from studio.ui.jobs import DONE, FINISHED, STOPPED, JobQueue

from studio import registry
from studio.cli import check_command
from studio.erasure import BEFORE_AFTER_NAME
from studio.quantize import COMPARISON_NAME
from studio.errors import StudioError
from studio.options import unwrap_optional
from studio.pipeline import SCHEDULERS, TOY_MODEL
from studio.plugin import SCALES

# The Train tab's dataset upload (tests find the field by it).
UPLOAD_LABEL = "images + .txt captions (same names); a T2I-Adapter's control images as NAME-condition.png"

ERASE_HELP = ("Erase one or more concepts (comma-separated). On the toy model a concept is a shape, colour or texture "
              "it draws (circle, red, striped, ...); it becomes another of its kind (the anchor), and every caption "
              "not naming it is kept. When done, the job shows the concept and a kept one before and after, and the "
              "erasure is in Compose & Sample's artifact list.")
QUANTIZE_HELP = ("Make a low-bit UNet (weights and activations at the bits chosen) from the model itself: no dataset. "
                 "ptq calibrates only (seconds); efficientdm also distils the full-precision model into a "
                 "quantization-aware LoRA (minutes); qat trains every weight (the costly baseline). When done, the job "
                 "shows full-precision (left) and quantized (right) samples and the file's size, and the quantized "
                 "model is in Compose & Sample's artifact list.")
# A finished job's result sheet (an erasure's, a quantization's) and its caption in the job's gallery.
RESULT_SHEETS = {BEFORE_AFTER_NAME: "before (left) | after (right): the erased concept, then one kept",
                 COMPARISON_NAME: "full precision (left) | quantized (right)"}

# ShapesWorld datasets one click away (edit the spec in the page for others).
SHAPESWORLD_PRESETS = {
    "star, 8 renders, 'a {color} sks'": "shapesworld:shape=star,count=8,colors=red|green|blue|yellow,caption=a {color} sks",
    "heart, 8 renders, 'a {color} sks'": "shapesworld:shape=heart,count=8,colors=red|green|blue|yellow,caption=a {color} sks",
    "seen shapes, 120 renders, full captions": "shapesworld:shape=seen,count=120,caption={caption}",
    "shapes anywhere + masks (T2I-Adapter), 1000 renders": "shapesworld:shape=seen,count=1000,condition=mask,place=random,"
                                                          "caption=a {color} {texture} {shape} on a {background} background",
    "shapes anywhere + edges (T2I-Adapter), 1000 renders": "shapesworld:shape=seen,count=1000,condition=edge,place=random,"
                                                          "caption=a {color} {texture} {shape} on a {background} background",
    "many sizes and aspects (ResAdapter), 1200 renders": "shapesworld:shape=seen,count=1200,caption={caption},"
                                                         "sizes=24|32|40|48|56|64|24x48|48x24|32x64|64x32|32x48|48x32|40x64|64x40",
}


@dataclass(frozen=True)
class Task:
    """A tab for one kind of registered method: its title, its `studio` command and shared config."""

    title: str
    command: str
    config_cls: type
    hidden: tuple[str, ...]  # config fields the page sets itself (model, data, output folder, ...)
    data: bool = True  # the form picks a dataset (ShapesWorld or an upload); an erasure has none
    shared: type | None = None  # options every method of the kind has (EraseOptions), shown once, first
    help: str = ""  # what the tab does, shown where a dataset would be picked
    gallery: str = "validation samples (latest steps)"  # what the job's gallery shows


def _tasks() -> dict[str, Task]:
    import dataclasses

    from studio.trainers.base import TrainConfig

    from studio.cli import LOOP_OPTIONS
    from studio.erasure import EraseOptions
    from studio.quantize import QuantizeOptions

    def hidden(kind: str) -> tuple[str, ...]:  # the loop options the kind does not take, and those the page sets
        return (tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in LOOP_OPTIONS[kind])
                + ("method", "output_dir", "resume"))

    return {
        "adapter": Task("Train", "train", TrainConfig,
                        ("method", "model", "data", "output_dir", "resume", "cache_dir", "method_options")),
        "erase": Task("Erase", "erase", TrainConfig, hidden("erase"), data=False, shared=EraseOptions, help=ERASE_HELP,
                      gallery="before and after: the erased concept, then one kept"),
        "quantize": Task("Quantize", "quantize", TrainConfig, hidden("quantize"), data=False, shared=QuantizeOptions,
                         help=QUANTIZE_HELP, gallery="full precision (left) and quantized (right)"),
    }


# -- forms from config dataclasses ------------------------------------------------------

BASIC_OPTIONS = ("max_train_steps", "learning_rate", "concept", "preserve", "anchor", "bits")  # shown first; the rest fold away


@dataclass(frozen=True)
class Field:
    """One option of a config dataclass, as a form field and a CLI flag."""

    owner: str  # "common" or a method name
    name: str
    hint: typing.Any
    default: typing.Any

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def base_type(self):
        return unwrap_optional(self.hint)

    def component(self, value: typing.Any = None) -> gr.components.Component:
        """The form field, showing `value` (default: the option's default)."""
        label = self.name.replace("_", " ")
        kind = self.base_type
        if value is not None:
            return gr.Textbox(str(value), label=label) if self.default is None else gr.Number(value=value, label=label)
        if kind is bool:
            return gr.Checkbox(value=self.default, label=label)
        from studio.trainers.base import UNSET_MEANS

        if typing.get_origin(kind) is typing.Literal:  # an optional one left empty means "not given"
            info = "empty: " + UNSET_MEANS.get(self.name, "none") if self.default is None else None
            return gr.Dropdown(list(typing.get_args(kind)), value=self.default, label=label, info=info)
        if kind in (int, float) and self.default is None:  # optional: empty means "not given"
            return gr.Textbox("", label=label, placeholder="default: " + UNSET_MEANS.get(self.name, "none"))
        if kind in (int, float):  # no rounding in the browser: 1.5 steps is refused, not made 2
            return gr.Number(value=self.default, label=label)
        if typing.get_origin(kind) is list:
            return gr.Textbox(value=",".join(self.default or []), label=label + " (comma-separated)")
        return gr.Textbox(value=self.default or "", label=label)

    def argv(self, value) -> list[str]:
        """The flag for `value`, or nothing where it is the default (the command stays short)."""
        kind = self.base_type
        if value in (None, "") or (typing.get_origin(kind) is list and not str(value).strip()):
            return []
        if kind is bool:
            return [] if bool(value) == bool(self.default) else [self.flag if value else "--no-" + self.flag[2:]]
        if kind in (int, float):  # the number as typed (1.5 steps stays 1.5): `check_command` judges it
            try:
                value = _number_arg(value)
            except ValueError:
                return [self.flag, str(value)]
            return [] if float(value) == self.default else [self.flag, value]
        if typing.get_origin(kind) is list:
            value = ",".join(part.strip() for part in str(value).split(",") if part.strip())
            if value == ",".join(self.default or []):
                return []
        if value == self.default:
            return []
        return [self.flag, str(value)]


def config_fields(owner: str, config, skip: tuple[str, ...] = ()) -> list[Field]:
    """The fields of a config dataclass instance (or class), with their type hints and defaults."""
    hints = typing.get_type_hints(config if isinstance(config, type) else type(config))
    fields = []
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        if isinstance(config, type):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        else:
            default = getattr(config, f.name)
        fields.append(Field(owner, f.name, hints[f.name], default))
    return fields


# -- the app ------------------------------------------------------------------------------


def shows_errors(fn):
    """Show a `StudioError` as an error message in the page (it stays until closed), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StudioError as err:
            raise gr.Error(str(err), duration=None) from None

    return wrapper


class Studio:
    """The app's state (its data folder and job queue) and every handler the page calls."""

    def __init__(self, data_dir: str | Path, model: str = TOY_MODEL, model_config: str | None = None, workers: int = 1) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.upload_dir = self.data_dir / "tmp"  # where the web server puts uploads (GRADIO_TEMP_DIR)
        self.artifact_dir = self.data_dir / "artifacts"  # uploaded artifacts, after their checks
        self.queue = JobQueue(self.data_dir, workers=workers)
        self.sampling: dict[str | None, str] = {}  # browser session -> its sampling job (for Cancel)
        self.default_model = {"model": model, "model_config": model_config}
        self.tasks = {kind: task for kind, task in _tasks().items()
                      if any(m.kind == kind for m in registry.METHODS.values())}

    # -- Model ----------------------------------------------------------------------------

    @shows_errors
    def choose_model(self, source: str, path: str, model_config: str) -> tuple[dict, str]:
        """Check the chosen base model (a weightless UNet from its config) and make it current."""
        from studio.pipeline import check_safetensors, unet_skeleton

        path, model_config = (path or "").strip(), (model_config or "").strip() or None
        if source == "toy model":
            model, model_config = TOY_MODEL, None
        elif not path:
            raise StudioError(f"give the path of the {source}")
        else:
            model = str(Path(path).expanduser())
            if source == "single-file checkpoint":
                if not Path(model).is_file() or Path(model).suffix not in (".safetensors", ".ckpt"):
                    raise StudioError(f"{model} is not a .safetensors or .ckpt file")
                if Path(model).suffix == ".safetensors":
                    check_safetensors(Path(model))
                if model_config is None:
                    raise StudioError("a single-file checkpoint needs a model config folder offline "
                                      "(a diffusers folder of the same architecture)")
            elif not (Path(model) / "model_index.json").is_file():
                raise StudioError(f"{model} is not a diffusers folder (no model_index.json in it)")
        unet = unet_skeleton(model, model_config)
        state = {"model": model, "model_config": model_config}
        return state, self.describe_model(state, unet)

    def describe_model(self, state: dict, unet=None) -> str:
        """One Markdown line on the current model: its path and its UNet's size."""
        from studio.pipeline import unet_skeleton

        unet = unet or unet_skeleton(state["model"], state["model_config"])
        params = sum(p.numel() for p in unet.parameters())
        return (f"**Current model:** `{state['model']}`" + (f" (config `{state['model_config']}`)" if state["model_config"] else "")
                + f" — UNet {params / 1e6:.1f}M parameters, {unet.config.sample_size}x{unet.config.sample_size} latents, "
                  f"cross-attention dim {unet.config.cross_attention_dim}")

    def model_argv(self, state: dict) -> list[str]:
        """The `--model` (and `--model-config`) flags for the session's model."""
        return ["--model", state["model"]] + (["--model-config", state["model_config"]] if state["model_config"] else [])

    # -- Train (and every later kind of job built the same way) ------------------------------

    def fields(self, kind: str) -> tuple[list[Field], dict[str, list[Field]]]:
        """The shared options of a kind's command, and each of its methods' own options."""
        task = self.tasks[kind]
        shared = config_fields("common", task.shared) if task.shared else []
        skip = tuple(f.name for f in shared)
        common = shared + config_fields("common", task.config_cls, task.hidden)
        per_method = {m.name: config_fields(m.name, m.config_class, skip)
                      for m in registry.METHODS.values() if m.kind == kind}
        return common, per_method

    def recommended_rate(self, method: str, model_state: dict) -> str:
        """The method's default learning rate on the current model, as the form shows it."""
        from studio.trainers.base import recommended_learning_rate

        if registry.get(method).trainer.closed_form:  # computed in one go (RECE): no rate to give
            return ""
        return f"{recommended_learning_rate(method, model_state['model']):g}"

    def _form_argv(self, kind: str, model_state: dict, method: str, source: str, spec: str, values: tuple) -> list[str]:
        """The form as a `studio <command>` line (data: the ShapesWorld spec, or "upload" standing in for the
        uploaded folder), every option checked as the CLI checks it."""
        common, per_method = self.fields(kind)
        every = common + [f for fields in per_method.values() for f in fields]
        if len(values) != len(every):
            raise StudioError(f"the form sent {len(values)} option values, expected {len(every)}; reload the page")
        method = registry.get(method).name
        data = ["--data", "upload"]
        if not self.tasks[kind].data:
            data = []
        elif source == "ShapesWorld":
            from studio.data import parse_shapesworld_spec

            spec = (spec or "").strip()
            parse_shapesworld_spec(spec.removeprefix("shapesworld:"))  # a bad spec fails here, not in the job
            data = ["--data", spec if spec.startswith("shapesworld:") else "shapesworld:" + spec]
        option_argv = [arg for field, value in zip(every, values) if field.owner in ("common", method)
                       for arg in field.argv(value)]
        argv = [self.tasks[kind].command, "--method", method, *data, *self.model_argv(model_state), *option_argv]
        check_command(argv)
        return argv

    @shows_errors
    def start(self, kind: str, model_state: dict, method: str, source: str, spec: str, files: list | None,
              *values) -> tuple[dict, str]:
        """Queue `studio <command> --method M ...` from the form; returns the job picker and the command.
        Everything is checked before the job (and its folder) exists."""
        argv = self._form_argv(kind, model_state, method, source, spec, values)
        uploaded = self.tasks[kind].data and source != "ShapesWorld"
        if uploaded:
            checked = uploads.check_dataset(files or [], self.upload_dir)
        if kind == "quantize":  # the bits chosen (the default's when left as it is)
            bits = argv[argv.index("--bits") + 1] if "--bits" in argv else registry.get(method).config({}).bits
            title = f"{argv[2]}: {bits}"
        elif not self.tasks[kind].data:
            title = f"{argv[2]}: " + ", ".join(argv[i + 1] for i, a in enumerate(argv) if a == "--concept")
        else:
            title = f"{argv[2]} on {_short(spec) if source == 'ShapesWorld' else 'upload'}"
        job = self.queue.create(self.tasks[kind].command, title)
        if uploaded:
            uploads.copy_dataset(checked, Path(job.folder) / "data")
            argv[argv.index("--data") + 1] = str(Path(job.folder) / "data")
        self.queue.submit(job, argv + ["--output-dir", str(job.out)])
        return gr.update(choices=self.job_choices(self.tasks[kind].command), value=job.id), job.command

    @shows_errors
    def save_settings(self, kind: str, model_state: dict, method: str, source: str, spec: str, files: list | None,
                      *values) -> str:
        """The form as a TOML file (`studio train --config FILE` reads it; so does Load settings)."""
        from studio.cli import build_parser, train_config_from_args

        argv = self._form_argv(kind, model_state, method, source, spec, values)
        config = train_config_from_args(build_parser().parse_args(argv), kind)
        defaults = type(config)()
        chosen = {"method": config.method, **({"data": config.data} if config.data else {})}
        chosen |= {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                   if f.name not in ("method", "data", "model", "output_dir", "method_options")
                   and getattr(config, f.name) != getattr(defaults, f.name)}
        method_config = registry.get(config.method).config(config.method_options)
        chosen |= {name: getattr(method_config, name) for name in config.method_options}
        folder = self.data_dir / "settings"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}.toml"
        path.write_text("".join(f"{key} = {_toml_value(value)}\n" for key, value in chosen.items()))
        return str(path)

    def form_from_argv(self, kind: str, argv: list[str]) -> list:
        """Form updates (method, dataset source, spec, then every option field) for a `studio <command>` line."""
        from studio.cli import (
            build_parser,
            join_negative_values,
            train_config_from_args,
        )

        config = train_config_from_args(build_parser().parse_args(join_negative_values(argv)), kind)
        method_config = registry.get(config.method).config(config.method_options)
        common, per_method = self.fields(kind)
        shapes = config.data.startswith("shapesworld:")
        updates = [config.method, "ShapesWorld" if shapes else "upload", config.data if shapes else gr.update()]
        shared = {f.name for f in dataclasses.fields(self.tasks[kind].shared)} if self.tasks[kind].shared else set()
        updates += [_form_value(getattr(method_config if f.name in shared else config, f.name)) for f in common]
        updates += [_form_value(getattr(method_config, f.name)) if name == config.method else gr.update()
                    for name, fields in per_method.items() for f in fields]
        return updates

    @shows_errors
    def load_job_settings(self, kind: str, job_id: str | None) -> list:
        """The picked job's settings back in the form, to repeat or change the run."""
        if not job_id:
            raise StudioError("pick a job first")
        argv = [a for a in self.queue.get(job_id).argv]
        for flag in ("--output-dir", "--resume"):  # the new run gets its own folder and starts fresh
            if flag in argv:
                del argv[argv.index(flag):argv.index(flag) + 2]
        return self.form_from_argv(kind, argv)

    @shows_errors
    def load_settings_file(self, kind: str, file: str | None) -> list:
        """A TOML settings file (as `studio train --config` reads it) into the form."""
        if not file:
            raise StudioError("no file uploaded")
        path = uploads.inside(self.upload_dir, file)
        try:
            return self.form_from_argv(kind, [self.tasks[kind].command, "--config", str(path)])
        except StudioError as err:
            raise StudioError(str(err).replace(str(path), Path(file).name)) from None

    @shows_errors
    def stop(self, job_id: str | None) -> str:
        """Stop the picked job (a training run checkpoints first)."""
        if not job_id:
            raise StudioError("pick a job first")
        return self.status_line(self.queue.stop(job_id).id)

    @shows_errors
    def resume(self, job_id: str | None) -> str:
        """Queue a stopped or failed training job again, from its latest checkpoint if it has one."""
        if not job_id:
            raise StudioError("pick a job first")
        job = self.queue.get(job_id)
        if job.kind not in ("train", "erase", "quantize"):
            raise StudioError(f"job {job_id} is a {job.kind} job; only training, erasing and quantizing jobs resume")
        extra = ["--resume", "latest"] if (job.out / "checkpoints").is_dir() else []
        return self.status_line(self.queue.resume(job_id, extra).id)

    def job_choices(self, kind: str | None = None) -> list[tuple[str, str]]:
        """(label, id) of every job, or of one kind's, newest first, for a job picker."""
        return [(f"{j.id} · {j.title} · {j.status}", j.id) for j in self.queue.list() if kind in (None, j.kind)]

    def status_line(self, job_id: str) -> str:
        """**status** — title: message."""
        job = self.queue.get(job_id)
        return f"**{job.status}** — {job.title}" + (f": {job.message}" if job.message else "")

    def watch(self, job_id: str | None):
        """Progress, loss curve, validation images, artifact and log of a training job (polled)."""
        import pandas as pd

        empty = pd.DataFrame({"step": [], "loss": []})
        if not job_id or job_id not in {j.id for j in self.queue.list()}:
            return "", "", empty, [], None, "", ""
        job = self.queue.get(job_id)
        rows = {}
        metrics = job.out / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written
                rows[row["step"]] = row  # a resumed run rewrites the steps after its checkpoint
        if rows:
            last = rows[max(rows)]
            done = last["step"] / last["total"]
            progress = (f"<progress value='{last['step']}' max='{last['total']}' style='width:100%'></progress>"
                        f"<div>step {last['step']} / {last['total']} ({done:.0%}) · loss {last['loss']:.4f}</div>")
        elif job.status in FINISHED:
            progress = ""
        else:
            progress = "<progress style='width:100%'></progress><div>starting (loading the model, caching the data)</div>"
        frame = pd.DataFrame({"step": sorted(rows), "loss": [rows[s]["loss"] for s in sorted(rows)]}) if rows else empty
        gallery = []
        for folder in sorted((job.out / "validation").glob("step-*"), key=lambda p: int(p.name[5:]))[-2:]:
            gallery += [(str(p), folder.name) for p in sorted(folder.glob("*.png"))]
        for name, caption in RESULT_SHEETS.items():  # an erasure's before/after, a quantization's comparison
            if (job.out / name).is_file():
                gallery = [(str(job.out / name), caption + _artifact_size(job.out))]
        artifacts = job_artifacts(job.out)
        artifact = str(downloadable(artifacts[0])) if job.status == DONE and artifacts else None
        return self.status_line(job_id), progress, frame, gallery, artifact, self.queue.log_tail(job_id, 8), job.command

    # -- Compose & Sample ---------------------------------------------------------------

    def artifact_choices(self) -> list[tuple[str, str]]:
        """Artifacts of finished jobs and uploaded ones, newest first."""
        paths = [p for job in self.queue.list() if job.status == DONE for p in job_artifacts(job.out)]
        paths += sorted(self.artifact_dir.rglob("*.safetensors"))
        return [(self.artifact_label(p), str(p)) for p in paths]

    def artifact_label(self, path: Path) -> str:
        """What tells one artifact from another: job, method, data, steps and when it finished; an upload's
        name. Never just `lora.safetensors`.

        Example (a finished job's): `a1b2c3 · lora · star, 8 renders · 500 steps · Nov 25 14:02`
        """
        from studio.artifact import read_header

        path = Path(path)
        try:
            method = read_header(path).method
        except StudioError:
            method = "?"
        if not path.is_relative_to(self.data_dir / "jobs"):
            return f"uploaded · {method} · {path.name}"
        job_id = path.relative_to(self.data_dir / "jobs").parts[0]
        parts = [job_id, method]
        summary_file = self.data_dir / "jobs" / job_id / "out" / "summary.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            options = summary["config"]["method_options"]
            kind = registry.METHODS[method].kind if method in registry.METHODS else None
            if kind == "erase":
                what = f"erases {', '.join(options.get('concept') or [])}"
            elif kind == "quantize":
                what = options.get("bits") or registry.get(method).config({}).bits
            else:
                what = _data_label(summary["config"]["data"])
            parts += [what] + ([f"{summary['steps']} steps"] if summary["steps"] else [])
        ended = self.queue.get(job_id).ended
        if ended:
            parts.append(time.strftime("%b %d %H:%M", time.localtime(ended)))
        return " · ".join(parts)

    @shows_errors
    def add_artifact(self, model_state: dict, stack: list[dict], layout: int, path: str | None) -> tuple[list, int, str]:
        """Put a finished job's (or uploaded) artifact on the stack, after checking it fits the model."""
        if not path:
            raise StudioError("pick an artifact from the list (or upload one) first")
        resolved = uploads.inside(self.data_dir, path)
        uploads.check_artifact(resolved, model_state["model"], model_state["model_config"])
        return self._stack(stack, layout, resolved)

    def _stack(self, stack: list[dict], layout: int, path: Path) -> tuple[list, int, str]:
        """The stack with a checked artifact added on top (on, at scale 1), the redraw counter, a message."""
        item = {"path": str(path), "name": self.artifact_label(path), "scale": 1.0, "enabled": True}
        return stack + [item], layout + 1, f"added {item['name']}"

    @shows_errors
    def upload_artifact(self, model_state: dict, stack: list[dict], layout: int, file: str | None):
        """Check an uploaded artifact against the model, store it under `artifacts/`, put it on the stack."""
        if not file:
            raise StudioError("no file uploaded")
        upload = uploads.inside(self.upload_dir, file)
        digest = hashlib.sha256(upload.read_bytes()).hexdigest()[:8]  # two uploads named alike don't collide
        target, _ = uploads.import_artifact(upload, self.upload_dir, self.artifact_dir / digest,
                                                 model_state["model"], model_state["model_config"])
        stack, layout, message = self._stack(stack, layout, target)
        return stack, layout, message, gr.update(choices=self.artifact_choices())

    def prompt_note(self, model_state: dict, stack: list[dict], prompts: str, negative: str) -> str:
        """On the toy model, which prompt words it ignores (the stack's trigger words excepted); else nothing."""
        from studio.artifact import read_header
        from studio.toy.vocabulary import prompt_warnings

        if model_state["model"] != TOY_MODEL:
            return ""
        allowed = []
        for item in stack:
            try:
                allowed += read_header(uploads.inside(self.data_dir, item["path"])).trigger_words
            except StudioError:
                continue  # a stack entry that went away: sampling names it
        lines = [line for prompt in (prompts or "").splitlines() + [negative or ""]
                 for line in prompt_warnings([prompt.strip()], allowed)]
        return "\n".join(f"⚠ {line}  " for line in lines)

    @shows_errors
    def sample(self, model_state: dict, stack: list[dict], prompts: str, negative: str, seeds: str, steps: float,
               guidance: float, scheduler: str, width: float | None, height: float | None, image_prompt: str | None = None,
               control: str | None = None, control_kind: str | None = None, request: gr.Request = None, progress: gr.Progress = gr.Progress()) -> tuple[list, str, str, dict]:
        """Queue `studio sample ...` with the enabled artifacts at their scales (and the image prompt, for an
        IP-Adapter; the control image and its kind, for a T2I-Adapter), wait, return the images (each captioned with its prompt and seed), the command, a note and
        a zip of them all."""
        prompt_list = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
        seed_list = [s for s in re.split(r"[\s,]+", (seeds or "0").strip()) if s]  # checked with the rest below
        scheduler = None if scheduler in (None, "", "model default") else scheduler
        if not prompt_list and image_prompt:
            prompt_list = [""]  # the image alone
        if not prompt_list:
            raise StudioError("no prompt given: write at least one prompt (one per line), or give an image prompt")
        adapter_argv = [arg for item in stack if item["enabled"]
                        for arg in ("--adapter", f"{uploads.inside(self.data_dir, item['path'])}:{item['scale']:g}")]
        argv = ["sample", *prompt_list, "--seed", *map(str, seed_list or [0]), "--steps", _number_arg(steps),
                "--guidance-scale", _number_arg(guidance)]
        argv += ["--negative-prompt", negative] if negative else []
        argv += ["--scheduler", scheduler] if scheduler else []
        argv += [arg for key, value in (("width", width), ("height", height)) if value for arg in (f"--{key}", _number_arg(value))]
        argv += [*adapter_argv, *self.model_argv(model_state)]
        if image_prompt:
            argv += ["--image-prompt", str(self.keep_image(image_prompt, "the image prompt", "image-prompts"))]
        if control:
            kept = self.keep_image(control, "the control image", "control-images")
            kind = (control_kind or "").strip()
            argv += ["--control", f"{kept}:{kind}" if kind else str(kept)]
        check_command(argv)  # as the CLI checks it, before the job exists
        count = len(prompt_list) * len(seed_list or [0])
        title = _short(prompt_list[0]) or "image prompt"  # an empty text prompt: the image alone
        job = self.queue.create("sample", f"{title} · {count} image{'s' * (count != 1)}")
        self.sampling[getattr(request, "session_hash", None)] = job.id  # what this browser's Cancel stops
        self.queue.submit(job, argv + ["--output-dir", str(job.out)])
        while self.queue.get(job.id).status not in FINISHED:
            bar, ahead = self.queue.progress(job.id), self.queue.ahead_of(job.id)
            if ahead:
                progress(None, desc=f"queued behind {ahead} job{'s' * (ahead != 1)}")
            elif bar and bar[0] == "sampling":
                progress((bar[1], bar[2]), desc="sampling", unit="images")
            else:
                progress(None, desc="loading the model")
            time.sleep(0.5)
        job = self.queue.get(job.id)
        if job.status == STOPPED:
            return [], job.command, f"stopped · job {job.id}", gr.update(visible=False)
        if job.status != DONE:
            raise StudioError(f"sampling {job.status}: {job.message or 'see its log in the Jobs tab'}")
        record = json.loads((job.out / "settings.json").read_text())
        images = [(str(job.out / item["file"]), f"{item['prompt']} · seed {item['seed']}") for item in record["images"]]
        archive = job.out / "images.zip"
        with zipfile.ZipFile(archive, "w") as bundle:
            for name in [item["file"] for item in record["images"]] + ["grid.png", "settings.json"]:
                bundle.write(job.out / name, name)
        note = self.prompt_note(model_state, stack, prompts, negative)
        # What the job warned about its inputs (a control image fitted in with its aspect kept), said here too.
        fitted = sorted({line.split("UserWarning: ", 1)[1].strip() for line in self.queue.log_tail(job.id, 200).splitlines()
                         if "UserWarning: " in line and "aspect kept" in line})
        note = "\n\n".join([f"⚠ {line}" for line in fitted] + ([note] if note else []))
        info = f"{len(images)} images · job {job.id}" + (f"\n\n{note}" if note else "")
        return images, job.command, info, gr.update(value=str(archive), visible=True)

    def keep_image(self, file: str, what: str, folder: str) -> Path:
        """Check an uploaded image (an image prompt, a control image; `what` names it in errors) and keep it under
        `folder` in the data folder (the job's command names it there)."""
        from studio.data import check_image

        upload = uploads.inside(self.upload_dir, file)
        check_image(upload, what)
        digest = hashlib.sha256(upload.read_bytes()).hexdigest()[:8]
        target = self.data_dir / folder / f"{digest}-{uploads.safe_name(upload.name)}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(upload, target)
        return target

    @shows_errors
    def cancel_sample(self, request: gr.Request = None) -> str:
        """Stop this browser's running (or queued) sampling job."""
        job_id = self.sampling.pop(getattr(request, "session_hash", None), None)
        if job_id is None or self.queue.get(job_id).status in FINISHED:
            return "nothing is sampling"
        self.queue.stop(job_id)
        return f"stopping job {job_id}"

    # -- a browser's session, across reloads ----------------------------------------------

    def remember(self, saved: dict, job_id: str | None, stack: list[dict], request: gr.Request = None) -> dict:
        """What a reload brings back (the picked job, the stack), under this user's name."""
        user = getattr(request, "username", None)
        return {"user": user, "job": job_id if job_id else (saved or {}).get("job"), "stack": stack}

    def restore(self, saved: dict, request: gr.Request = None) -> list:
        """The saved job (in every picker) and stack, if they are this user's and still exist; else nothing."""
        n_pickers = len(self.tasks) + 1
        user = getattr(request, "username", None)
        if not saved or saved.get("user") != user:
            return [gr.update()] * n_pickers + [[], 0]
        jobs = {j.id: j for j in self.queue.list()}
        job = jobs.get(saved.get("job"))
        kinds = [task.command for task in self.tasks.values()] + [None]  # the pickers: one per task tab, then Jobs
        pickers = [gr.update(value=job.id) if job and kind in (None, job.kind) else gr.update() for kind in kinds]
        stack = []
        for item in saved.get("stack") or []:
            try:
                path = uploads.inside(self.data_dir, item["path"])
            except (StudioError, KeyError, TypeError):
                continue
            if path.is_file():
                stack.append({**item, "path": str(path)})
        return pickers + [stack, 1]

    # -- Jobs ----------------------------------------------------------------------------

    @shows_errors
    def delete_job(self, job_id: str | None) -> tuple[dict, str]:
        """Delete the picked job and its folder (the page asks to confirm first)."""
        if not job_id:
            raise StudioError("pick a job first")
        self.queue.delete(job_id)
        return gr.update(choices=self.job_choices(), value=None), f"deleted job {job_id} and its folder"

    def job_table(self) -> list[list]:
        """The Jobs tab's table: id, kind, title, status, run time, message."""
        rows = []
        for job in self.queue.list():
            took = ((job.ended or time.time()) - job.started) if job.started else None
            rows.append([job.id, job.kind, job.title, job.status, f"{took:.0f} s" if took is not None else "",
                         job.message[:120]])
        return rows

    def job_details(self, job_id: str | None) -> tuple[str, str, list[str], list, str]:
        """Status, command, output files (not the cache, checkpoints or tensorboard logs), validation images
        grouped by step (each captioned with it) and log of a job."""
        job = None
        if job_id:
            try:
                job = self.queue.get(job_id)
            except StudioError:  # deleted since the page picked it (a refresh can race the Delete button)
                job = None
        if job is None:  # the status line keeps its last message ("deleted job ..."); the rest empties
            return gr.update(), "", [], [], ""
        skip = {"cache", "checkpoints", "logs", "validation"}  # internal: embeddings, resume state, tensorboard
        outputs = [str(p) for p in sorted(job.out.rglob("*"), key=_natural_key)
                   if p.is_file() and not skip.intersection(p.relative_to(job.out).parts)]
        validation = [(str(p), f"step {folder.name[5:]}")
                      for folder in sorted((job.out / "validation").glob("step-*"), key=_natural_key)
                      for p in sorted(folder.glob("*.png"), key=_natural_key)]
        return self.status_line(job_id), job.command, outputs[:200], validation[-64:], self.queue.log_tail(job_id, 60)


START_HERE = """### Start here
The page starts on **ShapesWorld**, a toy text-to-image model shipped inside the studio (26 MB; it runs on
a laptop CPU in seconds). It draws one shape on a 32×32 image from a short description: a shape (circle,
square, triangle, cross, diamond), a colour, a texture (plain, striped, dotted, checkered), a size, a
position and a background; every other word is ignored (the full list is below). Two shapes, **star** and
**heart**, were kept out of its training on purpose: the model cannot draw them until you teach it one.

Prompts that work: *a red striped circle* · *a small blue dotted square in the top left* ·
*a green checkered triangle on a black background*.

**sks** is a made-up word: the datasets on the Train tab caption their star (or heart) images *a red sks*,
*a blue sks*, so an adapter trained on them ties the new shape to that word.

What to do first: **1.** Compose & Sample: sample *a red striped circle* to see the model. **2.** Train: keep
the star preset and press Start (LoRA, 500 steps: a few minutes on a laptop CPU; validation images of *a red
sks* fill in every 125 steps). **3.** Compose & Sample: add the finished artifact to the stack and sample
*a blue sks*: roughly half the images are stars. For more, train longer or add `conv1,conv2` to the
target modules (advanced options): the convolutions draw shapes (`studio bench personalize` measures such recipes).
To work on a real model, choose it below (a diffusers folder or a single-file checkpoint on this machine).
"""


def _vocabulary_text() -> str:
    from studio.toy.vocabulary import describe

    return ("Any other word is ignored (you are told which), and so are word order, commas and capitals: "
            "*a photo of a red circle, high quality* draws a red circle. Trigger words of the artifacts on the "
            "stack (like *sks*) are fine.\n\n" + describe())


def _number_arg(value) -> str:
    """A form number as a CLI value: 20.0 -> "20" (a whole number stays whole; 1.5 stays 1.5, to be refused).

    Example:
        >>> _number_arg(20.0), _number_arg(2.5)
        ('20', '2.5')
    """
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _toml_value(value) -> str:
    """A config value as TOML: true/false, a number, a quoted string, a list of strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(str(v)) for v in value) + "]"
    return json.dumps(str(value))


def _form_value(value):
    """A config value as its form field shows it (lists comma-separated, "not given" as empty)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value


def _natural_key(path: Path) -> list:
    """Sort key that orders numbers by value: validation/step-125 before validation/step-1000."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _data_label(data: str) -> str:
    """A training set in a few words: its preset's name, a ShapesWorld shape and count, or an upload.

    Example:
        >>> _data_label("shapesworld:shape=star,count=8,caption=a {color} sks")
        'star, 8 renders'
    """
    for name, spec in SHAPESWORLD_PRESETS.items():
        if data == spec:
            return name.split(", '")[0]
    if data.startswith("shapesworld:"):
        options = dict(part.partition("=")[::2] for part in data.removeprefix("shapesworld:").split(","))
        return f"{options.get('shape', 'shapes')}, {options.get('count', '?')} renders"
    return "uploaded images"


def _short(text: str, length: int = 40) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def build_app(data_dir: str | Path, model: str = TOY_MODEL, model_config: str | None = None, workers: int = 1) -> gr.Blocks:
    """The page. `data_dir` holds every job, upload and artifact; nothing is written elsewhere.

    Example:
        >>> build_app("outputs/studio", workers=2).launch(server_port=7860)  # doctest: +SKIP
    """
    studio = Studio(data_dir, model=model, model_config=model_config, workers=workers)
    initial_model = studio.default_model
    with gr.Blocks(title="Diffusion Studio") as app:
        gr.Markdown("# Diffusion Studio")
        model_state = gr.State(initial_model)
        # Polling for live progress. Kept outside the tabs: a Timer inside a Tab makes Gradio 6.31
        # draw the clicked tab's title twice in the tab bar.
        timer = gr.Timer(1.0)
        with gr.Tabs():
            with gr.Tab("Start here", id="model"):
                gr.Markdown(START_HERE, elem_id="start-here")
                with gr.Accordion("Words the toy model knows", open=False):
                    gr.Markdown(_vocabulary_text())
                gr.Markdown("### Base model")
                model_info = gr.Markdown(studio.describe_model(initial_model))
                source = gr.Radio(["toy model", "diffusers folder", "single-file checkpoint"], value="toy model",
                                  label="base model")
                model_path = gr.Textbox(label="path (diffusers folder or .safetensors/.ckpt file on this machine)")
                model_config = gr.Textbox(label="model config folder (single-file checkpoints: a diffusers folder of the same architecture)")
                use_model = gr.Button("Use this model", variant="primary")
                use_model.click(studio.choose_model, [source, model_path, model_config], [model_state, model_info],
                                api_name="choose_model")

            job_pickers = [_task_tab(studio, kind, task, model_state, timer) for kind, task in studio.tasks.items()]

            with gr.Tab("Compose & Sample", id="sample") as sample_tab:
                stack, layout = _sample_tab(studio, model_state, sample_tab)

            with gr.Tab("Jobs", id="jobs"):
                job_pickers.append(_jobs_tab(studio, timer))

        # After a reload, the last picked job and the Compose stack come back: kept in this browser's storage,
        # under the signed-in user's name with --auth (another user in the same browser starts empty).
        saved = gr.BrowserState({}, storage_key="diffusion-studio")
        app.load(studio.restore, saved, [*job_pickers, stack, layout], api_visibility="private", show_progress="hidden")
        for picker in job_pickers:
            picker.change(studio.remember, [saved, picker, stack], saved, api_visibility="private")
        stack.change(studio.remember, [saved, job_pickers[-1], stack], saved, api_visibility="private")
    return app


def _artifact_size(out: Path) -> str:
    """ " · file 1.9 MB" for a job folder's quantized UNet file, else "" (a size says what quantizing saved)."""
    from studio.artifact import read_header

    for path in job_artifacts(out):
        try:
            if registry.get(read_header(path).method).kind == "quantize":
                return f" · file {path.stat().st_size / 1e6:.2f} MB"
        except StudioError:
            continue
    return ""


def job_artifacts(out: Path) -> list[Path]:
    """A finished training's artifact files: `<out>/<method>.safetensors`, or a folder's weights
    (`<out>/<method>/diffusion_pytorch_model.safetensors`: T2I-Adapter, ResAdapter)."""
    from studio.artifact import FOLDER_WEIGHTS_NAME

    return sorted(out.glob("*.safetensors")) + sorted(out.glob(f"*/{FOLDER_WEIGHTS_NAME}"))


def downloadable(artifact: Path) -> Path:
    """What the Train tab offers to download: the artifact file, or for a folder's weights the whole folder as a
    zip beside it (its other files belong to it: a T2I-Adapter's config.json, a ResAdapter's LoRA)."""
    from studio.artifact import FOLDER_WEIGHTS_NAME

    if artifact.name != FOLDER_WEIGHTS_NAME:
        return artifact
    folder = artifact.parent
    archive = folder.with_suffix(".zip")
    if not archive.is_file():
        partial = folder.with_suffix(".zip.partial")
        with zipfile.ZipFile(partial, "w") as bundle:
            for file in sorted(folder.iterdir()):
                bundle.write(file, f"{folder.name}/{file.name}")
        partial.replace(archive)
    return archive


def _task_tab(studio: Studio, kind: str, task: Task, model_state: gr.State, timer: gr.Timer) -> gr.Dropdown:
    common, per_method = studio.fields(kind)
    methods = list(per_method)
    with gr.Tab(task.title, id=task.command) as tab:
        with gr.Row():
            with gr.Column(scale=1):
                method = gr.Dropdown(methods, value=methods[0], label="method")
                summary = gr.Markdown(registry.get(methods[0]).summary)
                if task.data:
                    source = gr.Radio(["ShapesWorld", "upload"], value="ShapesWorld", label="dataset")
                    first_preset = next(iter(SHAPESWORLD_PRESETS))
                    preset = gr.Dropdown(list(SHAPESWORLD_PRESETS), value=first_preset, label="ShapesWorld preset")
                    spec = gr.Textbox(SHAPESWORLD_PRESETS[first_preset], label="ShapesWorld spec")
                    files = gr.File(file_count="multiple", visible=False,
                                    label=UPLOAD_LABEL,
                                    elem_id=f"{task.command}-upload")
                else:  # learns from the model itself: no dataset fields (the handlers' places kept empty)
                    source, spec, files = gr.State("none"), gr.State(""), gr.State(None)
                    gr.Markdown(task.help)
                by_name = {}
                with gr.Row():
                    for f in common:
                        if f.name in BASIC_OPTIONS:  # the method's own rate, on the current model
                            rate = studio.recommended_rate(methods[0], studio.default_model) if f.name == "learning_rate" else None
                            by_name[f.name] = f.component(rate)
            with gr.Column(scale=1), gr.Accordion("advanced options", open=False):
                for row in range(0, len(common), 3):
                    with gr.Row():
                        for f in common[row:row + 3]:
                            if f.name not in BASIC_OPTIONS:
                                by_name[f.name] = f.component()
                groups, inputs = [], []
                for name, fields in per_method.items():
                    with gr.Group(visible=name == methods[0]) as group:
                        gr.Markdown(f"**{name} options**")
                        inputs_here = [f.component() for f in fields]
                    groups.append(group)
                    inputs.extend(inputs_here)
                common_inputs = [by_name[f.name] for f in common]
        with gr.Row():
            start = gr.Button("Start", variant="primary")
            stop = gr.Button("Stop")
            resume = gr.Button("Resume")
        with gr.Row():
            load_job = gr.Button("Load the picked job's settings", size="sm")
            save = gr.Button("Save settings as TOML", size="sm")
            load_file = gr.UploadButton("Load settings from TOML", file_types=[".toml"], size="sm")
        saved_file = gr.File(label=f"settings file (studio {task.command} --config FILE reads it)", visible=False,
                             interactive=False)
        command = gr.Code(label="the same run from the command line", language="shell", interactive=False)
        job = gr.Dropdown(studio.job_choices(task.command), label="job", value=None, allow_custom_value=True)
        status = gr.Markdown()
        progress = gr.HTML()
        with gr.Row():
            loss = gr.LinePlot(x="step", y="loss", title="loss", height=250)
            gallery = gr.Gallery(label=task.gallery, columns=4, height=250)
        artifact = gr.File(label="artifact", interactive=False)
        log = gr.Textbox(label="log", lines=8, max_lines=8, autoscroll=True)

    method.change(lambda m: [registry.get(m).summary] + [gr.update(visible=n == m) for n in methods],
                  method, [summary, *groups], api_visibility="private")
    if "learning_rate" in by_name:  # a method (or model) change brings that method's rate
        for event in (method.change, model_state.change):
            event(studio.recommended_rate, [method, model_state], by_name["learning_rate"], api_visibility="private")
    if task.data:
        source.change(lambda s: [gr.update(visible=s == "ShapesWorld")] * 2 + [gr.update(visible=s == "upload")],
                      source, [preset, spec, files], api_visibility="private")
        preset.change(lambda p: SHAPESWORLD_PRESETS[p], preset, spec, api_visibility="private")
    start.click(functools.partial(studio.start, kind), [model_state, method, source, spec, files, *common_inputs, *inputs],
                [job, command], api_name=f"start_{task.command}", show_progress="minimal")
    form = [method, source, spec, *common_inputs, *inputs]  # (an erasure's source and spec: empty states)
    # A refused Start marks its outputs with an error badge; editing the form (the cause) clears it.
    gr.on([field.change for field in form if not isinstance(field, gr.State)], lambda: gr.update(), None, command,
          show_progress="hidden", api_visibility="private")
    load_job.click(functools.partial(studio.load_job_settings, kind), job, form, api_name=f"load_job_settings_{task.command}")
    load_file.upload(functools.partial(studio.load_settings_file, kind), load_file, form,
                     api_name=f"load_settings_{task.command}")
    save.click(functools.partial(studio.save_settings, kind), [model_state, method, source, spec, files, *common_inputs, *inputs],
               saved_file, api_name=f"save_settings_{task.command}").then(
        lambda: gr.update(visible=True), None, saved_file, api_visibility="private")
    stop.click(studio.stop, job, status, api_name=f"stop_{task.command}")
    resume.click(studio.resume, job, status, api_name=f"resume_{task.command}")
    watched = [status, progress, loss, gallery, artifact, log, command]
    job.change(studio.watch, job, watched, api_name=f"watch_{task.command}")
    tab.select(lambda job_id: gr.update(choices=studio.job_choices(task.command), value=job_id), job, job,
               api_visibility="private")  # jobs started from other pages too
    timer.tick(studio.watch, job, watched, show_progress="hidden", api_visibility="private")
    # The picker's labels carry each job's status: they follow it (queued -> running -> done).
    timer.tick(lambda: gr.update(choices=studio.job_choices(task.command)), None, job, show_progress="hidden",
               api_visibility="private")
    return job


def _sample_tab(studio: Studio, model_state: gr.State, tab: gr.Tab) -> tuple[gr.State, gr.State]:
    stack = gr.State([])  # [{"path", "name", "scale", "enabled"}]
    layout = gr.State(0)  # bumped when artifacts are added or removed: redraws the sliders
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("**Artifacts** — applied in order, each at its scale")
            with gr.Row():
                choice = gr.Dropdown(studio.artifact_choices(), label="from finished jobs", allow_custom_value=True, scale=3)
                refresh = gr.Button("↻", scale=0, min_width=40)
            add = gr.Button("Add to the stack")
            upload = gr.File(label="or upload a .safetensors artifact", file_types=[".safetensors"])
            added = gr.Markdown()

            @gr.render(inputs=stack, triggers=[layout.change])
            def draw(items: list[dict]) -> None:
                if not items:
                    gr.Markdown("_no artifacts: samples come from the base model_")
                for i, item in enumerate(items):
                    with gr.Row(key=f"row-{i}-{item['path']}"):
                        enabled = gr.Checkbox(item["enabled"], label=item["name"], interactive=True, key=f"on-{i}-{item['path']}", scale=2)
                        scale = gr.Slider(*SCALES, value=item["scale"], step=0.05, label="scale", interactive=True, key=f"scale-{i}-{item['path']}", scale=3)
                        remove = gr.Button("✕", key=f"rm-{i}-{item['path']}", scale=0, min_width=40)

                    def set_value(value, items, i=i, key="enabled"):
                        items = [dict(x) for x in items]
                        items[i][key] = value
                        return items

                    enabled.change(set_value, [enabled, stack], stack, api_visibility="private")
                    scale.change(functools.partial(set_value, i=i, key="scale"), [scale, stack], stack, api_visibility="private")
                    remove.click(lambda items, n, i=i: (items[:i] + items[i + 1:], n + 1), [stack, layout], [stack, layout],
                                 api_visibility="private")

        with gr.Column(scale=2):
            prompts = gr.Textbox("a red sks\na blue striped circle", lines=3, label="prompts (one per line; Shift+Enter samples)")
            negative = gr.Textbox(label="negative prompt")
            with gr.Accordion("Image prompt (for an IP-Adapter in the stack)", open=False):
                image_prompt = gr.Image(type="filepath", label="image prompt", height=160, sources=["upload"])
            with gr.Accordion("Control image (for a T2I-Adapter in the stack)", open=False):
                with gr.Row():
                    # image_mode=None keeps the file's channels: a mask stays one channel, and a bad one is refused
                    control = gr.Image(type="filepath", label="control image (a mask or edge map, white on black)",
                                       height=160, sources=["upload"], image_mode=None)
                    control_kind = gr.Textbox(label="its kind (mask, edge, ...; blank: the only T2I-Adapter)")
            prompt_note = gr.Markdown()
            with gr.Accordion("Words the toy model knows", open=False,
                              visible=studio.default_model["model"] == TOY_MODEL) as vocabulary:
                gr.Markdown(_vocabulary_text())
            with gr.Row():
                seeds = gr.Textbox("0 1", label="seeds")
                steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="guidance scale")
            with gr.Row():
                scheduler = gr.Dropdown(["model default", *SCHEDULERS], value="model default", label="scheduler")
                width = gr.Number(0, label="width (multiple of 8; 0: the model's size)", precision=0)
                height = gr.Number(0, label="height (0: the model's size)", precision=0)
            with gr.Row():
                go = gr.Button("Sample", variant="primary", scale=3)
                cancel = gr.Button("Cancel", scale=1)
            gallery = gr.Gallery(label="samples", columns=4, height=320)
            info = gr.Markdown()
            download = gr.DownloadButton("Download all (zip)", visible=False)
            command = gr.Code(label="the same samples from the command line", language="shell", interactive=False)

    for event in (refresh.click, tab.select):  # artifacts of jobs that finished since the page loaded
        event(lambda: gr.update(choices=studio.artifact_choices()), None, choice, api_visibility="private")
    add.click(studio.add_artifact, [model_state, stack, layout, choice], [stack, layout, added], api_name="add_artifact")
    upload.upload(studio.upload_artifact, [model_state, stack, layout, upload], [stack, layout, added, choice],
                  api_name="upload_artifact")
    sample_inputs = [model_state, stack, prompts, negative, seeds, steps, guidance, scheduler, width, height, image_prompt,
                     control, control_kind]
    go.click(studio.sample, sample_inputs, [gallery, command, info, download], api_name="sample")
    for box in (prompts, negative, seeds):  # Enter samples (Shift+Enter in the many-line prompts box)
        box.submit(studio.sample, sample_inputs, [gallery, command, info, download], api_visibility="private")
    cancel.click(studio.cancel_sample, None, info, api_name="cancel_sample")
    for event in (prompts.change, negative.change, layout.change, model_state.change):
        event(studio.prompt_note, [model_state, stack, prompts, negative], prompt_note,
              api_visibility="private", show_progress="hidden")
    model_state.change(lambda state: gr.update(visible=state["model"] == TOY_MODEL), model_state, vocabulary,
                       api_visibility="private")
    return stack, layout


def _jobs_tab(studio: Studio, timer: gr.Timer) -> gr.Dropdown:
    table = gr.Dataframe(studio.job_table(), headers=["job", "kind", "title", "status", "time", "message"],
                         interactive=False, wrap=True)
    with gr.Row():
        job = gr.Dropdown(studio.job_choices(), label="job", value=None, allow_custom_value=True, scale=3)
        stop = gr.Button("Stop", scale=0)
        resume = gr.Button("Resume", scale=0)
        delete = gr.Button("Delete", scale=0, variant="stop")
    with gr.Row(visible=False) as confirm_row:
        confirm_text = gr.Markdown()
        confirm = gr.Button("Yes, delete it", variant="stop", scale=0)
        keep = gr.Button("Keep it", scale=0)
    status = gr.Markdown()
    command = gr.Code(label="command", language="shell", interactive=False)
    outputs = gr.File(label="outputs", file_count="multiple", interactive=False)
    validation = gr.Gallery(label="validation samples, by step", columns=8, height=200)
    log = gr.Textbox(label="log", lines=12, max_lines=12, autoscroll=True)

    def refresh(job_id):
        return (gr.update(value=studio.job_table()), gr.update(choices=studio.job_choices()),  # value kept: a reload restores it
                *studio.job_details(job_id))

    timer.tick(refresh, job, [table, job, status, command, outputs, validation, log], show_progress="hidden",
               api_visibility="private")
    job.change(studio.job_details, job, [status, command, outputs, validation, log], api_name="job_details")
    stop.click(studio.stop, job, status, api_name="stop")
    resume.click(studio.resume, job, status, api_name="resume")
    delete.click(lambda job_id: (gr.update(visible=bool(job_id)),
                                 f"Delete job **{job_id}** and its folder (outputs, artifact, log)?" if job_id else ""),
                 job, [confirm_row, confirm_text], api_visibility="private")
    confirm.click(studio.delete_job, job, [job, status], api_name="delete_job").then(
        lambda: gr.update(visible=False), None, confirm_row, api_visibility="private")
    keep.click(lambda: gr.update(visible=False), None, confirm_row, api_visibility="private")

    def pick_row(event: gr.SelectData) -> str:  # a click anywhere in a row picks that row's job
        return event.row_value[0]

    table.select(pick_row, None, job, api_visibility="private")
    return job
