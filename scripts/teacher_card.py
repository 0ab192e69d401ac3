"""The bundled teacher's model card, written by ``scripts/train_teacher.py`` from its ``training.json``:
what the model is, how every training stage ran (schedule, machine, load, the loss it reached), how it
scores, and the commands that rebuild the exact weights."""

from __future__ import annotations

import argparse
import itertools

from transformers import LlamaConfig


def load_note(s: dict) -> str:
    """The machine's load while training, where the run recorded it (a busy machine makes each step slower):
    the first run's, then each continuation's."""
    runs = [(first_run_steps(s), s)] + [(f"{stage_steps(c)}: ", c) for c in s.get("continued", [])]
    notes = [f"{head}{run['load_average'][0]:.1f} at the start, {run['load_average'][1]:.1f} at the end"
             for head, run in runs if run.get("load_average")]
    return f"; load average {'; '.join(notes)}" if notes else ""


def stage_steps(stage: dict) -> str:
    """``steps 2,001–4,000``: the steps a continuation stage took."""
    return f"steps {stage['first_step']:,}–{stage['first_step'] + stage['steps'] - 1:,}"


def first_run_steps(s: dict) -> str:
    """``steps 1–2,000: `` before the first run's note when continuations follow it; nothing otherwise."""
    stages = s.get("continued", [])
    return f"steps 1–{stages[0]['first_step'] - 1:,}: " if stages else ""


def machine_note(s: dict) -> str:
    """The machine of every stage, consecutive stages on the same kind of machine named once."""
    stages = s.get("continued", [])
    if all(c["machine"] == s["machine"] for c in stages):
        return s["machine"] + (", every stage" if stages else "")
    spans = [(1, stages[0]["first_step"] - 1, s["machine"])] + [
        (c["first_step"], c["first_step"] + c["steps"] - 1, c["machine"]) for c in stages]
    groups = [list(g) for _, g in itertools.groupby(spans, key=lambda span: span[2])]
    return "; ".join(f"steps {g[0][0]:,}–{g[-1][1]:,}: {g[0][2]}" for g in groups)


def schedule_note(args: argparse.Namespace, s: dict) -> str:
    """The learning-rate schedule of the first run and of every continuation after it."""
    first = f"linear warm-up {args.warmup} steps to {args.lr:g}, cosine to {args.lr * args.min_lr_ratio:g}"
    later = [f"{stage_steps(c)}: fresh AdamW moments, re-warm-up "
             f"{c['warmup']} steps to {c['lr']:g}, cosine to {c['lr'] * c['min_lr_ratio']:g}"
             for c in s.get("continued", [])]
    return "; then ".join([first_run_steps(s) + first, *later])


def plateau_note(s: dict) -> str:
    """How much the valid loss still fell at the end of training, and what each continuation gained on the
    whole valid split: the evidence for where training stopped."""
    history, stages = s["history"], s.get("continued", [])
    if len(history) < 3:
        return ""
    (a, b, c) = history[-3:]
    first = history[0]

    def fell(x: float, y: float) -> str:  # rounded first, so that a change below 0.0005 reads 0.000, not -0.000
        return f"{round(x - y, 3) + 0.0:.3f}"

    note = (f"Over the whole run the valid loss fell {fell(first['valid_loss'], c['valid_loss'])} nats after step "
            f"{first['step']}; over the last two intervals it fell {fell(a['valid_loss'], b['valid_loss'])} "
            f"(steps {a['step']}–{b['step']}) and {fell(b['valid_loss'], c['valid_loss'])} "
            f"(steps {b['step']}–{c['step']}) nats.")
    ends = [st["valid_loss_from"] for st in stages[1:]] + [s["valid"]["loss"]] if "valid" in s else []
    # Where each stage left the raw test split: where the next one started it, the last at the final score.
    raw_ends = [st.get("raw_test_loss_from") for st in stages[1:]] + [s.get("wikitext_raw_test", {}).get("loss")]
    for st, end, raw_end in zip(stages, ends, raw_ends):
        note += (f" Continuing for {stage_steps(st)} took the loss on "
                 f"the whole valid split from {st['valid_loss_from']:.4f} to {end:.4f} "
                 f"({end - st['valid_loss_from']:+.4f} nats, {(end - st['valid_loss_from']) * 1000 / st['steps']:+.4f} "
                 f"per 1,000 steps)")
        if (raw_start := st.get("raw_test_loss_from")) is not None and raw_end is not None:
            note += (f"; on the raw test split from {raw_start:.4f} to {raw_end:.4f} "
                     f"({(raw_end - raw_start) * 1000 / st['steps']:+.4f} per 1,000 steps)")
        note += "."
    return note + fit_note(s)


