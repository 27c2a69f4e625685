import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def toy_pipe():
    from studio.pipeline import load

    return load("toy", device="cpu")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import CLIPTokenizer

    from studio.pipeline import toy_model_path

    return CLIPTokenizer.from_pretrained(toy_model_path() / "tokenizer")
