"""Hostile and broken artifact files: the content hash, the header checks, and a fuzz test that throws mutated and
truncated files at `studio inspect` and `studio.plugin.apply` (in-process) and accepts only two outcomes: a one-line
`StudioError` with the pipeline left as it was, or success on a file whose content is the original's (a forged
file, its hash recomputed after the change, may also apply: it is a valid file).

The fast set throws `FAST_EXAMPLES` files; the slow test (`pytest -m slow`) 10,000.
"""

import contextlib
import io
import json
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio import plugin
from studio.artifact import CONTENT_HASH_KEY, content_digest, read_header, save_artifact, verify_content
from studio.cli import build_parser, cmd_inspect, main
from studio.errors import StudioError
from studio.pipeline import check_safetensors

FAST_EXAMPLES = 300
SECONDS_PER_FILE = 20  # a file that takes longer than this is a hang


def _lora_like(pipe, method: str, path, options: dict | None = None):
    """A LoRA or OFT artifact for `pipe`'s UNet with non-zero weights (so applying it changes the output)."""
    import dataclasses

    from studio import registry
    from studio.artifact import fingerprint
    from studio.pipeline import load

    unet = load("toy", device="cpu").unet
    spec = registry.get(method)
    config = spec.config(options or {})
    names = spec.adapter.inject(unet, config)
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=generator) * 0.01 if v.is_floating_point() else v
               for k, v in spec.adapter.state_dict(unet).items()}
    return save_artifact(path, tensors, method, dataclasses.asdict(config), fingerprint(unet, names),
                         extra_metadata=spec.adapter.file_metadata(config))


def _quantized(path):
    """A W4A8 quantized UNet file for the toy model (uncalibrated steps: its content is what matters here)."""
    from studio.artifact import fingerprint
    from studio.pipeline import load
    from studio.quantize import export, quantize_unet

    unet = load("toy", device="cpu").unet
    layers, _ = quantize_unet(unet, "w4a8", timesteps=[999, 499, 0])
    for layer in layers.values():
        layer.calibrated.fill_(True)
    return save_artifact(path, export(layers), "efficientdm", {"bits": "w4a8"}, fingerprint(unet, list(layers)))


@pytest.fixture(scope="module")
def originals(tmp_path_factory, toy_pipe):
    folder = tmp_path_factory.mktemp("originals")
    return {"lora": _lora_like(toy_pipe, "lora", folder / "lora.safetensors"),
            "oft": _lora_like(toy_pipe, "oft", folder / "oft.safetensors"),
            "efficientdm": _quantized(folder / "quantized.safetensors")}


def _split(data: bytes) -> tuple[dict, bytes]:
    (header_len,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + header_len]), data[8 + header_len:]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    return struct.pack("<Q", len(text)) + text + body


def _forge(header: dict, body: bytes) -> dict:
    """`header` with its content hash recomputed, as a forger (or a bug) would write it."""
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        return header
    try:
        digest = content_digest(io.BytesIO(body), header, 0)
    except Exception:  # an entry too broken to hash: the forger gives up, the file stays as mutated
        return header
    return {**header, "__metadata__": {**metadata, CONTENT_HASH_KEY: digest}}


def _first_difference(a: bytes, b: bytes) -> int:
    import numpy as np

    n = min(len(a), len(b))
    differ = np.flatnonzero(np.frombuffer(a, np.uint8, n) != np.frombuffer(b, np.uint8, n))
    return int(differ[0]) if len(differ) else n


class Mutation:
    """A mutated file: which original, how it was changed (what hypothesis prints for a failing case), its bytes."""

    def __init__(self, name: str, how: str, data: bytes, forged: bool) -> None:
        self.name, self.how, self.data, self.forged = name, how, data, forged

    def __repr__(self) -> str:
        return f"Mutation({self.name}, {self.how[:300]}, {len(self.data)} bytes{', forged' if self.forged else ''})"


