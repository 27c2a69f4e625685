"""Every out-of-range option in docs/errors.md's table, through the CLI, a TOML file and the page's handlers:
one line naming the option, exit status 2, no job folder, no artifact. The table is the docs' own, so the
reference and the behaviour cannot drift apart. Also: every boolean option as a switch and in TOML."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import gradio as gr
import pytest

from studio import registry
from studio.cli import build_parser, main, train_config_from_args
from studio.errors import StudioError

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(r"\| `studio ([^`]+)` \| `(--[a-z-]+)` \| `([^`]*)` \| (yes|—) \| `error: (.+)` \|")
ROWS = [m.groups() for m in map(ROW.fullmatch, DOC.read_text().splitlines()) if m]
DATA = "shapesworld:shape=star,count=2"


def test_the_table_covers_every_ranged_option():
    from studio.trainers.base import TrainConfig

    from studio.options import RANGE_KEY, flag
    from studio.sample import SampleSettings

    configs = [TrainConfig, SampleSettings] + [m.config_class for m in registry.METHODS.values()]
    ranged = {f.metadata.get("flag", flag(f.name)) for c in configs for f in dataclasses.fields(c) if RANGE_KEY in f.metadata}
    assert len(ROWS) >= 30
    assert ranged <= {option for _, option, _, _, _ in ROWS}


def argv_of(command: str, option: str, value: str) -> list[str]:
    argv = shlex.split(command) + [option] + shlex.split(value or '""')
    return argv + (["--data", DATA] if argv[0] == "train" else [])


@pytest.mark.parametrize("command, option, value, page, message", ROWS, ids=[f"{r[1]}={r[2]}" for r in ROWS])
def test_cli_refuses_in_one_line(command, option, value, page, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv_of(command, option, value) + ["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize("command, option, value, page, message",
                         [r for r in ROWS if r[0].startswith("train")], ids=lambda v: str(v)[:30])
def test_toml_refuses_alike(command, option, value, page, message, tmp_path, capsys):
    literal = shlex.split(value or '""')[0]
    try:
        float(literal)
    except ValueError:
        literal = f'"{literal}"'  # a string in TOML
    config = tmp_path / "run.toml"
    config.write_text(f"data = \"{DATA}\"\noutput_dir = \"{tmp_path / 'out'}\"\n{option[2:].replace('-', '_')} = {literal}\n")
    assert main(shlex.split(command) + ["--config", str(config)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def studio_app(tmp_path_factory):
    from studio.ui.app import Studio

    return Studio(tmp_path_factory.mktemp("studio"), workers=0)


def page_call(studio_app, command: str, option: str, value: str):
    """The page's handler for `command` with the form's `option` field set to `value`."""
    name = option[2:].replace("-", "_")
    if command.startswith("sample"):
        form = {"seeds": "0", "steps": 20, "guidance": 5.0, "scheduler": "model default", "width": 0, "height": 0}
        key = {"seed": "seeds", "steps": "steps", "guidance_scale": "guidance", "scheduler": "scheduler",
               "width": "width", "height": "height"}[name]
        form[key] = value if key in ("seeds", "scheduler") else float(value)
        return studio_app.sample(studio_app.default_model, [], "a red circle", "", *form.values())
    from studio.cli import DEFAULT_METHOD

    words = shlex.split(command)
    kind = {"erase": "erase", "quantize": "quantize"}.get(words[0], "adapter")
    method = words[words.index("--method") + 1] if "--method" in words else DEFAULT_METHOD[kind]
    common, per_method = studio_app.fields(kind)
    every = common + [f for fields in per_method.values() for f in fields]
    values = [f.default if typing.get_origin(f.base_type) is not list else ",".join(f.default or []) for f in every]
    if kind == "erase":  # the form's concept field, as the command line gives it
        values[next(i for i, f in enumerate(every) if f.name == "concept")] = words[words.index("--concept") + 1]
    index = next(i for i, f in enumerate(every) if f.name == name and f.owner in ("common", method))
    try:
        values[index] = float(value)
    except ValueError:
        values[index] = value
    if kind in ("erase", "quantize"):  # no dataset
        return studio_app.start(kind, studio_app.default_model, method, "none", "", None, *values)
    return studio_app.start(kind, studio_app.default_model, method, "ShapesWorld", DATA, None, *values)


@pytest.mark.parametrize("command, option, value, page, message", [r for r in ROWS if r[3] == "yes"],
                         ids=lambda v: str(v)[:30])
def test_page_refuses_alike_before_a_job_exists(studio_app, command, option, value, page, message):
    with pytest.raises(gr.Error) as raised:
        page_call(studio_app, command, option, value)
    assert raised.value.message == message
    assert studio_app.queue.list() == []
    assert not any((studio_app.data_dir / "jobs").iterdir())


def boolean_options() -> list[tuple[str, str]]:
    from studio.trainers.base import TrainConfig

    configs = [TrainConfig] + [m.config_class for m in registry.METHODS.values()]
    return sorted({(f.name, c.__name__) for c in configs for f in dataclasses.fields(c)
                   if typing.get_type_hints(c)[f.name] is bool})


def method_for(config_name: str) -> str:
    return next((m.name for m in registry.METHODS.values()
                 if m.config_class.__name__ == config_name), "lora")


@pytest.mark.parametrize("name, owner", boolean_options())
def test_every_boolean_is_a_switch_and_a_toml_bool(name, owner, tmp_path):
    method = method_for(owner)
    switch = "--" + name.replace("_", "-")
    parser = build_parser()

    erase = registry.get(method).kind == "erase"
    command = ["erase", "--method", method, "--concept", "circle"] if erase else ["train", "--method", method, "--data", DATA]

    def read(argv):
        args = parser.parse_args(command + argv)
        config = train_config_from_args(args, "erase" if erase else "adapter")
        return config.method_options[name] if name in config.method_options else getattr(config, name)

    assert read([switch]) is True
    assert read(["--no-" + switch[2:]]) is False
    for text, expected in (("true", True), ("false", False)):
        path = tmp_path / f"{text}.toml"
        path.write_text(f"{name} = {text}\n")
        assert read(["--config", str(path)]) is expected
    with pytest.raises(SystemExit):  # `--coft true`: a switch takes no value
        parser.parse_args([*command, switch, "true"])
    path = tmp_path / "bad.toml"
    path.write_text(f'{name} = "maybe"\n')
    with pytest.raises(StudioError, match=f"{switch} 'maybe': must be true or false"):
        read(["--config", str(path)])


def test_a_switch_given_a_value_says_so(capsys):
    assert main(["train", "--method", "oft", "--coft", "true", "--data", DATA]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "yes/no options are switches: --NAME or --no-NAME" in err


def test_an_option_of_another_method_names_its_method(capsys):
    assert main(["train", "--method", "lora", "--coft", "--data", DATA]) == 2
    assert capsys.readouterr().err == ("error: --coft is an option of --method oft, not of --method lora: "
                                       "choose that method or drop --coft\n")


@pytest.mark.parametrize("flags, message", [
    (["--method", "oft", "--block-size", "7"], "OFT block_size 7 does not divide"),
    (["--method", "lora", "--rank", "100"], "--rank 100 is more than layer"),
])
def test_a_model_dependent_value_fails_before_anything_is_written(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", *flags, "--data", DATA, "--max-train-steps", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def flags_taking_a_value(command: str) -> list[str]:
    """The flags of `studio <command>` that take a value (not switches, not --help)."""
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # argparse keeps sub-commands here
    return [a.option_strings[0] for a in sub._actions
            if a.option_strings and a.nargs != 0 and a.option_strings[0].startswith("--")
            and a.option_strings[0] not in ("--config", "--model", "--model-config", "--device", "--output-dir",
                                            "--cache-dir", "--resume", "--prompts-file", "--adapter")]


@pytest.mark.parametrize("command", ["train", "sample"])
def test_any_text_in_any_option_is_accepted_or_refused_in_one_line(command):
    """Fuzzing every value-taking option of train and sample with arbitrary text and numbers: the options'
    check either accepts the value or raises a one-line StudioError, never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from studio.cli import check_command

    base = ["train", "--data", DATA] if command == "train" else ["sample", "a red circle"]
    values = st.one_of(st.text(max_size=12), st.integers(-10**12, 10**12).map(str),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr))

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(flag=st.sampled_from(flags_taking_a_value(command)), value=values)
    def check(flag, value):
        if value.startswith("-") and not re.fullmatch(r"-[\d.]+(e[-+]?\d+)?|-inf|-nan", value):
            value = " " + value  # a dash-word is a flag to argparse: covered by the usage-error tests
        try:
            check_command(base + [flag, value])
        except StudioError as err:
            assert "\n" not in str(err) and str(err)

    check()
