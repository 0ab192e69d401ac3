"""What ``minitron study`` writes: ``results.json`` (every number), ``study.md`` (tables and each finding stated
with its numbers, beside what the papers found) and ``plots/*.svg``.

The findings are worded from the numbers, never the other way round: each compares two measured losses and
says which is lower and by how much, and whether the gap exceeds the seed-to-seed spread where there is one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PAPER = "2407.14679"


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pm(spread: dict[str, Any]) -> str:
    return f"{spread['mean']:.3f} ± {spread['std']:.3f} (min {spread['min']:.3f}, max {spread['max']:.3f})"


def _loss(entry: dict[str, Any], key: str) -> float:
    value = entry[key]
    return value["mean"] if isinstance(value, dict) else value


def _compare(a: str, va: float, b: str, vb: float, noise: float | None = None) -> str:
    gap = vb - va
    lower = a if gap > 0 else b
    text = f"{lower} is lower by {abs(gap):.3f} nats ({a} {va:.3f}, {b} {vb:.3f})"
    if noise is not None:
        text += "; that is " + ("more" if abs(gap) > 2 * noise else "less") + f" than twice the seed spread ({noise:.3f})"
    return text


# --- the findings ---------------------------------------------------------------------------------------------


def importance_section(r: dict[str, Any], teacher_loss: float, steps: str) -> list[str]:
    lines = ["## 1. Importance: which units to keep (same width-pruned shape)", "",
             f"| method | held-out loss after pruning | after {steps} |", "|---|---|---|"]
    for name, entry in r.items():
        if name == "random":
            lines.append(f"| random (mean ± std over seeds) | {_pm(entry['pruned'])} | {_pm(entry['distilled'])} |")
        else:
            lines.append(f"| {name} | {_f(entry['pruned'])} | {_f(entry['distilled'])} |")
    lines += ["", f"Teacher: {teacher_loss:.3f}.", ""]
    activation = {k: v for k, v in r.items() if k.startswith("activation")}
    best = min(activation, key=lambda k: activation[k]["pruned"])
    default = next(iter(activation))
    rnd, noise = r["random"], r["random"]["distilled"]["std"]
    a, inv, mag = activation[default], r["inverted activation"], r["weight magnitude"]
    lines += [
        f"- **Activation vs random.** Right after pruning, {_compare(default, a['pruned'], 'random', rnd['pruned']['mean'], rnd['pruned']['std'])}. "
        f"After distillation, {_compare(default, a['distilled'], 'random', rnd['distilled']['mean'], noise)}.",
        f"- **Activation vs inverted** (keeping the least important units): after pruning "
        f"{_compare(default, a['pruned'], 'inverted', inv['pruned'])}; after distillation "
        f"{_compare(default, a['distilled'], 'inverted', inv['distilled'])}.",
        f"- **Activation vs weight magnitude**: after pruning {_compare(default, a['pruned'], 'magnitude', mag['pruned'])}; "
        f"after distillation {_compare(default, a['distilled'], 'magnitude', mag['distilled'])}.",
        f"- **Aggregation.** Lowest loss after pruning: {best} ({activation[best]['pruned']:.3f}); the default "
        f"{default} has {a['pruned']:.3f}; the four span "
        f"{max(v['pruned'] for v in activation.values()) - min(v['pruned'] for v in activation.values()):.3f} nats "
        f"after pruning and {max(v['distilled'] for v in activation.values()) - min(v['distilled'] for v in activation.values()):.3f} "
        f"after distillation. {PAPER} (Table 2) found batch L2 with sequence mean best for width.",
        "",
    ]
    return lines


def depth_section(r: dict[str, Any], n_drop: int, steps: str) -> list[str]:
    lines = [f"## 2. Depth: which {n_drop} layers to drop", "",
             f"| strategy | layers dropped | held-out loss after pruning | after {steps} |", "|---|---|---|---|"]
    for name, entry in r.items():
        if name == "random":
            drops = "; ".join(",".join(map(str, d)) for d in entry["dropped_layers"])
            lines.append(f"| random (mean ± std) | {drops} | {_pm(entry['pruned'])} | {_pm(entry['distilled'])} |")
        else:
            lines.append(f"| {name} | {','.join(map(str, entry['dropped_layers']))} | {_f(entry['pruned'])} | "
                         f"{_f(entry['distilled'])} |")
    named = {k: v for k, v in r.items() if k != "random"}
    best = min(named, key=lambda k: named[k]["distilled"])
    worst = max(named, key=lambda k: named[k]["distilled"])
    if len({tuple(v["dropped_layers"]) for v in named.values()}) == 1:
        first = f"- **All three strategies drop the same layers** ({named[best]['distilled']:.3f} after distillation)"
    else:
        first = (f"- **Best after distillation: {best}** ({named[best]['distilled']:.3f}); worst named strategy {worst} "
                 f"({named[worst]['distilled']:.3f}). Right after pruning the order is "
                 f"{', '.join(sorted(named, key=lambda k: named[k]['pruned']))}")
    lines += ["", first + f"; random layers: {_pm(r['random']['distilled'])}. {PAPER} found the LM-loss signal and a "
              "contiguous block better than block importance (1 − cos) for Llama-3.1.", ""]
    return lines


def width_depth_section(r: dict[str, Any], tokens: int) -> list[str]:
    w, d = r["width"], r["depth"]
    lines = ["## 3. Width vs depth at equal parameters and equal distillation tokens", "",
             "| student | shape | params | after pruning | after distillation (mean ± std over seeds) |", "|---|---|---|---|---|"]
    for name, e in (("width", w), ("depth", d)):
        s = e["shape"]
        shape = f"hidden {s['hidden']}, MLP {s['ffn']}, {s['layers']} layers"
        lines.append(f"| {name} | {shape} | {e['params']:,} | {e['pruned']:.3f} | {_pm(e['distilled'])} |")
    noise = max(w["distilled"]["std"], d["distilled"]["std"])
    lines += ["", f"- After {tokens:,} distillation tokens, "
              f"{_compare('width', w['distilled']['mean'], 'depth', d['distilled']['mean'], noise)} (depth drops layers "
              f"{','.join(map(str, d['dropped_layers']))}, the best strategy of §2: {r['depth_strategy']}). {PAPER} found "
              "width pruning better than depth after retraining (Llama-3.1-Minitron-4B: width MMLU 60.5 vs depth 58.7).",
              ""]
    return lines


def retraining_section(r: dict[str, Any]) -> list[str]:
    curves, p = r["curves"], r["parity"]
    lines = ["## 4. Retraining: distillation vs conventional training vs from scratch", "",
             "| run | tokens | held-out loss at the end |", "|---|---|---|"]
    for name, curve in curves.items():
        lines.append(f"| {name} | {curve[-1][0]:,} | {curve[-1][1]:.3f} |")
    kd, lm, both = (curves[k][-1][1] for k in ("pruned + kd", "pruned + lm", "pruned + kd+lm"))
    lines += ["", f"- **KD vs LM loss** on the same pruned student and tokens: {_compare('KD', kd, 'LM', lm)}; KD + LM "
              f"{both:.3f}. {PAPER} found KD alone better than LM loss and no gain from adding it.",
              "- Held-out loss is the LM loss, the quantity the LM-loss run optimises directly; KD wins on it only by "
              "transferring the teacher's knowledge."]
    if p.get("how") == "measured":
        lines.append(f"- **Tokens to parity: {p['ratio']:.1f}×.** The scratch model reaches the KD student's "
                     f"{p['kd_loss']:.3f} after {p['scratch_tokens']:,.0f} tokens; KD needed {p['kd_tokens']:,} (measured).")
    elif p.get("ratio") is not None:
        lines.append(f"- **Tokens to parity: ~{p['ratio']:.0f}× ({p['how']}).** The scratch model did not reach the KD "
                     f"student's {p['kd_loss']:.3f} in the {p['scratch_trained_tokens']:,} tokens it trained ({p['ratio_at_least']:.0f}× "
                     f"KD's {p['kd_tokens']:,}; it ended at {p['scratch_final_loss']:.3f}); its curve extrapolates to "
                     f"{p['scratch_tokens']:,.0f} tokens. An extrapolation, not a measurement.")
    else:
        lines.append(f"- **Tokens to parity: more than {p['ratio_at_least']:.0f}×** ({p['how']}); the scratch model ended "
                     f"at {p['scratch_final_loss']:.3f} against KD's {p['kd_loss']:.3f}.")
    lines += [f"- {PAPER} reports up to 40× fewer training tokens than training from scratch; the goal here is ≥ 10×.", ""]
    return lines


def search_section(r: dict[str, Any]) -> list[str]:
    seeds = len(r["after"])
    header = "| candidate | params | rank (loss) after pruning | " + " | ".join(
        f"rank (loss) after {r['search_steps']} steps, seed {i}" for i in range(seeds)) + " |"
    lines = ["## 5. Search with retraining: do the top candidates change places?", "", header,
             "|---|---|---|" + "---|" * seeds]
    for c in r["candidates"]:
        n = c["name"]
        cells = [f"{a[n]['rank']} ({a[n]['loss']:.3f})" for a in r["after"]]
        lines.append(f"| {n} | {c['params']:,} | {r['before'][n]['rank']} ({r['before'][n]['loss']:.3f}) | " + " | ".join(cells) + " |")
    changed = sum(r["top_changed"])
    moved = sum(a[n]["rank"] != r["before"][n]["rank"] for a in r["after"] for n in a)
    lines += ["", f"- The first-ranked candidate changed after retraining in {changed} of {seeds} seeds; "
              f"{moved} of {seeds * len(r['candidates'])} (candidate, seed) ranks moved. {PAPER} found the ranking "
              "right after pruning unreliable and stable after ~300 steps of retraining.", ""]
    return lines


def markdown(record: dict[str, Any]) -> str:
    r, s, t = record["results"], record["settings"], record["teacher"]
    steps = f"{s['steps']} KD steps ({s['steps'] * s['batch'] * s['seq_len']:,} tokens)"
    m = record["machine"]
    lines = [
        "# minitron study", "",
        f"Teacher `{t['path']}` ({t['params']:,} parameters; {t['shape']['layers']} layers, hidden {t['shape']['hidden']}, "
        f"MLP {t['shape']['ffn']}), text: {record['text']}. Every loss is the mean next-token cross entropy (nats) on "
        f"{s['heldout']} held-out blocks of {s['seq_len']} tokens; lower is better. Width student: hidden "
        f"{record['shapes']['width']['hidden']}, MLP {record['shapes']['width']['ffn']} ({record['shapes']['width_params']:,} "
        f"parameters); depth student: {record['shapes']['depth']['layers']} layers ({record['shapes']['depth_params']:,}). "
        f"Distillation: forward KL on logits, AdamW at a constant {s['lr']}, batch {s['batch']} × {s['seq_len']} tokens; "
        f"seeds {', '.join(map(str, record['seeds']))}. Importance calibration: {s['calib']} blocks of {s['seq_len']} tokens "
        f"from the train documents. Training text: {record['train_blocks']:,} blocks from the train "
        f"documents{' (no run reads one twice)' if record['train_blocks'] >= record['longest_run_blocks'] else ', repeated by the longer runs'}.",
        "",
        f"Ran in {record['timing']['total_s'] / 60:.1f} min wall, {record['timing'].get('cpu_s', 0) / 60:.1f} min of CPU "
        f"time ({record['timing']['training_steps']:,} training steps) on "
        f"{m['platform']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch thread(s) in each of "
        f"{m.get('workers', 1)} process(es); load average "
        f"{m['load_average_start'][0]:.1f} at the start, {m['load_average_end'][0]:.1f} at the end"
        + (" (`--quick`: sizes for a smoke test, not findings)." if record["quick"] else "."),
        "",
    ]
    lines += importance_section(r["importance"], r["teacher_loss"], steps)
    lines += depth_section(r["depth"], t["shape"]["layers"] - record["shapes"]["depth"]["layers"], steps)
    lines += width_depth_section(r["width_vs_depth"], s["steps"] * s["batch"] * s["seq_len"])
    lines += retraining_section(r["retraining"])
    lines += search_section(r["search"])
    lines += ["## Plots", "", "![importance](plots/importance.svg)", "", "![depth](plots/depth.svg)", "",
              "![retraining](plots/retraining.svg)", "", "![search](plots/search.svg)", ""]
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------------------


def _bars(r: dict[str, Any], teacher_loss: float, title: str) -> str:
    from minitron.report_plots import figure, svg

    names = list(r)
    fig = figure(7.5, 0.9 + 0.45 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    for k, (key, colour, label) in enumerate((("pruned", "#bbbbbb", "after pruning"), ("distilled", "#d9541e", "after distillation"))):
        ys = [i + (k - 0.5) * 0.38 for i in range(len(names))]
        values = [_loss(r[n], key) for n in names]
        errors = [r[n][key]["std"] if isinstance(r[n][key], dict) else 0 for n in names]
        ax.barh(ys, values, 0.38, color=colour, label=label, xerr=errors, error_kw={"lw": 1, "capsize": 2})
        for y, v in zip(ys, values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
    ax.axvline(teacher_loss, color="#1f4e9a", ls="--", lw=1, label=f"teacher {teacher_loss:.2f}")
    # The differences are tenths of a nat on a loss of ~5: an axis from 0 would hide them (the teacher's line anchors).
    low = min(min(_loss(r[n], k) for n in names for k in ("pruned", "distilled")), teacher_loss)
    ax.set_xlim(left=max(0.0, low - 0.3))
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("held-out LM loss (nats, lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return svg(fig)


def plot_retraining(r: dict[str, Any]) -> str:
    from minitron.report_plots import figure, svg

    fig = figure(6.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in r["curves"].items():
        pts = [(t, v) for t, v in curve if t > 0]
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", ms=3, label=name)
    p = r["parity"]
    ax.axhline(p["kd_loss"], color="#444444", ls=":", lw=0.9, label="KD student's final loss")
    if p.get("scratch_tokens"):
        ax.axvline(p["scratch_tokens"], color="#aa3333", ls="--", lw=0.9,
                   label=f"scratch reaches it ({p['how'].split(' (')[0]}): {p['ratio']:.1f}×")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out LM loss (nats)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return svg(fig)


def plot_search(r: dict[str, Any]) -> str:
    from minitron.report_plots import figure, svg

    fig = figure(5.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    for i, c in enumerate(r["candidates"]):
        n = c["name"]
        for k, after in enumerate(r["after"]):
            ax.plot([0, 1], [r["before"][n]["rank"], after[n]["rank"]], color=f"C{i}", alpha=0.8, marker="o",
                    label=n if k == 0 else None)
    ax.set_xticks([0, 1], ["after pruning", f"after {r['search_steps']} steps"])
    ax.set_ylabel("rank (1 = lowest held-out loss)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    return svg(fig)


def write(record: dict[str, Any], folder: Path) -> None:
    import matplotlib.pyplot as plt

    r = record["results"]
    (folder / "plots").mkdir()
    plots = {
        "importance": _bars(r["importance"], r["teacher_loss"], "Importance: the same width-pruned shape"),
        "depth": _bars({k: v for k, v in r["depth"].items()}, r["teacher_loss"], "Depth: the same layer count"),
        "retraining": plot_retraining(r["retraining"]),
        "search": plot_search(r["search"]),
    }
    plt.close("all")
    for name, svg in plots.items():
        (folder / "plots" / f"{name}.svg").write_text(svg, encoding="utf-8")
    (folder / "results.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (folder / "study.md").write_text(markdown(record), encoding="utf-8")