def _mutations():
    """A hypothesis strategy of `Mutation`s of the originals' bytes."""
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=6)

    @st.composite
    def mutate(draw, originals: dict[str, bytes]):
        name = draw(st.sampled_from(sorted(originals)))
        data = originals[name]
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "header-length",
                                     "header-entry", "header-key", "metadata", "shape"]))
        forged = False
        before = data
        if kind == "truncate":
            data = data[:draw(st.integers(0, len(data) - 1))]
        elif kind == "flip":
            data = bytearray(data)
            for _ in range(draw(st.integers(1, 8))):
                data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
            data = bytes(data)
        elif kind in ("overwrite", "insert", "delete"):
            at = draw(st.integers(0, len(data) - 1))
            piece = draw(st.binary(min_size=1, max_size=64))
            data = {"overwrite": data[:at] + piece + data[at + len(piece):], "insert": data[:at] + piece + data[at:],
                    "delete": data[:at] + data[at + len(piece):]}[kind]
        elif kind == "header-length":
            data = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
        else:  # a change to the header's meaning, written back well-formed, maybe with its hash recomputed
            header, body = _split(data)
            tensors = sorted(k for k in header if k != "__metadata__")
            metadata = dict(header["__metadata__"])
            if kind == "header-entry":  # a tensor's dtype, shape or offsets set to any JSON value
                key = draw(st.sampled_from(tensors))
                header[key] = {**header[key], draw(st.sampled_from(["dtype", "shape", "data_offsets"])): draw(json_values)}
            elif kind == "header-key":  # a tensor renamed: a mangled module or parameter name
                key = draw(st.sampled_from(tensors))
                at = draw(st.integers(0, len(key)))
                renamed = key[:at] + draw(st.text(max_size=3)) + key[at + draw(st.integers(0, 3)):]
                header[renamed] = header.pop(key)
            elif kind == "metadata":  # a header entry (config, fingerprint, method, ...) set to other text or JSON
                key = draw(st.sampled_from(sorted(metadata)))
                metadata[key] = draw(st.text(max_size=20) | json_values.map(json.dumps))
                header["__metadata__"] = metadata
            else:  # a plausible but wrong shape, same bytes: a tensor for another layer
                key = draw(st.sampled_from(tensors))
                count = 1
                for n in header[key]["shape"]:
                    count *= n
                header[key] = {**header[key], "shape": draw(st.sampled_from([[count], [1, count], [count, 1], [0],
                                                                            [count // 2, 2] if count % 2 == 0 else [count]]))}
            forged = draw(st.booleans())
            data = _join(_forge(header, body) if forged else header, body)
        changed = _first_difference(before, data)
        how = f"{kind} at byte {changed}: {data[max(0, changed - 40):changed + 80]!r}"
        return Mutation(name, how, data, forged)

    return mutate


@contextlib.contextmanager
def _deadline(seconds: int):
    def hang(signum, frame):
        raise AssertionError(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _same_content(path, original) -> bool:
    mutated, reference = load_file(str(path)), load_file(str(original))
    return (mutated.keys() == reference.keys() and all(torch.equal(mutated[k], reference[k]) for k in mutated)
            and check_safetensors(path).get("__metadata__") == check_safetensors(original).get("__metadata__"))


def _unet_state(pipe) -> tuple:
    """What tells whether anything was left on the pipeline: the artifacts, the hooks, every weight's sum."""
    return (tuple(plugin.applied(pipe)), len(plugin._hooked_layers(pipe)),
            float(sum(p.detach().double().sum() for p in pipe.unet.parameters())))


def _throw(pipe, originals: dict, folder, examples: int) -> dict[str, int]:
    """Throw `examples` mutated files at `studio inspect` and `plugin.apply`; return the outcomes counted."""
    from hypothesis import HealthCheck, given, settings

    raw = {name: path.read_bytes() for name, path in originals.items()}
    parser = build_parser()
    before = _unet_state(pipe)
    outcomes: dict[str, int] = {}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=_mutations()(raw))
    def check(case):
        name, data, forged = case.name, case.data, case.forged
        path = folder / f"{name}.safetensors"
        path.write_bytes(data)
        inspect_args = parser.parse_args(["inspect", str(path)])
        with _deadline(SECONDS_PER_FILE):
            try:  # `studio inspect FILE` (its parser built once: main() would build it per call)
                with contextlib.redirect_stdout(io.StringIO()):
                    cmd_inspect(inspect_args)
            except StudioError as error:
                assert "\n" not in str(error) and str(error)
            else:
                assert forged or _same_content(path, originals[name]), f"inspect passed a changed {name} file"
            try:
                applied = plugin.apply(pipe, path, name="fuzzed")
            except StudioError as error:
                assert "\n" not in str(error) and str(error)
                assert _unet_state(pipe) == before, f"a refused {name} file left the pipeline changed: {error}"
                outcome = "refused"
            else:
                assert forged or _same_content(path, originals[name]), f"apply took a changed {name} file silently"
                plugin.remove(pipe, applied)
                assert _unet_state(pipe) == before
                outcome = "applied (forged)" if forged else "applied (same content)"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    check()
    return outcomes


def test_fuzzed_artifacts_get_clean_errors(originals, toy_pipe, tmp_path):
    outcomes = _throw(toy_pipe, originals, tmp_path, FAST_EXAMPLES)
    assert sum(outcomes.values()) == FAST_EXAMPLES and outcomes["refused"] > FAST_EXAMPLES // 2


@pytest.mark.slow
def test_ten_thousand_fuzzed_artifacts_get_clean_errors(originals, toy_pipe, tmp_path):
    """With STUDIO_FUZZ_RESULTS=FOLDER, the outcomes are written to FOLDER/fuzz-artifacts.json."""
    import time

    start = time.time()
    outcomes = _throw(toy_pipe, originals, tmp_path, 10_000)
    assert sum(outcomes.values()) == 10_000
    write_fuzz_results("fuzz-artifacts.json", {"originals": sorted(originals), "files": 10_000, "outcomes": outcomes,
                                               "seconds": round(time.time() - start, 1)})


def write_fuzz_results(name: str, results: dict) -> None:
    """With STUDIO_FUZZ_RESULTS=FOLDER (benchmarks/results), a slow fuzz test's outcomes go to FOLDER/`name`."""
    import os

    folder = os.environ.get("STUDIO_FUZZ_RESULTS")
    if folder:
        command = "STUDIO_FUZZ_RESULTS=benchmarks/results pytest -m slow tests/test_hostile_files.py tests/test_hostile_uploads.py"
        Path(folder, name).write_text(json.dumps({"command": command, **results, "other_exceptions": 0, "hangs": 0},
                                                 indent=2) + "\n")


def test_every_flipped_byte_of_the_tensors_is_caught(originals, toy_pipe, tmp_path):
    """One flipped bit anywhere in the tensor data: the hash refuses the file (this is what applied silently
    before files carried a hash)."""
    data = originals["lora"].read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    generator = torch.Generator().manual_seed(0)
    for at in torch.randint(8 + header_len, len(data), (50,), generator=generator).tolist():
        damaged = bytearray(data)
        damaged[at] ^= 1 << (at % 8)
        path = tmp_path / "damaged.safetensors"
        path.write_bytes(bytes(damaged))
        with pytest.raises(StudioError, match="is damaged: its content does not match the hash"):
            plugin.apply(toy_pipe, path)
    assert plugin.applied(toy_pipe) == {}


def test_a_studio_header_without_a_hash_is_refused_and_other_tools_files_load(originals, tmp_path):
    header, body = _split(originals["lora"].read_bytes())
    del header["__metadata__"][CONTENT_HASH_KEY]
    unhashed = tmp_path / "unhashed.safetensors"
    unhashed.write_bytes(_join(header, body))
    with pytest.raises(StudioError, match="has a studio header but no valid content hash"):
        read_header(unhashed)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["inspect", str(unhashed)]) == 2
    assert "no valid content hash" in err.getvalue()
    # A file of another tool (no studio header) is read as before: a kohya LoRA converts back to ours.
    kohya = tmp_path / "kohya.safetensors"
    assert main(["convert", str(originals["lora"]), "--to", "kohya", "--output", str(kohya)]) == 0
    assert "studio.method" not in (check_safetensors(kohya).get("__metadata__") or {})
    assert main(["convert", str(kohya), "--to", "diffusers", "--model", "toy",
                 "--output", str(tmp_path / "back.safetensors")]) == 0
    verify_content(tmp_path / "back.safetensors")


def test_oversized_headers_and_absurd_shapes_are_refused_before_allocating(tmp_path):
    import tracemalloc

    huge_header = tmp_path / "huge-header.safetensors"
    huge_header.write_bytes(struct.pack("<Q", 2**62) + b"{}" * 8)
    absurd = tmp_path / "absurd.safetensors"
    save_file({"w": torch.zeros(4)}, str(absurd))
    header, body = _split(absurd.read_bytes())
    header["w"]["shape"] = [2**40, 2**40]
    absurd.write_bytes(_join(header, body))
    long_header = tmp_path / "long-header.safetensors"  # a header bigger than safetensors allows, file to match
    with open(long_header, "wb") as f:
        f.write(struct.pack("<Q", 200_000_000))
        f.truncate(8 + 200_000_001)
    tracemalloc.start()
    for path, message in [(huge_header, "truncated or corrupt"), (absurd, "does not fit its 16 bytes"),
                          (long_header, "more than safetensors allows")]:
        with pytest.raises(StudioError, match=message):
            check_safetensors(path)
        with pytest.raises(StudioError, match=message):
            plugin.load_tensors(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes allocated to refuse them"
