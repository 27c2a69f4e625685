"""Print the README's benchmark tables from benchmarks/results/*.json (so the README quotes the files).

Example:
    $ python benchmarks/tables.py
"""

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _mean_with_ci(r: dict, key: str, fmt: str) -> str:
    """`0.81 [0.76, 0.85]`: the mean over training seeds and its 95% interval; the value alone in older results."""
    interval = r.get(f"{key}_ci")
    return format(r[key], fmt) + (f" [{format(interval[0], fmt)}, {format(interval[1], fmt)}]" if interval else "")


def _per_seed(r: dict, key: str) -> str:
    """`0.80 / 0.82`: one value per training seed; — in older results."""
    return " / ".join(f"{v:.2f}" for v in r[f"{key}_per_seed"]) if f"{key}_per_seed" in r else "—"


def personalize_table(path: Path | None = None) -> str:
    """The personalize table: fidelity, composition and preservation as means over training seeds with their 95%
    intervals, fidelity per seed, then a line saying how many samples and which seeds."""
    data = json.loads((path or RESULTS / "personalize.json").read_text())
    rows = ["| method | fidelity [95% CI] | fidelity per seed | composition [95% CI] | preservation [95% CI] | "
            "trainable params | steps | train seconds | lr |", "|---|---|---|---|---|---|---|---|---|"]
    for method, r in data.items():
        if method == "base":
            continue
        rows.append(f"| {method} | {_mean_with_ci(r, 'fidelity', '.2f')} | {_per_seed(r, 'fidelity')} | "
                    f"{_mean_with_ci(r, 'composition', '.2f')} | {_mean_with_ci(r, 'preservation', '+.3f')} | "
                    f"{r['trainable_params']:,} | {r['max_train_steps']} | {r['train_seconds']:.0f} | {r['learning_rate']:g} |")
    base = data["base"]
    rows.append(f"| (base model) | {base['fidelity']:.2f} | — | — | accuracy {base['accuracy']:.3f} | — | — | — | — |")
    if "train_seeds" in base:
        rows.append("")
        rows.append(f"Per training seed ({', '.join(map(str, base['train_seeds']))}): {base['n_token_samples']} fidelity "
                    f"and {base['n_composition_samples']} composition samples (sampling seeds {base['sample_seeds'][0]}–"
                    f"{base['sample_seeds'][1]}), {base['n_preservation']} preservation prompts; intervals: "
                    f"{base['interval']['method']}.")
    return "\n".join(rows)


NOT_ENTRIES = {"setup", "goals", "round_times"}


def _with_ci(value: float | None, interval: list[float] | None) -> str:
    """`1.11 [1.08–1.14]`; just the value when there is no interval (results from before intervals)."""
    if value is None:
        return "—"
    return f"{value:.2f}" + (f" [{interval[0]:.2f}–{interval[1]:.2f}]" if interval else "")


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def train_step_table() -> str:
    """One table per model (× floor and speedup vs PEFT with their 95% intervals, peak memory in both settings),
    then the goals with their verdicts."""
    data = json.loads((RESULTS / "train-step.json").read_text())
    setup = data["setup"]
    models = [m for m in ("toy", "sd15") if m in data["floor"]]
    paper = setup.get("paper_memory", {"batch": 2, "latents": "64x64"})
    out = []
    for m in models:
        timing = setup.get("timing", {}).get(m)
        latents = setup["latents"][m].replace("x", "×")
        about = f"{setup['rounds']} rounds"
        if timing:
            about = f"{timing['rounds']} rounds, {timing['stopped']}, load average ≤ {timing['max_load_average']}"
        out.append(f"{m} ({latents} latents; {about}):")
        out.append("")
        out.append(f"| entry | s/step | × floor [95% CI] | speedup vs PEFT [95% CI] | peak MB (batch 1, {latents}) | "
                   f"peak MB (batch {paper['batch']}, {paper['latents'].replace('x', '×')}) |")
        out.append("|---|---|---|---|---|---|")
        wide = []
        for entry, per_model in data.items():
            if entry in NOT_ENTRIES or m not in per_model:
                continue
            r = per_model[m]
            mark = ""
            if not r.get("ci_target_met", True):
                mark = " *"
                wide.append(f"{entry} ±{r['ci_halfwidth']:.1%}")
            speedup = _with_ci(r.get("speedup_vs_peft"), r.get("speedup_ci")) if "speedup_vs_peft" in r else "—"
            out.append(f"| {entry}{mark} | {r['seconds']:.3f} | {_with_ci(r['ratio_to_floor'], r.get('ratio_ci'))} | "
                       f"{speedup} | {_mb(r.get('peak_memory_mb'))} | {_mb(r.get('paper_peak_memory_mb'))} |")
        if wide:
            out.append("")
            out.append(f"\\* interval wider than ±{setup.get('ci_target', 0.03):.0%}: {', '.join(wide)}")
        out.append("")
    goals = data.get("goals", {})
    if goals:
        out.append("| model | goal | value [95% CI] | target | verdict |")
        out.append("|---|---|---|---|---|")
        for m, checked in goals.items():
            for name, g in checked.items():
                out.append(f"| {m} | {name} | {_with_ci(g['value'], g.get('ci'))} | {g['goal']} | {g['verdict']} |")
    return "\n".join(out).rstrip()


