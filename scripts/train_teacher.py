"""Train the small Llama teacher that ships in ``minitron/assets/teacher``, reproducibly from a seed.

    python scripts/train_teacher.py prepare --wikitext ../shared/data/wikitext-2   # once: the shipped text
    python scripts/train_teacher.py train --seed 0 --steps 900 --out minitron/assets/teacher --overwrite
    python scripts/train_teacher.py continue --steps 1000 --out minitron/assets/teacher --overwrite   # further

``prepare`` turns WikiText-2 (tokenized v1: ``train.txt``, ``valid.txt``) into the article files shipped in
``minitron/assets/data/wikitext-2/{train,valid}.jsonl.gz``: one record per article, ``text`` detokenized
with lm-eval's own WikiText detokenizer, so the teacher reads text in the form lm-eval's ``wikitext``
task scores (``word, word`` rather than ``word , word``), plus ``words``, lm-eval's word count of the page.

``train``, top to bottom:
1. trains a byte-level BPE tokenizer on the train articles with ``tokenizers`` and wraps it as a
   ``PreTrainedTokenizerFast`` (``AutoTokenizer.from_pretrained`` loads it);
2. trains a ``LlamaForCausalLM`` from scratch on the articles joined with EOS, packed into fixed blocks,
   with AdamW and a linear-warm-up cosine schedule, on one CPU thread;
3. scores all of WikiText-2 valid the way lm-eval's ``loglikelihood_rolling`` does (per article, EOS
   prefix, disjoint windows of the context length) and writes the checkpoint, its generation config, the
   tokenizer, ``training.json`` and a model card into ``--out`` (atomically: all or nothing).

The length of the run is ``--steps``, or, without it, as many steps as fit in ``--minutes`` at the speed
measured over the first steps (the card then records the resolved ``--steps`` so that anyone can repeat
the exact run). A checkpoint with the optimizer state is written to ``--work`` every ``--eval-every``
steps; running the same command again resumes from it and gives the same weights as an uninterrupted run.

``continue`` trains a finished teacher further (``--from``, default the shipped one): its shipped weights and
tokenizer, the batches its run would have read next, the same batch and AdamW settings with fresh moments, a
short re-warm-up and a new cosine. ``training.json`` and the card add the stage to the totals (steps, tokens,
epochs, minutes, the loss curve) and list every command in order, so the final weights can be rebuilt.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import TextColumn
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from minitron.artifacts import atomic_dir, atomic_file, check_output_dir, versions
from minitron.errors import UserError, run_script
from minitron.report_console import progress

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the model card beside this script
from teacher_card import model_card

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "minitron" / "assets" / "data" / "wikitext-2"
TEACHER = REPO / "minitron" / "assets" / "teacher"
RAW_TEST = REPO / "minitron" / "assets" / "data" / "eval" / "wikitext-2-raw" / "wiki.test.raw"
EOS, PAD = "<|endoftext|>", "<|pad|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
console = Console(stderr=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)

    prep = sub.add_parser("prepare", help="WikiText-2 v1 text files → the shipped article files")
    prep.add_argument("--wikitext", type=Path, required=True, help="folder with train.txt and valid.txt")
    prep.add_argument("--out", type=Path, default=DATA, help="where to write {train,valid}.jsonl.gz")

    t = sub.add_parser("train", help="train tokenizer + teacher, evaluate, write the checkpoint")
    t.add_argument("--out", type=Path, required=True, help="folder for the finished teacher (written at the end)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    t.add_argument("--work", type=Path, default=None, help="checkpoint folder for resuming (default runs/teacher-seed<N>)")
    t.add_argument("--train", type=Path, default=DATA / "train.jsonl.gz", help="train articles (from prepare)")
    t.add_argument("--valid", type=Path, default=DATA / "valid.jsonl.gz", help="valid articles (from prepare)")
    t.add_argument("--max-articles", type=int, default=None, help="use only the first N train articles (smoke runs)")
    t.add_argument("--valid-articles", type=int, default=None, help="score only the first N valid articles")
    t.add_argument("--raw-test", type=Path, default=RAW_TEST, help="wikitext-2-raw test file scored for the card")
    t.add_argument("--test-articles", type=int, default=None, help="score only the first N raw test articles")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None, help="optimizer steps; default: as many as fit in --minutes")
    t.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget used when --steps is not given")
    t.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the build machine is shared)")
    # Shape: ~10.5M parameters, so that the bf16 weights stay under 30 MB and a 2x width prune, a few
    # hundred distillation steps and the evaluation of teacher and students fit in 10 minutes on 2 CPU cores.
    t.add_argument("--vocab", type=int, default=4096)
    t.add_argument("--hidden", type=int, default=320)
    t.add_argument("--layers", type=int, default=8)
    t.add_argument("--heads", type=int, default=10)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--ffn", type=int, default=768)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--tie-embeddings", action="store_true", help="share input embedding and LM head")
    t.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="dtype of the shipped weights (scored after rounding to it)")
    # Optimisation.
    t.add_argument("--batch", type=int, default=8, help="sequences per step")
    t.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    t.add_argument("--eval-every", type=int, default=100, help="steps between validation + checkpoint")

    c = sub.add_parser("continue", help="train a finished teacher further, reading on in its run's data order")
    c.add_argument("--from", dest="source", type=Path, default=TEACHER,
                   help="finished teacher folder (from train or continue); default the shipped one")
    c.add_argument("--out", type=Path, required=True, help="folder for the continued teacher (may be --from)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    c.add_argument("--work", type=Path, default=None,
                   help="checkpoint folder for resuming (default runs/teacher-continue-<first 12 of --from's sha256>)")
    c.add_argument("--steps", type=int, required=True, help="optimizer steps to add")
    c.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the re-warm-up")
    c.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr")
    c.add_argument("--warmup", type=int, default=50, help="linear re-warm-up steps (the optimizer moments start fresh)")
    c.add_argument("--threads", type=int, default=1, help="torch intra-op threads (part of what fixes the weights)")
    c.add_argument("--eval-every", type=int, default=100, help="steps between validation + checkpoint")

    r = sub.add_parser("rescore", help="score a finished --out again and rewrite its training.json and card")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--valid", type=Path, default=DATA / "valid.jsonl.gz")
    r.add_argument("--raw-test", type=Path, default=RAW_TEST)
    r.add_argument("--test-articles", type=int, default=None)
    r.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def split_articles(text: str) -> list[str]:
    """WikiText lines ' = Title = ' start an article; ' = = Section = = ' lines stay inside it."""
    return [a for a in re.split(r"(?m)^(?= = [^=].* = $)", text) if a.strip()]


def prepare(wikitext: Path, out: Path) -> None:
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    for split in ("train", "valid"):
        src = wikitext / f"{split}.txt"
        if not src.is_file():
            raise UserError("not found", where=str(src), fix="pass --wikitext, the folder of WikiText-2 v1 train.txt / valid.txt")
        articles = split_articles(src.read_text(encoding="utf-8"))
        records = [
            {
                "title": a.strip().splitlines()[0].strip(" ="),
                "text": wikitext_detokenizer({"page": a}),
                # lm-eval's word count (whitespace split of the page before detokenization).
                "words": len(re.split(r"\s+", a)),
            }
            for a in articles
        ]
        with atomic_file(out / f"{split}.jsonl.gz", overwrite=True) as tmp, tmp.open("wb") as raw:
            # mtime=0 and no file name in the header: the same input gives byte-identical output.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
                for r in records:
                    gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
            readable(tmp)
        console.log(f"{src} ({sha256(src)[:16]}…) → {out / f'{split}.jsonl.gz'}: {len(records)} articles")


def read_articles(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError("not found", where=str(path), fix="run `prepare` first or pass --train / --valid")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2 / Llama-3): lossless on any text, so no <unk> token is needed."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # One token both opens and closes documents (GPT-2 convention): the model only ever sees it as the
    # separator between packed articles, which is also the prefix lm-eval puts before a rolling window.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """EOS a1 EOS a2 EOS ...: the leading EOS gives the first article's first token a context too."""
    ids = [tokenizer.eos_token_id]
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[n, seq_len + 1] blocks overlapping by one token, so every token after the first is a target once."""
    n = (len(stream) - 1) // seq_len
    return stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)


def batch_for(step: int, blocks: torch.Tensor, batch: int, seed: int) -> torch.Tensor:
    """The blocks of optimizer step ``step``: a fresh seeded permutation per epoch, a pure function of the
    step, so that a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = len(blocks) // batch
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return blocks[perm[i * batch : (i + 1) * batch]]