def fit_note(s: dict) -> str:
    """Training-batch loss against the valid blocks' loss over the last 1,000 steps of each stage: when
    the training text scores lower than held-out text, further passes over it mostly memorise it."""
    ends = [c["first_step"] - 1 for c in s.get("continued", [])] + [s["steps"]]
    gaps = []
    for end in ends:
        window = [h for h in s["history"] if end - 1000 < h["step"] <= end]
        if window:
            train = sum(h["train_loss"] for h in window) / len(window)
            valid = sum(h["valid_loss"] for h in window) / len(window)
            gaps.append(f"{train - valid:+.3f} at step {end:,}")
    if len(gaps) < 2:
        return ""
    return (" Mean training-batch loss minus mean valid loss (the table's two columns) over the last 1,000 "
            f"steps of each stage: {', '.join(gaps)}. A gap that falls while the valid loss stalls is the "
            "model fitting its own training text rather than text in general.")


def model_card(config: LlamaConfig, args: argparse.Namespace, s: dict, *, eos: str, pad: str) -> str:
    """The teacher's README: architecture, training (every stage), evaluation, the commands that rebuild it."""
    names = {"valid": "WikiText-2 valid (v1)", "wikitext_raw_test": "WikiText-2 raw test"}
    evaluation = "\n".join(
        f"| {title} | {m['articles']} | {m['tokens']:,} | {m['loss']:.4f} | {m['ppl']:.2f} | {m['word_ppl']:.2f} |"
        for key, title in names.items()
        if (m := s.get(key))
    )
    history = "\n".join(
        f"| {h['step']} | {h['train_loss']:.3f} | {h['valid_loss']:.3f} |" for h in s["history"]
    )
    emb = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return f"""---
license: cc-by-sa-3.0
language: en
library_name: transformers
pipeline_tag: text-generation
datasets: [wikitext]
---

# minitron bundled teacher: a {s['params'] / 1e6:.1f}M-parameter Llama trained on WikiText-2

A small `LlamaForCausalLM` trained from scratch on CPU so that `minitron quickstart`, the notebooks and
the tests can show the whole Minitron method (importance → prune → distill → evaluate) offline, without
the hub and without a GPU. It is a teaching model: it writes Wikipedia-flavoured English and nothing more.

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from minitron.assets import teacher_path

model = AutoModelForCausalLM.from_pretrained(teacher_path(), dtype=torch.float32)  # bf16 on disk
tokenizer = AutoTokenizer.from_pretrained(teacher_path())
```

## Architecture

| | |
|---|---|
| family | Llama (`LlamaForCausalLM`, stock transformers code) |
| parameters | {s['params']:,} ({emb:,} in embeddings, {s['params'] - emb:,} in the decoder) |
| hidden size | {config.hidden_size} |
| layers | {config.num_hidden_layers} |
| attention | {config.num_attention_heads} query heads × {config.head_dim}, {config.num_key_value_heads} KV heads (GQA {config.num_attention_heads // config.num_key_value_heads}:1, as Llama-3.1-8B's 32:8) |
| MLP | SwiGLU, {config.intermediate_size} ({config.intermediate_size / config.hidden_size:.2f} × hidden) |
| vocabulary | {config.vocab_size} byte-level BPE tokens (`tokenizers`, trained on the same text) |
| embeddings | {"tied" if config.tie_word_embeddings else "untied (input embedding and LM head separate, as Llama-3.1-8B)"} |
| context | {config.max_position_embeddings} tokens, RoPE θ = 10,000 |
| weights | {s.get('weights_dtype', 'float32')} safetensors (the evaluation below scores exactly these, computed in float32) |

Special tokens: `{eos}` (id {config.eos_token_id}) is both BOS and EOS and separates the packed articles
during training; `{pad}` (id {config.pad_token_id}) is padding only. No token is added automatically.

## Training

| | |
|---|---|
| data | WikiText-2 train (v1, detokenized with lm-eval's WikiText detokenizer; {s['train_tokens']:,} tokens with this tokenizer), articles joined with EOS, packed into blocks of {args.seq_len} |
| tokens seen | {s['tokens_seen']:,} ({s['epochs']} epochs) |
| steps | {s['steps']:,} × {args.batch} sequences × {args.seq_len} tokens |
| optimizer | AdamW (β = 0.9, 0.95; weight decay {args.weight_decay} on matrices), gradient clip {args.clip} |
| schedule | {schedule_note(args, s)} |
| seed | {s['seed']} |
| training time | {s['train_minutes']} min of wall time in optimizer steps ({s['train_minutes'] * 60 / s['steps']:.2f} s / step){load_note(s)} |
| machine | {machine_note(s)} — no GPU was available |
| software | torch {s['versions'].get('torch')}, transformers {s['versions'].get('transformers')} |

## Evaluation

Each article is scored alone, as lm-eval's `loglikelihood_rolling` scores it (its own window functions):
EOS as the first token's context, then disjoint windows of {args.seq_len} predicted tokens.

| text | articles | tokens | loss (nats / token) | token perplexity | word perplexity |
|---|---|---|---|---|---|
{evaluation}

- **WikiText-2 valid (v1)**: the valid split in the training text's form (detokenized, `<unk>` kept);
  `minitron/assets/data/wikitext-2/valid.jsonl.gz`. Not used for any choice during training except the
  32-block loss curve below{" and, by its whole-split loss, whether to train further (`continue`)" if s.get("continued") else ""}.
- **WikiText-2 raw test**: `wikitext-2-raw-v1` test (real words instead of `<unk>`), cut into articles and
  detokenized exactly as `minitron eval`'s `wikitext` task does (`minitron/assets/data/eval/wikitext-2-raw/`),
  so its word perplexity is the number the leaderboard shows for this teacher.
- Token perplexity depends on this tokenizer. Word perplexity divides the same total NLL by lm-eval's word
  count (whitespace split of the page before detokenization), as lm-eval's `word_perplexity` does.

Loss on the first 32 packed valid blocks during training:

| step | train loss | valid loss |
|---|---|---|
{history}

{plateau_note(s)}

## Reproduce

```bash
{chr(10).join([s['command'], *(c['command'] for c in s.get('continued', []))])}
```

{"These commands, run in order on" if s.get('continued') else "Same seed, same steps,"} the same kind of CPU with the same number of threads
(each stage's is under *machine* above) and the same library versions{"," if s.get('continued') else ""} give the same weights; a run stopped midway resumes from its checkpoint in
`runs/teacher-seed{s['seed']}/` (`runs/teacher-continue-<sha256 of the starting weights>/` for `continue`) when
started again.

## Data and license

Trained on **WikiText-2** (Stephen Merity, Caiming Xiong, James Bradbury, Richard Socher, "Pointer
Sentinel Mixture Models", 2016, arXiv:1609.07843), text from Wikipedia, licensed under
[CC BY-SA 3.0](https://creativecommons.org/licenses/by-sa/3.0/); these weights are released under the
same license to keep to its share-alike terms. The copy used is `minitron/assets/data/wikitext-2/` (see its
`SOURCE.md`; sha256 of the files read: {", ".join(f"`{k}` {h[:16]}…" for k, h in s['data_sha256'].items())}).
"""