def adapters_table() -> str:
    """IP-Adapter's ip_match and ip_text_compat per IP scale with their 95% intervals, then the goals and the
    parameter counts."""
    data = json.loads((RESULTS / "adapters.json").read_text())
    out = []
    ip = data.get("ip-adapter")
    if ip:
        out.append("| IP scale | ip_match [95% CI] | ip_text_compat [95% CI] |")
        out.append("|---|---|---|")
        for scale, r in ip["scales"].items():
            out.append(f"| {scale} | {_with_ci(r['ip_match']['value'], r['ip_match']['ci'])} | "
                       f"{_with_ci(r['ip_text_compat']['value'], r['ip_text_compat']['ci'])} |")
        base = ip["base_ip_match"]
        out.append(f"| (toy model, no adapter) | {_with_ci(base['value'], base['ci'])} | — |")
        out.append("")
        out.append(f"{ip['references']} reference renders, one sample each per scale; goals: ip_match ≥ 0.80 at scale 1.0 "
                   f"({ip['ip_match']:.2f}), ip_text_compat ≥ 0.70 at the best scale ({ip['best_scale']}: "
                   f"{ip['ip_text_compat']:.2f}). Recipe: {ip['recipe']['max_train_steps']} steps, batch "
                   f"{ip['recipe']['train_batch_size']}, caption dropout {ip['recipe']['caption_dropout']} "
                   f"({ip['train_seconds'] / 60:.0f} min on one CPU thread). Parameters: {ip['params_toy']:,} on the toy "
                   f"UNet, {ip['params_sd15'] / 1e6:.1f}M on an SD1.5-shaped UNet (the paper: {ip['params_paper']}).")
    return "\n".join(out).rstrip()


def t2i_table() -> str:
    """T2I-Adapter's t2i_iou and t2i_text_acc per condition kind, beside the base model and the IoU ceiling."""
    t2i = json.loads((RESULTS / "adapters.json").read_text()).get("t2i-adapter")
    if not t2i:
        return ""
    out = ["| condition | t2i_iou [95% CI] | t2i_text_acc [95% CI] |", "|---|---|---|"]
    for kind, r in t2i["kinds"].items():
        out.append(f"| {kind} | {_with_ci(r['t2i_iou']['value'], r['t2i_iou']['ci'])} | "
                   f"{_with_ci(r['t2i_text_acc']['value'], r['t2i_text_acc']['ci'])} |")
    base = t2i["base"]
    out.append(f"| (toy model, no adapter) | {_with_ci(base['t2i_iou']['value'], base['t2i_iou']['ci'])} | "
               f"{_with_ci(base['t2i_text_acc']['value'], base['t2i_text_acc']['ci'])} |")
    out.append(f"| (a mask against itself moved 1 px) | {t2i['iou_ceiling_1px_shift']:.2f} | — |")
    out.append("")
    minutes = sum(r["train_seconds"] for r in t2i["kinds"].values()) / 60
    out.append(f"{t2i['references']} control scenes, one sample each; goals: t2i_iou ≥ 0.70, t2i_text_acc ≥ 0.85. The judge "
               f"on the scenes' own renders: text_acc {t2i['evaluator_on_references']['value']:.2f}; its object masks against "
               f"the true masks: IoU {t2i['segmentation_check']:.2f}. Recipe: {t2i['recipe']['max_train_steps']} steps, batch "
               f"{t2i['recipe']['train_batch_size']} per kind ({minutes:.0f} min for both on one CPU thread, with sampling). "
               f"Parameters: {t2i['params_toy']:,} on the toy UNet; on an SD1.5-shaped UNet {t2i['params_sd15'] / 1e6:.1f}M "
               f"(full) and {t2i['params_sd15_light'] / 1e6:.1f}M (light); the paper: {t2i['params_paper']}.")
    return "\n".join(out)