# ---------------------------------------------------------------- model and schedule


def teacher_config(args: argparse.Namespace, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        # lm-eval reads this as the longest window: keep it at the length the model was trained on.
        max_position_embeddings=args.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=args.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress_ = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress_))


def next_token_nll(model, x: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of blocks ``x`` [B, T+1] (inputs x[:, :-1], targets x[:, 1:])."""
    logits = model(input_ids=x[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum")


@torch.no_grad()
def block_loss(model, blocks: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token loss over packed blocks: the quick check during training."""
    model.eval()
    total = sum(next_token_nll(model, blocks[i : i + batch]).item() for i in range(0, len(blocks), batch))
    model.train()
    return total / blocks[:, 1:].numel()


@torch.no_grad()
def rolling_nll(model, tokenizer, texts: list[str], seq_len: int, batch: int = 16) -> dict:
    """Total NLL of each text scored as lm-eval's ``loglikelihood_rolling`` scores it: the text alone,
    EOS as the prefix of its first token, then disjoint windows of ``seq_len`` predictions, each with as
    much preceding context as fits. Using lm-eval's own window functions keeps the card's numbers the
    ones ``minitron eval`` reports for the same text."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = []  # (text index, input ids, number of scored positions at the end)
    for n, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        for pair in get_rolling_token_windows(ids, tokenizer.eos_token_id, seq_len, context_len=1):
            context, target = make_disjoint_window(pair)
            windows.append((n, (context + target)[:-1], target))
    nll = [0.0] * len(texts)
    tokens = sum(len(t) for _, _, t in windows)
    model.eval()
    with progress(transient=True) as bar:
        task = bar.add_task("score WikiText-2 valid", total=tokens)
        for i in range(0, len(windows), batch):
            chunk = windows[i : i + batch]
            width = max(len(x) for _, x, _ in chunk)
            # Right padding: a causal model's earlier positions never see the pad on their right.
            x = torch.full((len(chunk), width), tokenizer.pad_token_id)
            for row, (_, inp, _) in enumerate(chunk):
                x[row, : len(inp)] = torch.tensor(inp)
            logprobs = model(input_ids=x).logits.float().log_softmax(-1)
            for row, (n, inp, target) in enumerate(chunk):
                scored = logprobs[row, len(inp) - len(target) : len(inp)]
                nll[n] -= scored.gather(-1, torch.tensor(target)[:, None]).sum().item()
                bar.advance(task, len(target))
    model.train()
    return {"nll": nll, "tokens": tokens}


# ---------------------------------------------------------------- checkpoint (resume)


def save_checkpoint(work: Path, model, optimizer, state: dict) -> None:
    with atomic_dir(work / "last", overwrite=True) as tmp:
        model.save_pretrained(tmp)
        # Optimizer moments are plain tensors and numbers: loaded back with weights_only=True.
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))


def load_checkpoint(work: Path, model, optimizer, fingerprint: dict) -> dict | None:
    last = work / "last"
    if not (last / "state.json").is_file():
        return None
    state = json.loads((last / "state.json").read_text())
    if state["config"] != fingerprint:  # before touching weights of another shape
        raise UserError("was trained with other settings", where=str(last), fix="delete it or pass another --work")
    model.load_state_dict(load_file(last / "model.safetensors"), strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
    return state


# ---------------------------------------------------------------- training


def run(args: argparse.Namespace) -> dict:
    check_output_dir(args.out, args.overwrite)  # before any expensive work
    hf_logging.disable_progress_bar()  # ours is the only progress display
    torch.set_num_threads(args.threads)
    work = args.work or REPO / "runs" / f"teacher-seed{args.seed}"
    started = time.time()
    load_at_start = os.getloadavg()[0]

    train_texts = [r["text"] for r in read_articles(args.train)][: args.max_articles]
    tokenizer = train_tokenizer(train_texts, args.vocab)
    data = TrainData(args, tokenizer, train_texts)
    if len(data.blocks) < args.batch:
        raise UserError(f"only {len(data.blocks)} train blocks for --batch {args.batch}", where="--max-articles",
                        fix="use more articles")

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(teacher_config(args, tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    state = start_or_resume(work, model, optimizer, config_fingerprint(args), args.steps)
    train_steps(model, optimizer, state, data, schedule=args, work=work, eval_every=args.eval_every,
                minutes=args.minutes)

    summary = {
        "load_average": [load_at_start, os.getloadavg()[0]],
        "seed": args.seed,
        "steps": state["total"],
        "tokens_seen": state["total"] * args.batch * args.seq_len,
        "train_tokens": len(data.stream),
        "epochs": data.epochs(state["total"]),
        "train_minutes": round(state["train_seconds"] / 60, 1),
        "first_loss": state["first_loss"],
        "params": sum(p.numel() for p in model.parameters()),
        "history": state["history"],
        "machine": machine(args.threads),
        "versions": versions(),
        "command": reproduce_command(args, state["total"]),
        "data_sha256": {p.name: sha256(p) for p in (args.train, args.valid)},
    }
    return finish(model, tokenizer, summary, args, data.valid, out=args.out, overwrite=args.overwrite,
                  started=started)


class TrainData:
    """The packed train blocks of a run, its valid articles and the 32-block quick check, for one tokenizer."""

    def __init__(self, args: argparse.Namespace, tokenizer, train_texts: list[str] | None = None):
        if train_texts is None:
            train_texts = [r["text"] for r in read_articles(args.train)][: args.max_articles]
        self.args = args
        self.stream = token_stream(tokenizer, train_texts)
        self.blocks = pack(self.stream, args.seq_len)
        self.valid = read_articles(args.valid)[: args.valid_articles]
        # The quick check during training: the first 32 packed blocks of valid (8k tokens at 256).
        self.quick_valid = pack(token_stream(tokenizer, [r["text"] for r in self.valid]), args.seq_len)[:32]
        console.log(f"{len(train_texts)} train articles → {len(self.stream):,} tokens, {len(self.blocks)} blocks "
                    f"of {args.seq_len}")

    def batch(self, step: int) -> torch.Tensor:
        return batch_for(step, self.blocks, self.args.batch, self.args.seed)

    def epochs(self, steps: int) -> float:
        return round(steps * self.args.batch / len(self.blocks), 3)


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Norm gains are not decayed (they set scales, not features), as in GPT-2 / Llama training.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )


def start_or_resume(work: Path, model, optimizer, fingerprint: dict, total: int | None) -> dict:
    """The run's state: from the checkpoint in ``work`` (weights and moments loaded into ``model`` and
    ``optimizer``) when one of the same settings is there, else a new run of ``total`` steps."""
    state = load_checkpoint(work, model, optimizer, fingerprint)
    if state is not None:
        console.log(f"resuming from {work / 'last'} at step {state['step']} of {state['total']}")
        return state
    return {"step": 0, "total": total, "train_seconds": 0.0, "first_loss": None, "history": [], "config": fingerprint}


def train_steps(model, optimizer, state: dict, data: TrainData, *, schedule: argparse.Namespace, work: Path,
                eval_every: int, minutes: float | None = None, offset: int = 0) -> None:
    """Optimizer steps ``state["step"]`` .. ``state["total"]`` of a run whose first step reads batch ``offset``
    of the data order (0 for a new teacher; the steps already taken for a continued one). The learning rate
    follows ``schedule`` (lr, warmup, min_lr_ratio) over this run's own steps. Every ``eval_every`` steps the
    quick valid loss joins ``state["history"]`` and a checkpoint is written to ``work``."""
    loss_col = TextColumn("loss {task.fields[loss]:.3f}  lr {task.fields[lr]:.2e}")
    clip = data.args.clip
    model.train()
    step_times: list[float] = []
    with progress(loss_col) as bar:
        task = bar.add_task("train teacher", total=state["total"], completed=state["step"], loss=float("nan"), lr=0.0)
        while state["total"] is None or state["step"] < state["total"]:
            step, t0 = state["step"], time.time()
            lr = lr_at(step, state["total"] or 10**9, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = data.batch(offset + step)
            loss = next_token_nll(model, x) / x[:, 1:].numel()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            # Stop on a blow-up instead of silently training NaNs into the checkpoint.
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                raise UserError(f"non-finite loss or gradient at step {offset + step}", where="--lr", fix="lower --lr")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            state["step"] += 1
            state["train_seconds"] += time.time() - t0
            if state["first_loss"] is None:
                state["first_loss"] = loss.item()
            step_times.append(time.time() - t0)
            if state["total"] is None and len(step_times) == 12:
                # Steps 3..12 (the first ones pay for allocator warm-up) set the run length for the budget.
                per_step = sum(step_times[2:]) / 10
                state["total"] = max(state["step"], int(minutes * 60 / per_step))
                console.log(f"{per_step:.2f} s/step → {state['total']} steps fit in {minutes:g} min")
                bar.update(task, total=state["total"])
            bar.update(task, advance=1, loss=loss.item(), lr=lr)

            if state["step"] % eval_every == 0 or state["step"] == state["total"]:
                val = block_loss(model, data.quick_valid)
                state["history"].append({"step": offset + state["step"], "train_loss": round(loss.item(), 4),
                                         "valid_loss": round(val, 4)})
                console.log(f"step {offset + state['step']}/{offset + state['total']}  train {loss.item():.3f}  "
                            f"valid(32 blocks) {val:.3f}  {state['train_seconds'] / 60:.1f} min")
                save_checkpoint(work, model, optimizer, state)


def finish(model, tokenizer, summary: dict, args: argparse.Namespace, valid: list[dict], *, out: Path,
           overwrite: bool, started: float, tokenizer_from: Path | None = None) -> dict:
    """Score exactly what ships (the weights rounded to --save-dtype, computed in float32 on the CPU) and
    write checkpoint, tokenizer, training.json and card into ``out``, all or nothing. ``args`` are the
    settings of the run that made the teacher (the card describes its shape and first schedule)."""
    shipped = getattr(torch, args.save_dtype)
    model = model.to(shipped).float().eval()
    summary["weights_dtype"] = args.save_dtype
    summary.update(perplexities(model, tokenizer, valid, args.raw_test, args.test_articles))
    summary["wall_minutes_this_process"] = round((time.time() - started) / 60, 1)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.to(shipped).save_pretrained(tmp)
        if tokenizer_from is None:
            tokenizer.save_pretrained(tmp)
        else:  # unchanged: copied byte for byte (a loaded tokenizer saves its load options into its config)
            for name in TOKENIZER_FILES:
                shutil.copyfile(tokenizer_from / name, tmp / name)
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(model.config, args, summary, eos=EOS, pad=PAD))
        readable(tmp)
    report(out, summary)
    return summary


def continue_training(args: argparse.Namespace) -> dict:
    """Train a finished teacher further: its weights as shipped and its tokenizer, the batches its run would
    have read next (``batch_for`` at the steps after its last), its batch, AdamW settings and clip, fresh
    optimizer moments, a linear re-warm-up to ``--lr`` and a cosine down to ``--min-lr-ratio`` of it (the
    usual way to extend a finished cosine run). The result records every stage's command, so the shipped
    teacher is reproduced by running them in order."""
    check_output_dir(args.out, args.overwrite)  # before any expensive work
    base_json = args.source / "training.json"
    if not base_json.is_file():
        raise UserError("not found", where=str(base_json), fix="--from must be a teacher written by `train` or `continue`")
    base = json.loads(base_json.read_text())
    original = parse_args(shlex.split(base["command"])[2:])  # the settings the teacher was first trained with
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started = time.time()
    load_at_start = os.getloadavg()[0]
    changed = [p.name for p in (original.train, original.valid) if sha256(p) != base["data_sha256"].get(p.name)]
    if changed:
        raise UserError(f"{', '.join(changed)} differ from the text {args.source} was trained on",
                        where=str(original.train.parent), fix="restore the shipped data files")

    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.source)
    model = LlamaForCausalLM.from_pretrained(args.source, dtype=torch.float32)
    data = TrainData(original, tokenizer)
    optimizer = make_optimizer(model, args.lr, original.weight_decay)
    fingerprint = {"from": sha256(args.source / "model.safetensors"), **config_fingerprint(args)}
    # One folder per starting point: the stages of a teacher, run one after the other, never meet each other's.
    work = args.work or REPO / "runs" / f"teacher-continue-{fingerprint['from'][:12]}"
    state = start_or_resume(work, model, optimizer, fingerprint, args.steps)
    offset = base["steps"]
    train_steps(model, optimizer, state, data, schedule=args, work=work, eval_every=args.eval_every, offset=offset)

    stage = {
        "command": continue_command(args, state["total"]),
        "from_sha256": fingerprint["from"],
        "first_step": offset + 1,
        "valid_loss_from": base["valid"]["loss"],  # the whole valid split, before this stage
        "raw_test_loss_from": base.get("wikitext_raw_test", {}).get("loss"),  # WikiText-2 raw test, likewise
        "steps": state["total"],
        "lr": args.lr, "warmup": args.warmup, "min_lr_ratio": args.min_lr_ratio,
        "train_minutes": round(state["train_seconds"] / 60, 1),
        "machine": machine(args.threads),
        "load_average": [load_at_start, os.getloadavg()[0]],
        "versions": versions(),
    }
    total = offset + state["total"]
    summary = {
        **base,
        "steps": total,
        "tokens_seen": total * original.batch * original.seq_len,
        "epochs": data.epochs(total),
        "train_minutes": round(base["train_minutes"] + stage["train_minutes"], 1),
        "history": base["history"] + state["history"],
        "continued": base.get("continued", []) + [stage],
    }
    return finish(model, tokenizer, summary, original, data.valid, out=args.out, overwrite=args.overwrite,
                  started=started, tokenizer_from=args.source)


def perplexities(model, tokenizer, valid: list[dict], raw_test: Path, test_articles: int | None) -> dict:
    """Rolling (lm-eval) scores of WikiText-2 valid v1 (the training text's form) and, unless
    ``test_articles`` is 0, of the raw test split exactly as ``minitron eval``'s ``wikitext`` task reads it."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    from minitron.eval_data import read_wikitext_pages

    seq_len = model.config.max_position_embeddings
    out = {"valid": _metrics(rolling_nll(model, tokenizer, [r["text"] for r in valid], seq_len),
                             words=sum(r["words"] for r in valid), articles=len(valid))}
    if test_articles != 0:
        pages = [p["page"] for p in read_wikitext_pages(raw_test)][:test_articles]
        scored = rolling_nll(model, tokenizer, [wikitext_detokenizer({"page": p}) for p in pages], seq_len)
        out["wikitext_raw_test"] = _metrics(scored, words=sum(len(re.split(r"\s+", p)) for p in pages),
                                            articles=len(pages))
    return out


def _metrics(scored: dict, *, words: int, articles: int) -> dict:
    nll = sum(scored["nll"])
    return {
        "articles": articles,
        "tokens": scored["tokens"],
        "words": words,
        "loss": round(nll / scored["tokens"], 4),
        "ppl": round(math.exp(nll / scored["tokens"]), 2),
        "word_ppl": round(math.exp(nll / words), 2),
    }


def rescore(args: argparse.Namespace) -> dict:
    """Score a finished teacher again (e.g. after the card's template or the test text changed)."""
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    summary = json.loads((args.out / "training.json").read_text())
    model = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.out)
    summary.update(perplexities(model, tokenizer, read_articles(args.valid), args.raw_test, args.test_articles))
    trained_with = parse_args(shlex.split(summary["command"])[2:])
    for name, text in (("training.json", json.dumps(summary, indent=2) + "\n"),
                       ("README.md", model_card(model.config, trained_with, summary, eos=EOS, pad=PAD))):
        with atomic_file(args.out / name, overwrite=True) as tmp:
            tmp.write_text(text)
            readable(tmp)
    report(args.out, summary)
    return summary


