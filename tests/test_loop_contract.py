"""The loop contract: moving a method onto it must not change what it learns.

`REFERENCE` holds, per case, the SHA-256 of the artifact's tensors after a few steps with a fixed seed,
measured with the loop as it was before the methods moved onto `trainers/base.py::MethodTrainer`
(commit "plugin: artifacts attach as a forward hook ..."): the same seed must give bit-identical weights.
Every case crosses something a method hooks into: SaRA's half-way re-selection and nuclear-norm term,
LoRA's dropout and text-encoder LoRA, prior preservation, min-SNR weighting, caption dropout.
"""

import hashlib

import pytest
import torch
from safetensors.torch import load_file
from studio.trainers.base import TrainConfig, train

STAR = "shapesworld:shape=star,count=4,colors=red|blue,caption=a {color} sks"
PRIOR = "shapesworld:shape=circle,count=2,colors=green,caption=a {color} circle"

CASES = {
    "lora": {"method": "lora", "method_options": {"rank": 2, "dropout": 0.1}, "caption_dropout": 0.3},
    "lora-te": {"method": "lora", "method_options": {"rank": 2}, "train_text_encoder": True, "text_encoder_lr": 5e-4},
    "oft": {"method": "oft", "method_options": {"block_size": 8, "coft": True, "eps": 1e-3}, "snr_gamma": 5.0},
    "boft": {"method": "boft", "method_options": {"block_size": 4, "n_butterfly_factor": 2}, "prior_data": PRIOR},
    "sara": {"method": "sara", "method_options": {"fraction": 0.05, "rank_weight": 0.1, "rank_min_dim": 16}},
}

REFERENCE = {
    "lora": "70374c765fe8cec9f512b311f53bd58b1be4f00ea7cef61c8b361881d3b93506",
    "lora-te": "8cecbcb4a4c8da89f0270eb0270f01a8d3121ce4951b4a9fba23428e568cb3dd",
    "oft": "2ac8112c9d4fb5349275b83b67d7236148091a5d92aeba56651eed004d4341f1",
    "boft": "3b8e661032eba2bcb54bb7a6edddc0886c484a8c7111479844684ac707d07969",
    "sara": "b7a76d3e96de65721eb348ffc55499ce9063a9e4a844141569b2b59c2dbc24a7",
}


def artifact_hash(path) -> str:
    """SHA-256 over the artifact's tensors (sorted keys, raw bytes)."""
    tensors = load_file(str(path))
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode() + tensors[key].contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_case(name: str, folder) -> str:
    """Train case `name` for 4 steps on one thread (the sum order of a multi-threaded matmul depends on the
    thread count, so bit-identity needs the same count) and hash its artifact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return artifact_hash(_train(name, folder))
    finally:
        torch.set_num_threads(threads)


def _train(name: str, folder):
    config = TrainConfig(data=STAR, output_dir=str(folder), max_train_steps=4, train_batch_size=2, learning_rate=1e-3,
                         seed=7, validation_steps=0, **CASES[name])
    return train(config).artifact


@pytest.mark.parametrize("name", list(CASES))
def test_same_seed_same_weights_as_before_the_move(name, tmp_path):
    assert run_case(name, tmp_path) == REFERENCE[name]


if __name__ == "__main__":  # print the reference hashes for the loop as it is now
    import tempfile

    for case in CASES:
        with tempfile.TemporaryDirectory() as folder:
            print(f'    "{case}": "{run_case(case, folder)}",')