def res_table() -> str:
    """ResAdapter's single_object_correct per size, the base model against the adapter, and native_agreement."""
    res = json.loads((RESULTS / "adapters.json").read_text()).get("res-adapter")
    if not res:
        return ""
    out = ["| size (w×h) | base model [95% CI] | with ResAdapter [95% CI] | judge on true renders | denoising loss, base → with |",
           "|---|---|---|---|---|"]
    for size, r in res["sizes"].items():
        loss = f"{r['base_denoising_loss']:.3f} → {r['denoising_loss']:.3f}" if "denoising_loss" in r else "—"
        out.append(f"| {size} | {_with_ci(r['base']['value'], r['base']['ci'])} | "
                   f"{_with_ci(r['single_object_correct']['value'], r['single_object_correct']['ci'])} | "
                   f"{r['evaluator_on_renders']['value']:.2f} | {loss} |")
    agreement = res["native_agreement"]
    out.append("")
    threads = f" on {res['threads']} CPU threads" if "threads" in res else ""  # files written before the key lack it
    out.append(f"single_object_correct over {res['references']} texts, one sample each per size; goal ≥ 0.85 at every size "
               f"(worst: {res['worst_size']}, {res['worst_single_object_correct']:.2f}). native_agreement at 32×32: "
               f"{_with_ci(agreement['value'], agreement['ci'])} (goal ≥ 0.95). Recipe: {res['recipe']['max_train_steps']} "
               f"steps, batch {res['recipe']['train_batch_size']}, learning rate {res['recipe']['learning_rate']:g} "
               f"({res['train_seconds'] / 60:.0f} min{threads}). Parameters: {res['params_toy']:,} on the toy UNet, "
               f"{res['params_sd15'] / 1e6:.2f}M on an SD1.5-shaped UNet (the paper: {res['params_paper']}).")
    return "\n".join(out)


def _rate(cell) -> str:
    """`0.05 [0.01, 0.10]` from a {"value", "ci"} entry; — where there is none."""
    if cell is None:
        return "—"
    return f"{cell['value']:.2f} [{cell['ci'][0]:.2f}, {cell['ci'][1]:.2f}]"


