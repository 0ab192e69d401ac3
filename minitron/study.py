"""``minitron study``: the Minitron papers' ablations, measured on any local teacher and text.

Every student is made by the package's own stages (``importance.compute_scores`` → ``plan.make_plan`` →
``prune.prune_model``), retrained by ``search_scoring.short_distill`` and scored by ``search_scoring.HeldOut``
on held-out blocks that neither importance nor training saw. Five comparisons (2407.14679 §4):

1. **importance**: one width-pruned shape, chosen by activation importance with each aggregation (batch
   mean / L2 × sequence mean / L2), by weight magnitude, by random scores (one per seed) and by the activation
   scores inverted (keeping the least important units); loss right after pruning and after a short distillation.
2. **depth**: the same number of layers dropped by block importance, by the LM-loss rise of each layer, as the
   best contiguous window, and at random (one per seed).
3. **width vs depth** at equal parameter count after equal distillation tokens (one run per seed).
4. **retraining**: the width student trained by forward KL (KD), by LM loss, by both, and the same shape
   from random initialisation by LM loss for ``scratch_factor`` times the tokens: held-out loss against tokens,
   and the tokens the scratch model needs to reach the KD student's loss (extrapolated when it does not).
5. **search**: width candidates ranked right after pruning and again after ``search_steps`` of distillation.

A seed sets the data order of a distillation, the random scores and the scratch initialisation; comparisons
where it matters run once per seed and report mean and spread. Results: :mod:`minitron.study_report`.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from minitron.errors import UserError

AGGREGATIONS = (("l2", "mean"), ("l2", "l2"), ("mean", "mean"), ("mean", "l2"))  # (batch, sequence); first: default


@dataclass(frozen=True)
class Settings:
    """Sizes of a study; the defaults finish in under 30 minutes on an idle 2-core CPU for the bundled teacher."""

    seq_len: int = 64
    batch: int = 8
    calib: int = 512
    """Calibration blocks for importance. With 32 (2,048 tokens) the held-out loss of the bundled teacher's
    width student right after pruning moved by ± 0.10 nats between calibration samples, more than the
    differences between the methods compared; with 512 by ± 0.01 (``benchmarks/calibration_size.py``)."""
    heldout: int = 32
    """Held-out blocks (from held-out documents) that every loss is measured on."""
    train: int | None = None
    """Training blocks; every distillation sees them in a seeded order. ``None``: as many as the longest run
    reads (the scratch model's ``retrain_steps × scratch_factor × batch``), so that no run sees a block twice.
    Repeated blocks overfit: with 256 blocks (16K tokens) the LM-loss runs' held-out loss rose as they trained,
    and the scratch model's went from 7.2 back up to 10.8 over 37 passes."""
    steps: int = 40
    """Optimizer steps of the short distillation in ablations 1-3."""
    search_steps: int = 40
    """Distillation steps before the candidates are ranked again (ablation 5, ``--search-steps``)."""
    retrain_steps: int = 120
    """Steps of each retraining in ablation 4."""
    scratch_factor: int = 10
    """The scratch model trains this many times ``retrain_steps``: 10 so that a scratch model that never
    catches up shows tokens-to-parity of at least the 10× the study sets out to test (2407.14679 reports up
    to 40×), rather than only a lower bound below it."""
    curve_points: int = 6
    seeds: int = 3
    top_k: int = 4
    lr: float = 1e-3
    """Constant AdamW learning rate of every run (the bundled teacher was trained at a 1.5e-3 peak)."""

    def tokens(self, steps: int) -> int:
        return steps * self.batch * self.seq_len

    def longest_run_blocks(self) -> int:
        """Blocks the longest training run reads (the scratch model's, at the defaults)."""
        return self.batch * max(self.steps, self.search_steps, self.retrain_steps * self.scratch_factor)

    def train_blocks(self) -> int:
        return self.train or self.longest_run_blocks()


QUICK = Settings(seq_len=32, batch=4, calib=8, heldout=8, train=32, steps=8, search_steps=8, retrain_steps=12,
                 scratch_factor=2, curve_points=3, seeds=3, top_k=2)


# --- inputs ---------------------------------------------------------------------------------------------------


def _documents(text: str | Path | None) -> tuple[list[str], list[str], str]:
    """Training and held-out documents: the bundled WikiText-2 train / valid articles, or every tenth
    document of ``text`` held out (a user's file has no split)."""
    from minitron import assets
    from minitron.data import load_texts

    if text is None:
        return assets.read_articles(), assets.read_articles(assets.validation_text()), "bundled WikiText-2 train / valid"
    docs = load_texts(text)
    if len(docs) < 10:
        raise UserError(f"{len(docs)} documents: too few to hold out a tenth", where=str(text),
                        fix="pass a text with at least 10 documents (blank-line separated, or one per jsonl line)")
    return [d for i, d in enumerate(docs) if i % 10], docs[9::10], f"{text} (every tenth document held out)"


def _teacher(path: str | Path | None):
    from minitron import assets
    from minitron.families import Shape
    from minitron.inputs import check_weights, load_config, load_tokenizer

    path = Path(path) if path is not None else assets.teacher_path()
    if not path.is_dir():
        raise UserError("not a local checkpoint folder", where=str(path), fix="pass a folder with config.json and weights")
    config = load_config(path)  # one-line errors for a missing config / unsupported family
    shape = Shape.from_config(config)
    check_weights(path, shape)
    if shape.experts:
        raise UserError("the study compares dense width and depth pruning", where=str(path), fix="pass a dense teacher")
    tok = load_tokenizer(str(path), fix="save the tokenizer beside the checkpoint", vocab=shape.vocab)
    return path, tok, shape


def _load_teacher(path: Path):
    from minitron.inputs import load_model

    model = load_model(path, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def study_blocks(tokenizer: Any, train_docs: list[str], heldout_docs: list[str], s: Settings):
    """The token blocks every run of a study reads: calibration, training (distinct blocks for every run) and
    held-out; a text too short for the settings is refused here, before any model is loaded."""
    from minitron.data import token_blocks

    what = "the study's training text (--text, less the held-out tenth)"

    def draw(samples: int, seed: int, fix: str):
        try:
            return token_blocks(tokenizer, train_docs, seq_len=s.seq_len, samples=samples, seed=seed, what=what)
        except UserError as e:
            raise UserError(f"too short for this study: {e.what}", where="--text", fix=fix) from None

    # Each sample with the fix that helps it: fewer --retrain-steps shrink the training blocks, not calibration.
    train = draw(s.train_blocks(), 1, "pass more text, or fewer --retrain-steps (the scratch run reads "
                                      f"{s.scratch_factor} × retrain-steps × {s.batch} blocks of {s.seq_len} tokens)")
    calib = draw(s.calib, 0, f"pass more text (importance calibrates on {s.calib} blocks of {s.seq_len} tokens)")
    heldout = token_blocks(tokenizer, heldout_docs, seq_len=s.seq_len, samples=s.heldout, seed=2,
                           what="the study's held-out text (every tenth --text document)")
    return calib, train, heldout


# --- scores ---------------------------------------------------------------------------------------------------


def magnitude_scores(model: Any, like: Any) -> Any:
    """Weight-magnitude importance: a hidden channel or MLP neuron scores the L2 norm of every weight that reads
    or writes it. The other keys are copied from ``like`` (heads and layers are not compared here)."""
    import re

    from minitron.importance import Scores
    from minitron.inputs import all_tensors

    shape, state = like.shape, model.state_dict()
    sums: dict[str, Any] = {}
    for name, spec in all_tensors(shape, shape.memory_layer_tensors()):
        if name not in state:  # a tied head is the embedding, counted once
            continue
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        w = state[name].float().pow(2)
        for axis, key in (("hidden", "hidden"), ("ffn", f"neurons.{layer.group(1)}" if layer else None)):
            if key and axis in spec.axes:
                keep = spec.axes.index(axis)
                sums[key] = sums.get(key, 0) + w.sum(dim=[d for d in range(w.dim()) if d != keep])
    return Scores({**like.tensors, **{k: v.sqrt() for k, v in sums.items()}}, {**like.meta, "method": "weight magnitude"})


# Measurements of the calibration data rather than rankings of units: the other rankings keep them as they are
# (the pruner rescales the remaining norms by them whichever units a ranking keeps).
MEASURED = ("norm_energy",)


def random_scores(like: Any, seed: int) -> Any:
    from minitron.importance import Scores

    g = torch.Generator().manual_seed(seed)
    tensors = {k: v if k in MEASURED else torch.rand(v.shape, generator=g) for k, v in like.tensors.items()}
    return Scores(tensors, {"method": f"random {seed}"})


def inverted_scores(like: Any) -> Any:
    from minitron.importance import Scores

    return Scores({k: v if k in MEASURED else -v for k, v in like.tensors.items()}, {"method": "inverted activation"})


# --- one student ----------------------------------------------------------------------------------------------


class Lab:
    """The teacher, the data and the held-out yardstick, shared by every run of a study."""

    def __init__(self, teacher: Any, shape: Any, blocks, s: Settings, progress):
        from minitron.search_scoring import HeldOut

        self.teacher, self.shape, self.s, self.progress = teacher, shape, s, progress
        self.calib, self.train, heldout = blocks
        self.heldout = HeldOut(teacher, heldout, batch_size=s.batch)
        self.steps_done = 0

    def loss(self, model: Any) -> float:
        return self.heldout.score(model, "loss")

    def prune(self, student_shape: Any, scores: Any, drop: list[int] | None = None):
        from minitron.plan import make_plan
        from minitron.prune import prune_model

        plan = make_plan(self.shape, student_shape, scores, drop)
        return prune_model(self.teacher, plan), plan

    def train_(self, student: Any, steps: int, seed: int, objective: str = "kd", curve: list | None = None) -> None:
        """Retrain in place; with ``curve``, append ``(tokens, held-out loss)`` at evenly spaced steps."""
        from minitron.search_scoring import short_distill

        for p in student.parameters():
            p.requires_grad_(True)
        marks = {round(steps * k / self.s.curve_points) for k in range(1, self.s.curve_points + 1)}
        task = self.progress.add_task(f"  {objective} {steps} steps", total=steps)

        def on_step(step: int) -> None:
            self.progress.advance(task)
            if curve is not None and step in marks:
                curve.append((self.s.tokens(step), self.loss(student)))

        if curve is not None:
            curve.append((0, self.loss(student)))
        short_distill(student, self.teacher, self.train, steps=steps, lr=self.s.lr, batch_size=self.s.batch,
                      seed=seed, objective=objective, on_step=on_step)
        self.progress.remove_task(task)
        self.steps_done += steps

    def pruned_and_distilled(self, student_shape: Any, scores: Any, drop: list[int] | None = None, seed: int = 0):
        student, plan = self.prune(student_shape, scores, drop)
        before = self.loss(student)
        self.train_(student, self.s.steps, seed)
        return {"pruned": before, "distilled": self.loss(student), "dropped_layers": plan.dropped_layers}


def _spread(values: list[float]) -> dict[str, Any]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "values": values}


# --- the five ablations ---------------------------------------------------------------------------------------


def shapes(t: Any) -> tuple[Any, Any, list[Any]]:
    """The depth student (half the layers dropped), and width candidates of its parameter count on the search
    grid (MLP may shrink by up to 75 %, so that several shapes compete), the search's first choice first."""
    from minitron.search_grid import Budget, SearchSpace, enumerate_candidates, parse_axes

    depth = replace(t, layers=t.layers - t.layers // 2)
    total = depth.counts()["total"]
    space = SearchSpace.build(t, parse_axes("width", t), {"ffn": 0.75})
    for tolerance in (0.02, 0.05, 0.1):
        candidates = enumerate_candidates(t, Budget(total=total, active=None, tolerance=tolerance), space)
        if len(candidates) >= 2:
            return depth, candidates[0].shape, candidates
    raise UserError(f"no two width shapes of {total:,} parameters on the search grid", where="teacher",
                    fix="use a teacher with hidden and MLP sizes of at least 32")


def importance_ablation(lab: Lab, width: Any, activation: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    default = activation[_agg_name(*AGGREGATIONS[0])]
    out = {name: lab.pruned_and_distilled(width, sc) for name, sc in activation.items()}
    out["weight magnitude"] = lab.pruned_and_distilled(width, magnitude_scores(lab.teacher, default))
    randoms = [lab.pruned_and_distilled(width, random_scores(default, seed)) for seed in seeds]
    out["random"] = {k: _spread([r[k] for r in randoms]) for k in ("pruned", "distilled")}
    out["inverted activation"] = lab.pruned_and_distilled(width, inverted_scores(default))
    return out


def depth_ablation(lab: Lab, depth: Any, scores: Any, seeds: list[int]) -> dict[str, Any]:
    from minitron.search_depth import DepthChooser

    n_drop = lab.shape.layers - depth.layers
    out = {}
    for strategy in ("block", "loss", "window"):
        drop = DepthChooser(strategy, lab.teacher, scores, lab.heldout)(n_drop)
        out[strategy] = lab.pruned_and_distilled(depth, scores, drop)
    randoms = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        drop = sorted(torch.randperm(lab.shape.layers, generator=g)[:n_drop].tolist())
        randoms.append(lab.pruned_and_distilled(depth, scores, drop))
    out["random"] = {k: _spread([r[k] for r in randoms]) for k in ("pruned", "distilled")}
    out["random"]["dropped_layers"] = [r["dropped_layers"] for r in randoms]
    return out


def width_vs_depth(lab: Lab, width: Any, depth: Any, scores: Any, drop: list[int], seeds: list[int],
                   first: dict[str, Any]) -> dict[str, Any]:
    """``first``: the seed-0 runs of both students, already made by ablations 1 and 2 (the same runs)."""
    out = {}
    for name, shape, layers in (("width", width, None), ("depth", depth, drop)):
        runs = [first[name]] + [lab.pruned_and_distilled(shape, scores, layers, seed=seed) for seed in seeds[1:]]
        out[name] = {"shape": shape.to_dict(), "params": shape.counts()["total"], "pruned": runs[0]["pruned"],
                     "distilled": _spread([r["distilled"] for r in runs]), "dropped_layers": layers or []}
    return out


def retraining(lab: Lab, width: Any, scores: Any, seed: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from minitron.prune import config_changes

    s, out = lab.s, {}
    for objective in ("kd", "lm", "kd+lm"):
        student, plan = lab.prune(width, scores)
        curve: list = []
        lab.train_(student, s.retrain_steps, seed, objective, curve)
        out[f"pruned + {objective}"] = curve
    config = type(lab.teacher.config).from_dict(lab.teacher.config.to_dict())
    for key, value in config_changes(plan, config).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    scratch = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    curve = []
    lab.train_(scratch, s.retrain_steps * s.scratch_factor, seed, "lm", curve)
    out["scratch + lm"] = curve
    return {"curves": out, "parity": parity(out["pruned + kd"][-1], curve)}


def parity(target: tuple[int, float], curve: list[tuple[int, float]]) -> dict[str, Any]:
    """Tokens the scratch ``curve`` needs to reach the loss ``target[1]`` that KD reached in ``target[0]`` tokens.

    Measured (linear interpolation between the two points around the crossing) when the curve gets there;
    otherwise extrapolated along a power law ``loss = a · tokens^-b`` fitted to the curve's second half (log-log
    least squares), and ``None`` when that fit does not fall; the ratio is then only known to exceed what ran."""
    kd_tokens, goal = target
    points = [(t, v) for t, v in curve if t > 0]
    for (t0, v0), (t1, v1) in zip([(0, curve[0][1])] + points, points):
        if v1 <= goal:
            tokens = t1 if v1 == v0 else t0 + (t1 - t0) * (v0 - goal) / (v0 - v1)
            return {"kd_loss": goal, "kd_tokens": kd_tokens, "scratch_tokens": tokens, "how": "measured",
                    "ratio": tokens / kd_tokens}
    tail = points[len(points) // 2 :] if len(points) >= 4 else points
    trained = points[-1][0]
    result = {"kd_loss": goal, "kd_tokens": kd_tokens, "scratch_trained_tokens": trained,
              "scratch_final_loss": points[-1][1], "ratio_at_least": trained / kd_tokens}
    if len(tail) >= 2:
        xs, ys = [math.log(t) for t, _ in tail], [math.log(v) for _, v in tail]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        if slope < 0:
            tokens = math.exp(mx + (math.log(goal) - my) / slope)
            return {**result, "scratch_tokens": tokens, "how": f"extrapolated (power law, exponent {slope:.3f}, "
                    f"through the last {len(tail)} points)", "ratio": tokens / kd_tokens}
    return {**result, "scratch_tokens": None, "how": "not reached; the loss curve does not fall", "ratio": None}


def search_ablation(lab: Lab, candidates: list[Any], scores: Any, seeds: list[int]) -> dict[str, Any]:
    from minitron.search import rank_candidates

    shortlist = candidates[: lab.s.top_k]
    names = [f"hidden {c.shape.hidden} / MLP {c.shape.ffn}" for c in shortlist]

    def ranked(steps: int, seed: int) -> dict[str, dict[str, float]]:
        result = rank_candidates(lab.teacher, shortlist, scores, lab.heldout, search_steps=steps, train_blocks=lab.train,
                                 lr=lab.s.lr, batch_size=lab.s.batch, seed=seed)
        lab.steps_done += steps * len(shortlist)
        return {names[shortlist.index(r.candidate)]: {"rank": k + 1, "loss": r.score} for k, r in enumerate(result)}

    before = ranked(0, 0)
    after = [ranked(lab.s.search_steps, seed) for seed in seeds]
    return {"candidates": [{"name": n, **c.to_dict()} for n, c in zip(names, shortlist)], "before": before,
            "after": after, "search_steps": lab.s.search_steps,
            "top_changed": [next(n for n, r in a.items() if r["rank"] == 1) != next(n for n, r in before.items()
                            if r["rank"] == 1) for a in after]}


def _agg_name(batch: str, seq: str) -> str:
    return f"activation (batch {batch}, seq {seq})"


# --- the verb -------------------------------------------------------------------------------------------------

PARTS = ("importance", "depth", "retraining", "search")  # independent; "depth" also compares width with depth


def run_part(part: str, teacher: Path, shape: Any, blocks, s: Settings, show: bool = True):
    """One part of the study in a Lab of its own, so that parts can run in separate processes (``--workers``):
    the teacher checkpoint ``teacher`` of ``shape``, the token blocks of :func:`study_blocks`.

    Returns the part's results and its cost (training steps, CPU seconds of this process)."""
    from rich.progress import Progress

    from minitron.importance import compute_scores
    from minitron.report_console import progress

    if not show:  # a worker process: transformers' loading bars would interleave on the parent's terminal
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = _load_teacher(teacher)
    cpu, seeds = time.process_time(), list(range(s.seeds))
    with progress() if show else Progress(disable=True) as bar:
        lab = Lab(model, shape, blocks, s, bar)
        depth, width, candidates = shapes(shape)
        wanted = AGGREGATIONS if part == "importance" else AGGREGATIONS[:1]
        activation = {_agg_name(b, q): compute_scores(model, lab.calib, batch_size=s.batch, batch_agg=b, seq_agg=q,
                                                      layer_loss=(b, q) == AGGREGATIONS[0], show_progress=False)
                      for b, q in wanted}
        default = activation[_agg_name(*AGGREGATIONS[0])]
        if part == "importance":
            out = {"teacher_loss": lab.loss(model), "importance": importance_ablation(lab, width, activation, seeds)}
        elif part == "depth":
            found = depth_ablation(lab, depth, default, seeds)
            best = min(("block", "loss", "window"), key=lambda k: found[k]["distilled"])
            first = {"width": lab.pruned_and_distilled(width, default), "depth": found[best]}
            versus = width_vs_depth(lab, width, depth, default, found[best]["dropped_layers"], seeds, first)
            out = {"depth": found, "width_vs_depth": {**versus, "depth_strategy": best}}
        elif part == "retraining":
            out = {"retraining": retraining(lab, width, default, seeds[0])}
        else:
            out = {"search": search_ablation(lab, candidates, default, seeds)}
    return out, {"training_steps": lab.steps_done, "cpu_s": time.process_time() - cpu}


def worker_start(threads: int, parent: int) -> None:
    """Start of each worker of a parallel study: its share of the cores and, on Linux, death with the study's
    process (``PR_SET_PDEATHSIG``): a ``kill -9`` of ``minitron study`` runs no cleanup code, and would
    otherwise leave its workers computing, orphaned, for nobody."""
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the study died before the line above took effect
            os._exit(1)


def run_study(out: str | Path, *, teacher: str | Path | None = None, text: str | Path | None = None,
              quick: bool = False, settings: Settings | None = None, workers: int | None = None,
              overwrite: bool = False) -> Path:
    """Run the five ablations and write ``out/`` (results.json, study.md, plots/*.svg) atomically.

    ``workers`` > 1 runs the four parts in that many processes (each loads the teacher and gets an equal share
    of the CPU threads; the numbers are the same); ``None``: one per CPU core, at most one per part."""
    from minitron.artifacts import atomic_dir, check_output_dir, versions
    from minitron.study_report import write

    out = check_output_dir(out, overwrite, inputs=[("--teacher", teacher), ("--text", text)])
    s = settings or (QUICK if quick else Settings())
    workers = min(len(PARTS), os.cpu_count() or 1) if workers is None else workers
    small = [k for k in ("seeds", "steps", "search_steps", "retrain_steps", "scratch_factor", "curve_points", "top_k")
             if getattr(s, k) < 1]
    if small or workers < 1:
        key = small[0] if small else "workers"
        raise UserError(f"{key} is {getattr(s, key, workers)}", where=f"--{key.replace('_', '-')}", fix="pass a positive number")
    train_docs, heldout_docs, source = _documents(text)  # before the teacher loads: a bad file fails fast
    path, tok, shape = _teacher(teacher)
    # Tokenized once, here: a text too short for these sizes fails before any model loads, and every part
    # reads the same blocks.
    blocks = study_blocks(tok, train_docs, heldout_docs, s)
    depth, width, _ = shapes(shape)
    started, load_start = time.perf_counter(), os.getloadavg()
    threads = torch.get_num_threads()
    if workers == 1:
        parts = [run_part(part, path, shape, blocks, s) for part in PARTS]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        workers = min(workers, len(PARTS))
        threads = max(1, threads // workers)  # no oversubscription: the parts share the cores
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=worker_start, initargs=(threads, os.getpid())) as pool:
            n = len(PARTS)
            parts = list(pool.map(run_part, PARTS, [path] * n, [shape] * n, [blocks] * n, [s] * n, [False] * n))
    results = {k: v for part, _ in parts for k, v in part.items()}
    record = {
        # The bundled teacher by its place in the package, not this machine's install path.
        "teacher": {"path": str(path) if teacher is not None else "minitron/assets/teacher", "shape": shape.to_dict(), "params": shape.counts()["total"]},
        "text": source, "settings": asdict(s), "quick": quick, "seeds": list(range(s.seeds)),
        "train_blocks": s.train_blocks(), "longest_run_blocks": s.longest_run_blocks(),
        "shapes": {"width": width.to_dict(), "depth": depth.to_dict(), "width_params": width.counts()["total"],
                   "depth_params": depth.counts()["total"]},
        "results": {k: results[k] for k in ("teacher_loss", "importance", "depth", "width_vs_depth", "retraining", "search")},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": threads,
                    "workers": workers, "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "timing": {"total_s": round(time.perf_counter() - started, 1),
                   "cpu_s": round(sum(cost["cpu_s"] for _, cost in parts), 1),
                   "training_steps": sum(cost["training_steps"] for _, cost in parts)},
        "versions": versions(),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write(record, tmp)
    return out