def report(out: Path, summary: dict) -> None:
    for name in ("valid", "wikitext_raw_test"):
        if name in summary:
            m = summary[name]
            console.log(f"{out} {name}: loss {m['loss']:.4f} / token, ppl {m['ppl']:.2f}, word ppl {m['word_ppl']:.2f}")


def config_fingerprint(args: argparse.Namespace) -> dict:
    """Everything that changes the trained weights (not --out, --work, --minutes): a resume must match it."""
    skip = {"verb", "out", "overwrite", "work", "minutes", "valid", "valid_articles", "raw_test", "test_articles",
            "eval_every", "steps"}
    return {k: str(v) for k, v in sorted(vars(args).items()) if k not in skip}


def reproduce_command(args: argparse.Namespace, steps: int) -> str:
    return _command(args, ["train", "--seed", str(args.seed), "--steps", str(steps)], {"seed", "minutes"})


def continue_command(args: argparse.Namespace, steps: int) -> str:
    return _command(args, ["continue", "--steps", str(steps), "--from", "minitron/assets/teacher"], {"source"})


def _command(args: argparse.Namespace, head: list[str], implied: set[str]) -> str:
    """The command line that repeats a run and writes the shipped teacher: ``head``, then every setting that
    differs from its default (``implied`` ones are in ``head`` or do not change the weights)."""
    argv = ["python", "scripts/train_teacher.py", *head]
    defaults = vars(parse_args([head[0], "--out", "x", "--steps", "1"]))
    for key, value in vars(args).items():
        if key in implied | {"verb", "steps", "out", "overwrite", "work"} or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return shlex.join(argv + ["--out", "minitron/assets/teacher", "--overwrite"])


def readable(path: Path) -> None:
    """Temp files and folders are created private (0600 / 0700); package data must be world-readable."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {threads} thread(s)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.verb == "prepare":
        prepare(args.wikitext, args.out)
    elif args.verb == "rescore":
        rescore(args)
    elif args.verb == "continue":
        continue_training(args)
    else:
        run(args)


if __name__ == "__main__":
    run_script(main)