def erase_table() -> str:
    """Concept erasure: per method and concept, erase/synonym/adversarial rates, preservation, FD beside the floor."""
    path = RESULTS / "erase.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    rows = ["| method | concept | erase_rate | synonym_rate (prompts) | preservation | fd_other (floor) | "
            "adversarial_rate | seconds |", "|---|---|---|---|---|---|---|---|"]
    for method, columns in data.items():
        if method == "spm_without_transport" or not isinstance(columns, dict) or \
                not all(isinstance(r, dict) and "erase_rate" in r for r in columns.values()):
            continue  # the protocol, the SPM transfer and without transport (notes below), timings
        for concept, r in columns.items():
            floor = data["none"][concept]["fd_other"]
            preservation = r["preservation"]
            preservation = f"{preservation['value']:+.3f} [{preservation['ci'][0]:+.3f}, {preservation['ci'][1]:+.3f}]" \
                if isinstance(preservation, dict) else f"{preservation:+.3f}"
            per = "; ".join(f"{c} {v['value']:.2f}" for c, v in r.get("per_concept", {}).items())
            rows.append(f"| {method} | {concept} | {_rate(r['erase_rate'])}{f' ({per})' if per else ''} | "
                        f"{_rate(r['synonym_rate'])} ({r['synonym_prompts']}) | {preservation} | "
                        f"{r['fd_other']:.1f} ({floor:.1f}) | {r['adversarial_rate']:.2f} | {r.get('seconds', 0):.1f} |")
    notes = []
    if "spm_transfer" in data:
        transfer = data["spm_transfer"]
        notes.append(f"SPM transferred unchanged to a derived model ({transfer['derived_model']}): circle's erase_rate "
                     f"{_rate(transfer['erase_rate_on_derived'])} there, {_rate(transfer['derived_without_spm'])} "
                     "without it.")
    if "spm_without_transport" in data:
        cells = [f"{concept} erase {_rate(r['erase_rate'])}, synonyms {_rate(r['synonym_rate'])}, preservation "
                 f"{r['preservation']['value']:+.3f}" for concept, r in data["spm_without_transport"].items()]
        notes.append("SPM without Facilitated Transport (its official layout loaded by stock diffusers as a plain LoRA, "
                     "every membrane open): " + "; ".join(cells) + ".")
    if "rece_sd15_seconds" in data:
        threads = data.get("rece_sd15_threads")
        notes.append(f"RECE on an SD1.5-shaped text encoder and UNet (one concept, the template prompts"
                     f"{f', {threads} CPU threads, median of 3' if threads else ''}): {data['rece_sd15_seconds']:.1f} s.")
    return "\n".join(rows + ([""] + notes if notes else []))


def quantize_table() -> str:
    """Quantization: per method and bit setting, agreement with the full-precision samples, PSNR, FD, size, seconds;
    then QAT's time ratio and the int8 kernels' speed."""
    path = RESULTS / "quantize.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    rows = ["| method | bits | agreement [95% CI] | psnr (dB) | fd | UNet size (MB; fp32 in brackets) | seconds |",
            "|---|---|---|---|---|---|---|"]
    for method in ("ptq", "efficientdm", "qat"):
        for bits, r in data.get(method, {}).items():
            ci = f" [{r['agreement_ci'][0]:.2f}–{r['agreement_ci'][1]:.2f}]" if "agreement_ci" in r else ""
            rows.append(f"| {method} | {bits} | {r['agreement']:.3f}{ci} | {r['psnr']:.1f} | {r['fd']:.1f} | "
                        f"{r['size_bytes'] / 1e6:.2f} ({r['fp32_size_bytes'] / 1e6:.2f}) | {r['seconds']:.0f} |")
    notes = []
    if "qat_time_ratio" in data:
        reached = "reached" if data.get("qat_reached") else "did not reach (the cap is reported)"
        notes.append(f"qat_time_ratio {data['qat_time_ratio']:.2f}: QAT {reached} EfficientDM's W4A8 agreement; its "
                     "runs: " + ", ".join(f"{c['steps']} steps {c['seconds']:.0f} s {c['agreement']:.3f}"
                                         for c in data.get("qat_curve", [])) + ".")
    if "int8_speedup" in data:
        notes.append(f"int8 kernels (torchao, {data.get('threads', '?')} CPU threads) on an SD1.5-shaped UNet step: "
                     f"int8_speedup {data['int8_speedup']:.2f} ({data['fp32_step_seconds']:.2f} s -> "
                     f"{data['int8_step_seconds']:.2f} s), int8_linear_speedup {data['int8_linear_speedup']:.2f} "
                     f"({data['linear_layers']} Linear layers; convolutions stay float32).")
    if "int8_agreement" in data:
        r = data["int8_agreement"]
        notes.append(f"The W8A8 EfficientDM file on the int8 kernels: agreement {r['agreement_with_fake_quant']:.3f} "
                     f"with its fake-quantized run (PSNR {r['psnr_to_fake_quant']:.1f} dB), {r['agreement']:.3f} with "
                     "full precision.")
    return "\n".join(rows + ([""] + notes if notes else []))


if __name__ == "__main__":
    print(personalize_table())
    print()
    print(train_step_table())
    print()
    print(adapters_table())
    print()
    print(t2i_table())
    print()
    print(res_table())
    print()
    print(erase_table())
    print()
    print(quantize_table())
