"""Quantized UNets on CUDA (run where a GPU is lent): what only a GPU shows.

- `int8`: `studio.bench.quantize.int8_speed("cuda")`, torchao's int8 kernels against float32 on an SD1.5-shaped UNet
  step (batch 2, 64x64 latents), whole step and Linear layers alone;
- per quantized toy file given: the UNet's output on CUDA (fp32 and fp16) against the CPU's, fake-quantized, and the
  samples' evaluator agreement between CUDA fp16 and CPU fp32 (16 prompts, one seed);
- for a W8A8 file, the int8 kernels on CUDA against its fake-quantized output.

The stored results (benchmarks/results/quantize-cuda-h100.json) came from an H100 lent for minutes, with its own
torch 2.11 and torchao 0.18 carried as a wheel, `--eager`: compiling torchao's int8 layers failed there. The samples'
agreement across devices is not a quantization metric: each device draws its own noise from the same seed.

Example:
    $ python benchmarks/quantize_cuda.py ptq-w8a8.safetensors efficientdm-w4a8.safetensors --eager --output benchmarks/results/quantize-cuda-h100.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from studio import plugin
from studio.bench.erase import other_prompts
from studio.bench.quantize import agreement, int8_speed
from studio.eval import load_evaluator, score
from studio.pipeline import load
from studio.sample import SampleSettings, generate


@torch.no_grad()
def unet_output(pipe, device: str, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator).to(device, dtype)
    text = pipe.encode_prompt(["a red striped circle", "a blue square on a black background"], device, 1, False)[0]
    return torch.cat([pipe.unet(x, t, text.to(dtype)).sample.float().cpu() for t in (900, 500, 100)])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a - b).norm() / b.norm()), 5)


def baseline() -> dict:
    """The unquantized toy model's samples on CUDA fp16 against the CPU's: how far the devices alone disagree."""
    prompts, _ = other_prompts([], 16, seed=500)
    settings = SampleSettings(prompts=prompts, seeds=[0], batch_size=16)
    evaluator = load_evaluator()
    rows = [score(generate(load("toy", device=d, dtype=t), settings, progress=False), evaluator=evaluator).rows
            for d, t in (("cpu", "fp32"), ("cuda", "fp16"), ("cuda", "fp32"))]
    return {"sample_agreement_cuda_fp16_vs_cpu": agreement(rows[1], rows[0]),
            "sample_agreement_cuda_fp32_vs_cpu": agreement(rows[2], rows[0])}


def check_file(path: str, compile: bool) -> dict:
    prompts, _ = other_prompts([], 16, seed=500)
    settings = SampleSettings(prompts=prompts, seeds=[0], batch_size=16)
    evaluator = load_evaluator()
    outputs, rows = {}, {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.float16)):
        pipe = load("toy", device=device, dtype="fp16" if dtype == torch.float16 else "fp32")
        plugin.apply(pipe, path)
        outputs[(device, dtype)] = unet_output(pipe, device, dtype)
        if (device, dtype) != ("cuda", torch.float32):
            rows[(device, dtype)] = score(generate(pipe, settings, progress=False), evaluator=evaluator).rows
    cpu = outputs[("cpu", torch.float32)]
    result = {"cuda_fp32_vs_cpu": relative(outputs[("cuda", torch.float32)], cpu),
              "cuda_fp16_vs_cpu": relative(outputs[("cuda", torch.float16)], cpu),
              "sample_agreement_cuda_fp16_vs_cpu": agreement(rows[("cuda", torch.float16)], rows[("cpu", torch.float32)])}
    pipe = load("toy", device="cuda", dtype="fp32")
    plugin.apply(pipe, path)
    try:
        from studio.quantize import use_int8_kernels

        use_int8_kernels(pipe, compile=compile)
        result["int8_kernels_vs_fake_quant"] = relative(unet_output(pipe, "cuda", torch.float32),
                                                        outputs[("cuda", torch.float32)])
    except Exception as error:  # a W4 file refuses int8 kernels: say so
        result["int8_kernels"] = str(error)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="quantized toy files to check on CUDA")
    parser.add_argument("--output", default=None)
    parser.add_argument("--eager", action="store_true", help="do not compile the int8 layers (torch.compile of "
                        "torchao's int8 layers failed with torch 2.11 on the H100)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "unquantized": baseline()}
    for path in args.files:
        try:
            result[Path(path).stem] = check_file(path, not args.eager)
        except Exception as error:  # keep what the other checks found
            result[Path(path).stem] = {"error": repr(error)}
    try:
        result["int8"] = int8_speed("cuda", compile=not args.eager)
    except Exception as error:
        result["int8"] = {"error": repr(error)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
