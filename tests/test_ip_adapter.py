"""IP-Adapter: trained on the loop contract, saved in the official layout, loaded by stock diffusers and our plugin."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from studio import plugin
from studio.adapters import ip_adapter
from studio.cli import main
from studio.errors import StudioError
from studio.pipeline import load
from studio.testing import tiny_sdxl_pipeline
from studio.toy.render import ShapeSpec, render
from studio.trainers.base import TrainConfig, train

DATA = "shapesworld:shape=seen,count=8,caption={caption}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip")
    result = train(TrainConfig(method="ip-adapter", data=DATA, output_dir=str(folder), max_train_steps=3,
                               train_batch_size=4, learning_rate=1e-2))
    return result


@pytest.fixture(scope="module")
def reference():
    return Image.fromarray(render(ShapeSpec("triangle", "red", "striped"), 32, 32).image)


def _sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def test_only_the_adapter_trains(trained):
    pipe = load("toy")
    assert trained.trainable_params == ip_adapter.adapter_parameter_count(pipe.unet, pipe.image_encoder.config.projection_dim)
    tensors = load_file(str(trained.artifact))
    assert {k.split(".")[0] for k in tensors} == {"image_proj", "ip_adapter"}
    # Official key ids: 1, 3, 5, ... over the cross-attention processors.
    ids = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("ip_adapter.")})
    assert ids == list(range(1, 2 * len(ids), 2))
    # The decoupled layers start from to_k / to_v and moved (they trained).
    unet = pipe.unet
    first = ip_adapter.cross_attention_processors(unet)[0][1].rsplit(".", 1)[0]
    assert not torch.equal(tensors["ip_adapter.1.to_k_ip.weight"], unet.get_submodule(first).to_k.weight)


def test_stock_load_ip_adapter_matches_our_plugin(trained, reference):
    ours = load("toy")
    plugin.apply(ours, trained.artifact)
    stock = load("toy")
    stock.load_ip_adapter(str(trained.artifact.parent), subfolder="", weight_name=trained.artifact.name)
    assert np.array_equal(_sample(ours, ip_adapter_image=reference), _sample(stock, ip_adapter_image=reference))
    # A pipeline with no image encoder gets the one saved beside the file.
    bare = load("toy")
    bare.image_encoder = None
    bare.load_ip_adapter(str(trained.artifact.parent), subfolder="", weight_name=trained.artifact.name)
    assert np.array_equal(_sample(bare, ip_adapter_image=reference), _sample(stock, ip_adapter_image=reference))


def test_the_image_prompt_changes_the_sample(trained, reference):
    pipe = load("toy")
    plugin.apply(pipe, trained.artifact)
    other = Image.fromarray(render(ShapeSpec("circle", "blue"), 32, 32).image)
    assert not np.array_equal(_sample(pipe, ip_adapter_image=reference), _sample(pipe, ip_adapter_image=other))


def test_plugin_loads_the_official_layout_without_our_header(trained, reference, tmp_path):
    official = tmp_path / "ip-adapter_sd15.safetensors"
    save_file(load_file(str(trained.artifact)), str(official))  # no metadata at all
    ours, plain = load("toy"), load("toy")
    plugin.apply(ours, trained.artifact)
    assert plugin.apply(plain, official) == "ip-adapter_sd15"
    assert np.array_equal(_sample(ours, ip_adapter_image=reference), _sample(plain, ip_adapter_image=reference))


def test_remove_restores_the_pipeline(trained):
    pipe = load("toy")
    encoder, processors = pipe.image_encoder, {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    before = _sample(pipe)
    name = plugin.apply(pipe, trained.artifact)
    plugin.remove(pipe, name)
    assert pipe.image_encoder is encoder and pipe.unet.encoder_hid_proj is None
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors
    assert np.array_equal(_sample(pipe), before)


def test_a_second_ip_adapter_is_refused(trained):
    pipe = load("toy")
    plugin.apply(pipe, trained.artifact)
    with pytest.raises(StudioError, match="already has an IP-Adapter"):
        plugin.apply(pipe, trained.artifact)
    assert list(plugin.applied(pipe)) == ["ip-adapter"]


def test_composes_with_a_weight_method(trained, reference, tmp_path):
    """A LoRA trained on the toy model hooks to_k / to_v, which the IP processors still call."""
    lora = train(TrainConfig(method="lora", data=DATA, output_dir=str(tmp_path / "lora"), max_train_steps=2,
                             train_batch_size=4, learning_rate=1e-1)).artifact
    pipe = load("toy")
    plugin.apply(pipe, trained.artifact)
    with_ip = _sample(pipe, ip_adapter_image=reference)
    plugin.apply(pipe, lora)
    assert not np.array_equal(_sample(pipe, ip_adapter_image=reference), with_ip)
    plugin.remove(pipe, "lora")
    assert np.array_equal(_sample(pipe, ip_adapter_image=reference), with_ip)


def test_sample_cli_image_prompt(trained, reference, tmp_path, capsys):
    image = tmp_path / "ref.png"
    reference.save(image)
    out = tmp_path / "out"
    assert main(["sample", "", "--adapter", str(trained.artifact), "--image-prompt", str(image), "--steps", "2",
                 "--output-dir", str(out)]) == 0
    assert (out / "0000-seed0.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--image-prompt", "{tmp}/missing.png"], "--image-prompt '{tmp}/missing.png': no such file"),
    (["--image-prompt", "{tmp}/notes.txt"], "is not an image"),
    (["--image-prompt", "{tmp}/fake.png"], "is not a readable image"),
    (["--image-prompt", "{tmp}/ref.png", "--no-adapter"], "--image-prompt is given but no applied artifact uses it"),
    (["--no-image"], "is applied and needs --image-prompt"),
])
def test_sample_cli_bad_image_prompts(trained, reference, tmp_path, capsys, argv, message):
    reference.save(tmp_path / "ref.png")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.png").write_bytes(b"not a png at all")
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv if not a.startswith("--no-")]
    adapter = [] if "--no-adapter" in argv else ["--adapter", str(trained.artifact)]
    code = main(["sample", "a red circle", *adapter, *args, "--steps", "1", "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_on_the_tiny_sdxl_fixture():
    """SDXL's UNet takes the adapter too (added time/text conditioning beside the image tokens); stock
    load_ip_adapter builds the same modules from our state dict."""
    pipe = tiny_sdxl_pipeline()
    unet = pipe.unet
    ip_adapter.inject(unet, ip_adapter.IPAdapterConfig(), image_embed_dim=8)
    for p in ip_adapter.trainable_parameters(unet):
        p.data.add_(torch.randn_like(p) * 0.1)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 6, unet.config.cross_attention_dim, generator=generator)
    added = {"text_embeds": torch.randn(1, 16, generator=generator), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]]).float(),
             "image_embeds": [torch.randn(1, 1, 8, generator=generator)]}
    with torch.no_grad():
        ours = unet(sample, 10, text, added_cond_kwargs=added).sample
    fresh = tiny_sdxl_pipeline()
    fresh.load_ip_adapter(ip_adapter.nested(ip_adapter.state_dict(unet)), subfolder="", weight_name="",
                          image_encoder_folder=None)
    with torch.no_grad():
        stock = fresh.unet(sample, 10, text, added_cond_kwargs=added).sample
    assert torch.allclose(ours, stock, atol=1e-6)


def test_a_model_without_an_image_encoder_is_refused(tmp_path):
    from studio.trainers.base import train as run

    with pytest.raises(StudioError, match="needs the model's image encoder"):
        run(TrainConfig(method="ip-adapter", model=str(_sd_folder(tmp_path)), data=DATA, output_dir=str(tmp_path / "o"),
                        max_train_steps=1))
    assert not (tmp_path / "o").exists()


def _sd_folder(tmp_path):
    from studio.testing import tiny_sd_pipeline

    folder = tmp_path / "sd"
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"hello", "the image prompt is not an image"),
    ("fake.png", b"not a png at all", "the image prompt is not a readable image"),
    ("ref.png", None, "--image-prompt is given but no applied artifact uses it"),
])
def test_page_refuses_bad_image_prompts(tmp_path, reference, name, content, message):
    """The page checks an image prompt as the CLI does, before any job exists."""
    import gradio as gr

    from studio.ui.app import Studio

    studio_app = Studio(tmp_path / "studio", workers=0)
    studio_app.upload_dir.mkdir(parents=True, exist_ok=True)
    upload = studio_app.upload_dir / name
    if content is None:
        reference.save(upload)
    else:
        upload.write_bytes(content)
    with pytest.raises(gr.Error, match=message):
        studio_app.sample(studio_app.default_model, [], "", "", "0", 2, 5.0, "model default", 0, 0, str(upload))
    assert studio_app.queue.list() == []


def test_page_samples_with_an_image_prompt(tmp_path, trained, reference):
    """An IP-Adapter on the stack and an image prompt (no text): the job's command carries both."""
    from studio.ui.app import Studio

    studio_app = Studio(tmp_path / "studio", workers=0)
    studio_app.upload_dir.mkdir(parents=True, exist_ok=True)
    upload = studio_app.upload_dir / "ref.png"
    reference.save(upload)
    artifact = studio_app.data_dir / "ip" / "ip-adapter.safetensors"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(trained.artifact.read_bytes())
    stack = [{"path": str(artifact), "name": "ip-adapter", "scale": 1.0, "enabled": True}]
    studio_app.queue.submit = lambda job, argv: setattr(studio_app, "submitted", argv)  # no worker: record the command
    studio_app.queue.get = lambda job_id: type("Job", (), {"status": "stopped", "command": "", "id": job_id})()
    studio_app.sample(studio_app.default_model, stack, "", "", "0", 2, 5.0, "model default", 0, 0, str(upload))
    argv = studio_app.submitted
    assert argv[:2] == ["sample", ""] and "--image-prompt" in argv
    kept = Path(argv[argv.index("--image-prompt") + 1])
    assert kept.parent == studio_app.data_dir / "image-prompts" and kept.read_bytes() == upload.read_bytes()


@pytest.mark.parametrize("to", ["kohya", "peft", "lycoris", "diffusers"])
def test_convert_explains_there_is_nothing_to_convert(trained, tmp_path, capsys, to):
    assert main(["convert", str(trained.artifact), "--to", to, "--output", str(tmp_path / "out")]) == 2
    assert "already in the layout of its stock loader (pipe.load_ip_adapter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prior_data_is_refused_not_ignored(tmp_path, capsys):
    """IP-Adapter's loss does not use a prior set: --prior-data is refused, nothing written."""
    code = main(["train", "--method", "ip-adapter", "--data", DATA, "--prior-data", DATA, "--max-train-steps", "1",
                 "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err == "error: --prior-data is not used by --method ip-adapter; drop --prior-data\n"
    assert not (tmp_path / "out").exists()
