import contextlib

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def toy_pipe():
    from studio.pipeline import load

    return load("toy", device="cpu")


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """The tiny SDXL fixture saved as a diffusers folder, for runs that load a model by path."""
    from studio.testing import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """The tiny SD1.x fixture saved as a diffusers folder, for runs that load a model by path."""
    from studio.testing import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import CLIPTokenizer

    from studio.pipeline import toy_model_path

    return CLIPTokenizer.from_pretrained(toy_model_path() / "tokenizer")


@pytest.fixture
def toy_artifact(tmp_path):
    """A real (untrained) LoRA artifact for the toy model, written by the adapter's own code."""
    import dataclasses

    from studio import registry
    from studio.artifact import fingerprint, save_artifact
    from studio.pipeline import load

    unet = load("toy", device="cpu").unet
    adapter = registry.get("lora").adapter
    config = registry.get("lora").config({})
    names = adapter.inject(unet, config)
    path = tmp_path / "lora.safetensors"
    save_artifact(path, adapter.state_dict(unet), "lora", dataclasses.asdict(config), fingerprint(unet, names),
                  extra_metadata=adapter.file_metadata(config))
    return path


@contextlib.contextmanager
def serve(root, *extra_args):
    """`studio serve` in a subprocess (`studio.testing.start_server`), stopped at the end. Yields the URL."""
    from studio.testing import start_server

    process, url = start_server(root, *extra_args)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def studio_server(tmp_path_factory):
    """One app for the UI tests. Yields (url, root): its data folder is root / "data"."""
    root = tmp_path_factory.mktemp("studio-server")
    with serve(root) as url:
        yield url, root
