"""Print the README's benchmark tables from benchmarks/results/*.json (so the README quotes the files).

Example:
    $ python benchmarks/tables.py
"""

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def personalize_table() -> str:
    data = json.loads((RESULTS / "personalize.json").read_text())
    rows = ["| method | fidelity | composition | preservation | trainable params | train seconds | lr |", "|---|---|---|---|---|---|---|"]
    for method, r in data.items():
        if method == "base":
            continue
        rows.append(f"| {method} | {r['fidelity']:.2f} | {r['composition']:.2f} | {r['preservation']:+.3f} | "
                    f"{r['trainable_params']:,} | {r['train_seconds']:.0f} | {r['learning_rate']:g} |")
    base = data["base"]
    rows.append(f"| (base model) | {base['fidelity']:.2f} | — | accuracy {base['accuracy']:.3f} | — | — | — |")
    return "\n".join(rows)


def train_step_table() -> str:
    data = json.loads((RESULTS / "train-step.json").read_text())
    models = [m for m in ("toy", "sd15") if m in data["floor"]]
    head = "| entry | " + " | ".join(f"{m} s/step | {m} × floor | {m} peak MB" for m in models) + " | speedup vs PEFT (toy / sd15) |"
    rows = [head, "|" + "---|" * (1 + 3 * len(models) + 1)]
    for entry, per_model in data.items():
        if entry == "setup":
            continue
        cells = []
        for m in models:
            r = per_model[m]
            cells.append(f"{r['seconds']:.3f} | {r['ratio_to_floor']:.2f} | {r['peak_memory_mb']:,.0f}")
        speedup = " / ".join(str(per_model[m].get("speedup_vs_peft", "—")) for m in models)
        rows.append(f"| {entry} | " + " | ".join(cells) + f" | {speedup} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(personalize_table())
    print()
    print(train_step_table())
