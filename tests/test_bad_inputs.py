"""THE bad-input table: every verb handed something broken answers with one line on stderr and exit code 2,
names what is wrong, and leaves nothing new on disk.

Each row is (command, expected exit code, words the message must hold). The broken inputs are made once per
module from the tiny models of tests/tiny.py (the "zoo"): truncated and damaged safetensors, a missing or
misshapen tensor, pickles only, broken config.json files, text that is binary or not UTF-8. Every row runs
with the working directory in a fresh temporary folder, and the zoo and that folder are snapshotted before
and after: a refused command must not create, change or remove a file anywhere it can reach.

Rows run in-process (``minitron.cli.main`` with patched argv) to keep the table cheap; the rows marked
``process=True`` run as a real ``python -m minitron.cli`` to check the contract end to end.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from clirun import assert_user_error, minitron, minitron_in_process
from safetensors.torch import load_file, save_file
from tiny import save_tiny, tiny_config, tiny_tokenizer

REPO = Path(__file__).parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
EVAL_DATA = REPO / "tests" / "data" / "eval"
LATIN1 = "caf\xe9 au lait\n".encode("latin-1")  # 0xE9: valid Latin-1, not UTF-8


@dataclass(frozen=True)
class Case:
    """One row: ``args`` may hold ``{zoo}``, ``{tmp}`` and ``{repo}``; ``words`` must all be in the line."""

    id: str
    args: tuple[str, ...]
    words: tuple[str, ...]
    code: int = 2
    process: bool = False


def case(id: str, command: str, *words: str, code: int = 2, process: bool = False) -> Case:
    return Case(id, tuple(command.split()), words, code, process)


# A tiny llama: 4 layers, 4 heads in 2 KV groups, hidden 64, ffn 96, context 256.
GOOD, MOE = "{zoo}/good", "{zoo}/moe"
DISTILL = "distill {repo}/recipes/tiny-cpu.yaml output.dir={tmp}/run data.source={zoo}/calib.txt data.cache_dir={zoo}/token-cache"
EVAL = "eval {zoo}/good -o {tmp}/r.json --tasks wikitext --limit 1 --device cpu"
# Rows of helper `outputs`: the token cache outside the snapshot (a cache, not an output).
IMPORTANCE_TO = "importance {{zoo}}/good --calib {{zoo}}/calib.txt -o {out} --samples 2 --seq-len 8"
DISTILL_GOOD = DISTILL + " teacher.path={zoo}/good student.path={zoo}/good data.cache_dir={zoo}/../token-cache"

CASES = [
    # --- the CLI layer: usage errors are one line too ---------------------------------------------------------
    case("no-such-verb", "prnue {zoo}/good", "No such command", "prnue", process=True),
    case("unknown-flag", "inspect {zoo}/good --jsn", "No such option", "--jsn"),
    case("missing-argument", "inspect", "Missing argument", "inspect --help"),
    case("samples-not-a-number", "importance {zoo}/good --calib {zoo}/calib.txt -o {tmp}/s.safetensors --samples abc",
         "--samples", process=True),
    case("seed-past-64-bits", "importance {zoo}/good --calib {zoo}/calib.txt -o {tmp}/s.safetensors --seed 100000000000000000000",
         "--seed", "less than or equal to 9223372036854775807"),
    case("prune-seed-negative", "prune {zoo}/good --target 0.5x --calib {zoo}/calib.txt -o {tmp}/out --seed -1",
         "--seed", "greater than or equal to 0"),
    case("missing-required-option", "importance {zoo}/good -o {tmp}/s.safetensors --samples 2 --seq-len 8", "Missing option", "--calib"),
    case("report-no-files", "report -o {tmp}/board", "Missing argument"),
    case("eval-no-out", "eval {zoo}/good", "Missing option", "--out"),
    case("quickstart-steps-not-a-number", "quickstart -o {tmp}/qs --steps ten", "--steps"),
    # --- inspect: config.json -------------------------------------------------------------------------------
    case("inspect-missing", "inspect {tmp}/nope", "no such file"),
    case("inspect-a-file", "inspect {zoo}/calib.txt", "not a folder"),
    case("inspect-no-config", "inspect {zoo}/empty-folder", "no config.json"),
    case("config-a-device", "inspect {zoo}/cfg-device", "cfg-device/config.json", "not a regular file"),
    case("config-huge-width", "inspect {zoo}/cfg-huge", "hidden_size is 1,000,000,000,000", "more than any model has"),
    case("config-empty-object", "inspect {zoo}/cfg-empty", "config.json", "no model_type", "llama"),
    case("config-list", "inspect {zoo}/cfg-list", "config.json", "list", "not an object"),
    case("config-not-utf8", "inspect {zoo}/cfg-latin1", "config.json", "not UTF-8", "line 1"),
    case("config-binary", "inspect {zoo}/cfg-binary", "config.json", "binary"),
    case("config-not-json", "inspect {zoo}/cfg-notjson", "config.json", "not valid JSON", "line"),
    case("config-unsupported-family", "inspect {zoo}/cfg-bert", "bert", "llama"),
    case("config-family-null", "inspect {zoo}/cfg-type-null", "cfg-type-null/config.json", "model_type None"),
    case("config-family-a-list", "inspect {zoo}/cfg-type-list", "cfg-type-list/config.json", "model_type ['llama']"),
    case("config-size-as-string", "inspect {zoo}/cfg-str", "hidden_size", "'64'", "whole number"),
    case("config-size-float", "inspect {zoo}/cfg-float", "intermediate_size", "96.5"),
    case("config-size-bool", "inspect {zoo}/cfg-bool", "num_hidden_layers", "True"),
    case("config-zero-heads", "inspect {zoo}/cfg-zero-heads", "num_attention_heads", "at least 1"),
    case("config-negative-layers", "inspect {zoo}/cfg-neg-layers", "num_hidden_layers", "-2"),
    case("config-no-hidden-size", "inspect {zoo}/cfg-no-hidden", "hidden_size"),
    case("config-heads-not-grouped", "inspect {zoo}/cfg-kv3", "num_key_value_heads", "multiple"),
    case("config-nan-epsilon", "inspect {zoo}/cfg-nan", "config.json", "rms_norm_eps is nan", "finite"),
    case("config-infinite-rope-factor", "inspect {zoo}/cfg-inf", "rope_scaling.factor is inf"),
    case("config-nested-too-deeply", "inspect {zoo}/cfg-deep", "config.json", "nested too deeply"),
    case("config-field-of-wrong-type", "inspect {zoo}/cfg-rope", "transformers cannot read this config", "rope_parameters"),
    # --- importance: weights and calibration text, all refused before any work -------------------------------
    case("importance-config-only", "importance {zoo}/config-only --calib {zoo}/calib.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "config-only", "no *.safetensors"),
    case("importance-pickles-only", "importance {zoo}/bin-only --calib {zoo}/calib.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "pytorch_model.bin", "never loads pickles", "save_pretrained"),
    case("importance-truncated", "importance {zoo}/truncated --calib {zoo}/calib.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "model.safetensors", "damaged", process=True),
    case("importance-damaged-header", "importance {zoo}/bad-header --calib {zoo}/calib.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "model.safetensors", "damaged"),
    case("importance-missing-tensor", "importance {zoo}/no-k-proj --calib {zoo}/calib.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "lacks model.layers.1.self_attn.k_proj.weight", "never fills in"),
    case("importance-wrong-shape", "importance {zoo}/wrong-shape --calib {zoo}/calib.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "model.layers.2.mlp.up_proj.weight", "(95, 64)", "(96, 64)"),
    case("importance-unknown-tensor", "importance {zoo}/extra-tensor --calib {zoo}/calib.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "does not know", "model.layers.0.mystery.weight"),
    case("importance-index-missing-shard", "importance {zoo}/bad-index --calib {zoo}/calib.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "missing", "model-00002-of-00002.safetensors"),
    case("importance-broken-config", "importance {zoo}/cfg-zero-heads --calib {zoo}/calib.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "num_attention_heads"),
    case("importance-calib-binary", "importance {zoo}/good --calib {zoo}/binary.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "binary.txt", "binary", "NUL"),
    case("importance-calib-not-utf8", "importance {zoo}/good --calib {zoo}/latin1.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "latin1.txt", "not UTF-8", "line 3"),
    case("importance-calib-jsonl-not-utf8", "importance {zoo}/good --calib {zoo}/latin1.jsonl -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "latin1.jsonl:2", "not UTF-8"),
    case("importance-calib-folder-with-bad-file", "importance {zoo}/good --calib {zoo}/calib-folder -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "b.txt", "not UTF-8"),
    case("importance-calib-not-json", "importance {zoo}/good --calib {zoo}/notjson.jsonl -o {tmp}/s.safetensors --samples 2 --seq-len 8",
         "notjson.jsonl", "line 2", "not valid JSON"),
    case("importance-calib-missing", "importance {zoo}/good --calib {tmp}/none.txt -o {tmp}/s.safetensors --samples 2 --seq-len 8", "none.txt", "no such"),
    case("importance-calib-wrong-kind", "importance {zoo}/good --calib {zoo}/calib.csv -o {tmp}/s.safetensors --samples 2 --seq-len 8", "calib.csv", ".csv"),
    case("importance-calib-too-short", "importance {zoo}/good --calib {zoo}/calib.txt -o {tmp}/s.safetensors --samples 4000 --seq-len 256",
         "fewer than samples"),
    case("importance-seq-len-over-context", "importance {zoo}/good --calib {zoo}/calib.txt -o {tmp}/s.safetensors --seq-len 4096",
         "--seq-len", "context of 256"),
    case("importance-bad-aggregation", "importance {zoo}/good --calib {zoo}/calib.txt -o {tmp}/s.safetensors --seq-len 8 --batch-agg max",
         "--batch-agg", "max"),
    case("importance-bad-norm-aggregation", "importance {zoo}/good --calib {zoo}/calib.txt -o {tmp}/s.safetensors --seq-len 8 --norm-agg mean",
         "--norm-agg", "'mean'", "sum, max-share"),
    case("importance-bad-device", "importance {zoo}/good --calib {zoo}/calib.txt -o {tmp}/s.safetensors --seq-len 8 --device tpu", "--device"),
    case("importance-out-exists", "importance {zoo}/good --calib {zoo}/calib.txt -o {zoo}/calib.txt --seq-len 8", "already exists", "--overwrite"),
    # --- prune: flags ------------------------------------------------------------------------------------------
    case("prune-no-shape", "prune {zoo}/good -o {tmp}/out", "no student shape", "--target", "--hidden-size", "--drop-layers"),
    case("prune-open-range", "prune {zoo}/good --drop-layers 3- -o {tmp}/out", "--drop-layers 3-", "closed ranges"),
    case("prune-range-from-nothing", "prune {zoo}/good --drop-layers -2 -o {tmp}/out", "--drop-layers", "'-2'"),
    case("prune-empty-range-item", "prune {zoo}/good --drop-layers 1,,2 -o {tmp}/out", "--drop-layers", "''"),
    case("prune-backwards-range", "prune {zoo}/good --drop-layers 3-1 -o {tmp}/out", "backwards"),
    case("prune-layer-out-of-range", "prune {zoo}/good --drop-layers 4 -o {tmp}/out", "layer 4", "0-3"),
    case("prune-drop-every-layer", "prune {zoo}/good --drop-layers 0-3 -o {tmp}/out", "every layer"),
    case("prune-kv-heads-too-many", "prune {zoo}/good --kv-heads 4 -o {tmp}/out", "--kv-heads", "4 is larger", "teacher's 2"),
    case("prune-kv-heads-zero", "prune {zoo}/good --kv-heads 0 -o {tmp}/out", "--kv-heads", "at least 1"),
    case("prune-heads-too-many", "prune {zoo}/good --heads 8 -o {tmp}/out", "--heads", "8 is larger"),
    case("prune-heads-break-hidden", "prune {zoo}/wide --heads 10 --dry-run", "--heads", "10 query heads", "--heads 8"),
    case("prune-hidden-break-heads", "prune {zoo}/good --hidden-size 62 --dry-run", "--hidden-size", "multiple of 4"),
    case("prune-ffn-on-moe", "prune {zoo}/moe --ffn-size 16 --dry-run", "--ffn-size", "MoE", "--expert-ffn-size"),
    case("prune-experts-on-dense", "prune {zoo}/good --experts 2 --dry-run", "no experts"),
    case("prune-target-with-shape", "prune {zoo}/good --target 0.5x --hidden-size 32 --dry-run", "--hidden-size"),
    case("prune-bad-target", "prune {zoo}/good --target half --dry-run", "--target", "half"),
    case("prune-no-out", "prune {zoo}/good --ffn-size 48 --scores {zoo}/calib.txt", "-o"),
    case("prune-seq-len-over-context", "prune {zoo}/good --ffn-size 48 --calib {zoo}/calib.txt --seq-len 300 -o {tmp}/out",
         "--seq-len", "context of 256"),
    # --- prune: weights and text -------------------------------------------------------------------------------
    case("prune-config-only", "prune {zoo}/config-only --drop-layers 1 -o {tmp}/out", "no *.safetensors"),
    case("prune-pickles-only", "prune {zoo}/bin-only --drop-layers 1 -o {tmp}/out", "pytorch_model.bin", "safetensors"),
    case("prune-truncated", "prune {zoo}/truncated --drop-layers 1 -o {tmp}/out", "damaged"),
    case("prune-missing-tensor-before-calibration", "prune {zoo}/no-k-proj --ffn-size 48 --calib {zoo}/calib.txt --samples 2 --seq-len 8 -o {tmp}/out",
         "lacks model.layers.1.self_attn.k_proj.weight"),
    case("prune-wrong-shape", "prune {zoo}/wrong-shape --drop-layers 1 -o {tmp}/out", "(95, 64)"),
    case("prune-calib-not-utf8", "prune {zoo}/good --ffn-size 48 --calib {zoo}/latin1.txt --samples 2 --seq-len 8 -o {tmp}/out",
         "latin1.txt", "not UTF-8"),
    case("prune-scores-not-scores", "prune {zoo}/good --ffn-size 48 --scores {zoo}/calib.txt -o {tmp}/out", "calib.txt", "scores"),
    case("prune-search-missing-tensor", "prune {zoo}/no-k-proj --target 0.9x --calib {zoo}/calib.txt --samples 2 --seq-len 8 -o {tmp}/out",
         "lacks model.layers.1.self_attn.k_proj.weight"),
    # --- distill: recipes and what they point to ------------------------------------------------------------------
    case("importance-nan-weights", IMPORTANCE_TO.format(out="{tmp}/s.safetensors").replace("{zoo}/good", "{zoo}/nan-weights"),
         "nan-weights", "NaN or infinite", "check the checkpoint's weights"),
    case("distill-recipe-a-device", "distill /dev/null", "/dev/null", "neither a file nor a folder"),
    case("distill-recipe-a-folder", "distill {zoo}/empty-folder", "a folder, not a recipe file"),
    case("prune-scores-a-folder", "prune {zoo}/good --ffn-size 48 --scores {zoo}/empty-folder -o {tmp}/out",
         "a folder, not a scores file"),
    case("eval-data-dir-a-file", EVAL + " --data-dir {zoo}/calib.txt", "--data-dir", "a file, not a folder"),
    case("distill-recipe-not-utf8", "distill {zoo}/latin1.yaml", "latin1.yaml", "not UTF-8"),
    case("distill-recipe-binary", "distill {zoo}/binary.yaml", "binary.yaml", "binary"),
    case("distill-recipe-list", "distill {zoo}/list.yaml", "list.yaml", "mapping"),
    case("distill-recipe-missing", "distill {tmp}/none.yaml", "none.yaml", "no such recipe"),
    case("distill-student-missing-tensor", DISTILL + " teacher.path={zoo}/good student.path={zoo}/no-k-proj",
         "student.path", "lacks model.layers.1.self_attn.k_proj.weight"),
    case("distill-teacher-truncated", DISTILL + " teacher.path={zoo}/truncated student.path={zoo}/good", "teacher.path", "damaged"),
    case("distill-student-pickles-only", DISTILL + " teacher.path={zoo}/good student.path={zoo}/bin-only",
         "student.path", "pytorch_model.bin", "never loads pickles"),
    case("distill-teacher-config-only", DISTILL + " teacher.path={zoo}/config-only student.path={zoo}/good",
         "teacher.path", "no *.safetensors"),
    case("distill-student-broken-config", DISTILL + " teacher.path={zoo}/good student.path={zoo}/cfg-list", "student.path", "list"),
    case("distill-data-not-utf8", DISTILL.replace("{zoo}/calib.txt", "{zoo}/latin1.txt") + " teacher.path={zoo}/good student.path={zoo}/good",
         "latin1.txt", "not UTF-8"),
    case("distill-seq-len-over-context", DISTILL + " teacher.path={zoo}/good student.path={zoo}/good data.seq_len=512",
         "data.seq_len", "256"),
    case("distill-unknown-key", DISTILL + " teacher.path={zoo}/good student.path={zoo}/good optimizer.lrr=1", "lrr"),
    # --- eval: cheap checks first, then the checkpoint, then the data files ---------------------------------------
    case("eval-bad-hellaswag-shots", "eval {zoo}/good -o {tmp}/r.json --hellaswag-shots 3", "--hellaswag-shots", "0 or 10"),
    case("eval-bogus-task", "eval {zoo}/good -o {tmp}/r.json --tasks bogus", "--tasks", "bogus", "wikitext"),
    case("eval-bad-batch-size", "eval {zoo}/good -o {tmp}/r.json --batch-size big", "--batch-size"),
    case("eval-zero-limit", "eval {zoo}/good -o {tmp}/r.json --limit 0", "--limit"),
    case("eval-bad-dtype", EVAL.replace("eval {zoo}/good", "eval {zoo}/good --dtype float8"), "--dtype"),
    case("eval-missing-tensor", EVAL.replace("{zoo}/good", "{zoo}/no-k-proj", 1), "lacks model.layers.1.self_attn.k_proj.weight"),
    case("eval-truncated", EVAL.replace("{zoo}/good", "{zoo}/truncated", 1), "damaged"),
    case("eval-pickles-only", EVAL.replace("{zoo}/good", "{zoo}/bin-only", 1), "pytorch_model.bin"),
    case("eval-config-only", EVAL.replace("{zoo}/good", "{zoo}/config-only", 1), "no *.safetensors"),
    case("eval-data-not-utf8", EVAL + " --data-dir {zoo}/eval-latin1", "wiki.test.raw", "not UTF-8"),
    case("eval-data-binary-jsonl", "eval {zoo}/good -o {tmp}/r.json --tasks gsm8k --data-dir {zoo}/eval-binary", "test.jsonl", "binary"),
    case("eval-data-csv-not-utf8", "eval {zoo}/good -o {tmp}/r.json --tasks mmlu --data-dir {zoo}/eval-mmlu-latin1",
         "philosophy_test.csv", "not UTF-8"),
    case("eval-data-dir-missing", EVAL + " --data-dir {tmp}/nothing", "--data-dir", "no such folder"),
    case("eval-data-gsm8k-record-lacks-answer", "eval {zoo}/good -o {tmp}/r.json --tasks gsm8k --data-dir {zoo}/eval-no-answer",
         "test.jsonl:1", "no string field 'answer'", "copy the published file there again"),
    case("eval-data-empty-wikitext", EVAL + " --data-dir {zoo}/eval-empty-wikitext", "wiki.test.raw", "no text",
         "copy the published file"),
    # --- report ---------------------------------------------------------------------------------------------
    case("report-results-not-utf8", "report {zoo}/latin1.json -o {tmp}/board", "latin1.json", "not UTF-8"),
    case("report-results-binary", "report {zoo}/binary.json -o {tmp}/board", "binary.json", "binary"),
    case("report-results-not-json", "report {zoo}/calib.txt -o {tmp}/board", "calib.txt", "not valid JSON"),
    case("report-results-of-another-tool", "report {zoo}/lm-eval.json -o {tmp}/board", "not a minitron results file", "lm-eval"),
    case("report-results-a-folder", "report {zoo}/empty-folder -o {tmp}/board", "empty-folder", "a folder, not a file"),
    case("report-results-missing", "report {tmp}/none.json -o {tmp}/board", "none.json", "no such file"),
    # --- quickstart: refused before any model is loaded ----------------------------------------------------------
    case("quickstart-bogus-task", "quickstart -o {tmp}/qs --tasks bogus", "--tasks", "bogus"),
    case("quickstart-zero-steps", "quickstart -o {tmp}/qs --steps 0", "--steps"),
    case("quickstart-batch-beyond-the-text", "quickstart -o {tmp}/qs --batch 100000", "--batch", "to train on",
         "--batch 11815 or less"),
    case("quickstart-out-exists", "quickstart -o {zoo}/good", "already exists"),
    # --- rows of issue 10 §2 (destinations, interrupted runs, --resume) follow here ---------------------------
    # Owned by helper `outputs`. Every verb checks its destination before any work: a path below a file, a
    # folder nobody can create files in (/proc: refused to root too, so the rows hold when CI runs as root).
    case("importance-out-below-a-file", IMPORTANCE_TO.format(out="{zoo}/calib.txt/s.safetensors"), "calib.txt", "is a file, not a folder"),
    case("importance-out-read-only", IMPORTANCE_TO.format(out="/proc/self/s.safetensors"), "/proc/self", "cannot write here"),
    case("prune-out-below-a-file", "prune {zoo}/good --drop-layers 1 -o {zoo}/calib.txt/out", "is a file, not a folder"),
    case("prune-overwrite-its-teacher", "prune {zoo}/good --drop-layers 1 -o {zoo}/good --overwrite",
         "would delete an input", "is MODEL"),
    case("prune-overwrite-the-folder-of-its-teacher", "prune {zoo}/good --drop-layers 1 -o {zoo} --overwrite",
         "would delete an input", "holds MODEL"),
    # A tokenizer with more tokens than the model has embeddings: refused before the model loads.
    case("importance-tokenizer-bigger-than-vocab", IMPORTANCE_TO.format(out="{tmp}/s.safetensors").replace("{zoo}/good", "{zoo}/tok-bigger"),
         "tok-bigger", "128 tokens", "vocab_size is 64"),
    case("prune-calib-tokenizer-bigger-than-vocab", "prune {zoo}/tok-bigger --target 0.5x --calib {zoo}/calib.txt --samples 2 --seq-len 8 -o {tmp}/out",
         "tok-bigger", "vocab_size is 64"),
    case("eval-tokenizer-bigger-than-vocab", "eval {zoo}/tok-bigger -o {tmp}/r.json --tasks wikitext --limit 1 --device cpu",
         "tok-bigger", "vocab_size is 64"),
    case("distill-tokenizer-bigger-than-vocab", DISTILL + " teacher.path={zoo}/tok-bigger student.path={zoo}/tok-bigger",
         "tok-bigger", "vocab_size is 64"),
    # Inside an input folder anything may be part of the input: --overwrite replaces nothing there.
    case("importance-overwrite-inside-its-model", IMPORTANCE_TO.format(out="{zoo}/good/model.safetensors") + " --overwrite",
         "would delete an input", "lies inside MODEL"),
    case("eval-overwrite-inside-its-model", "eval {zoo}/good -o {zoo}/good/config.json --tasks wikitext --limit 1 --overwrite",
         "would delete an input", "lies inside MODEL"),
    case("eval-overwrite-inside-its-data-dir", "eval {zoo}/good -o {zoo}/cfg-empty/config.json --data-dir {zoo}/cfg-empty "
         "--tasks wikitext --limit 1 --overwrite", "would delete an input", "lies inside --data-dir"),
    case("report-overwrite-its-results", "report {zoo}/lm-eval.json -o {zoo} --overwrite", "holds the results file"),
    case("distill-overwrite-its-models", DISTILL_GOOD + " output.dir={zoo}/good output.overwrite=true",
         "output.overwrite would delete an input", "is teacher.path"),
    case("report-out-names-nothing", "report {zoo}/lm-eval.json -o {zoo}/good/.. --overwrite", "names no file or folder"),
    case("importance-calib-a-device", IMPORTANCE_TO.format(out="{tmp}/s.safetensors").replace("{zoo}/calib.txt", "/dev/zero"),
         "/dev/zero", "neither a file nor a folder"),
    case("importance-out-name-too-long", IMPORTANCE_TO.format(out="{tmp}/" + "c" * 240), "name too long: 240 bytes"),
    case("prune-overwrite-a-file", "prune {zoo}/good --drop-layers 1 -o {zoo}/calib.txt --overwrite", "calib.txt",
         "is a file", "only with a file"),
    case("importance-overwrite-a-folder", IMPORTANCE_TO.format(out="{zoo}/good") + " --overwrite", "is a folder",
         "remove it yourself first"),
    case("prune-target-beyond-float", "prune {zoo}/good --target 1e400 --calib {zoo}/calib.txt --samples 2 --seq-len 8 -o {tmp}/out",
         "--target", "1e400", "not smaller"),
    case("prune-out-read-only", "prune {zoo}/good --drop-layers 1 -o /proc/self/out", "/proc/self", "cannot write here"),
    case("prune-search-out-read-only", "prune {zoo}/good --target 0.9x --calib {zoo}/calib.txt --samples 2 --seq-len 8 -o /proc/self/out",
         "cannot write here"),
    case("eval-out-below-a-file", EVAL.replace("{tmp}/r.json", "{zoo}/calib.txt/r.json"), "is a file, not a folder"),
    case("eval-out-read-only", EVAL.replace("{tmp}/r.json", "/proc/self/r.json"), "/proc/self", "cannot write here"),
    case("report-out-read-only", "report {zoo}/lm-eval.json -o /proc/self/board", "/proc/self", "cannot write here"),
    case("quickstart-out-below-a-file", "quickstart -o {zoo}/calib.txt/qs", "is a file, not a folder"),
    case("quickstart-out-read-only", "quickstart -o /proc/self/qs", "/proc/self", "cannot write here"),
    case("distill-out-below-a-file", DISTILL_GOOD + " output.dir={zoo}/calib.txt/run", "is a file, not a folder"),
    case("distill-out-read-only", DISTILL_GOOD + " output.dir=/proc/self/run", "/proc/self", "cannot write here"),
    # distill refuses before it creates the run folder (the snapshot sees no run/recipe.yaml).
    case("distill-eval-blocks-too-many", DISTILL_GOOD + " eval.blocks=100000", "data.source", "held out for evaluation"),
    case("distill-batch-beyond-the-data", DISTILL_GOOD + " batch.micro=100000 batch.global=100000", "batch.global",
         "blocks there are to train on"),
    case("distill-hidden-pair-out-of-range", DISTILL_GOOD + " loss.hidden.pairs=[[1,9]]", "loss.hidden.pairs", "teacher layer 9"),
    # --resume: nothing to resume, not a run, a changed recipe; and a run that exists without --resume.
    case("distill-resume-nothing", DISTILL_GOOD + " --resume", "nothing to resume", "drop --resume"),
    case("distill-resume-not-a-run", DISTILL_GOOD + " output.dir={zoo}/empty-folder --resume", "nothing to resume", "recipe.yaml"),
    case("distill-resume-changed-loss", DISTILL_GOOD + " output.dir={zoo}/old-run --resume", "'loss' section differs"),
    case("distill-resume-changed-betas", DISTILL_GOOD + " output.dir={zoo}/old-run loss.temperature=2 optimizer.betas=[0.8,0.9] --resume",
         "optimizer.betas differs", "optimizer.lr"),
    case("distill-run-exists", DISTILL_GOOD + " output.dir={zoo}/old-run", "run folder already exists", "--resume"),
]


# --- the zoo of broken inputs ----------------------------------------------------------------------------------


def _save_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    (folder / "model.safetensors").unlink()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _checkpoint(zoo: Path, name: str, good: Path) -> Path:
    folder = zoo / name
    shutil.copytree(good, folder)
    return folder


def _config(zoo: Path, name: str, content: bytes | dict) -> None:
    folder = zoo / name
    folder.mkdir()
    (folder / "config.json").write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())


def build_zoo(zoo: Path) -> None:
    good = zoo / "good"
    save_tiny("llama", good)
    tiny_tokenizer().save_pretrained(good)
    config = json.loads((good / "config.json").read_text())
    weights = load_file(good / "model.safetensors")
    raw = (good / "model.safetensors").read_bytes()

    tiny_config("granitemoe").save_pretrained(zoo / "moe")
    (zoo / "empty-folder").mkdir()
    save_tiny("llama", zoo / "tok-bigger", vocab_size=64)  # the 128-token tokenizer's ids past 63 have no embedding
    tiny_tokenizer().save_pretrained(zoo / "tok-bigger")
    _config(zoo, "cfg-huge", {**config, "hidden_size": 10**12})
    (zoo / "cfg-device").mkdir()
    (zoo / "cfg-device" / "config.json").symlink_to("/dev/zero")  # reading it would never end
    (zoo / "config-only").mkdir()
    shutil.copy(good / "config.json", zoo / "config-only")
    (zoo / "bin-only").mkdir()
    shutil.copy(good / "config.json", zoo / "bin-only")
    torch.save({"a": torch.zeros(1)}, zoo / "bin-only" / "pytorch_model.bin")  # never opened by any verb
    (_checkpoint(zoo, "truncated", good) / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    header = struct.pack("<Q", 64) + b"{not json" + b" " * 55
    (_checkpoint(zoo, "bad-header", good) / "model.safetensors").write_bytes(header + raw[8 + 64 :])
    _save_weights(_checkpoint(zoo, "nan-weights", good),
                  {**weights, "model.layers.1.mlp.up_proj.weight": torch.full_like(weights["model.layers.1.mlp.up_proj.weight"], float("nan"))})
    _save_weights(_checkpoint(zoo, "no-k-proj", good),
                  {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"})  # fmt: skip
    _save_weights(_checkpoint(zoo, "wrong-shape", good),
                  {**weights, "model.layers.2.mlp.up_proj.weight": torch.zeros(95, 64)})  # fmt: skip
    _save_weights(_checkpoint(zoo, "extra-tensor", good), {**weights, "model.layers.0.mystery.weight": torch.zeros(2)})
    bad_index = _checkpoint(zoo, "bad-index", good)
    weight_map = {k: "model.safetensors" for k in weights} | {"model.norm.weight": "model-00002-of-00002.safetensors"}
    (bad_index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    for name, content in {
        "cfg-empty": {}, "cfg-list": b"[1, 2]", "cfg-latin1": b'{"model_type": "llama", "name": "caf\xe9"}',
        "cfg-binary": b"\x00\x01\x02{}", "cfg-notjson": b'{"model_type": "llama",\n "hidden_size": }',
        "cfg-bert": {"model_type": "bert"}, "cfg-type-null": {**config, "model_type": None},
        "cfg-type-list": {**config, "model_type": ["llama"]}, "cfg-str": {**config, "hidden_size": "64"},
        "cfg-float": {**config, "intermediate_size": 96.5}, "cfg-bool": {**config, "num_hidden_layers": True},
        "cfg-zero-heads": {**config, "num_attention_heads": 0}, "cfg-neg-layers": {**config, "num_hidden_layers": -2},
        "cfg-no-hidden": {k: v for k, v in config.items() if k != "hidden_size"},
        "cfg-kv3": {**config, "num_key_value_heads": 3},
        "cfg-deep": b'{"model_type": "llama", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "cfg-rope": {**config, "rope_parameters": "abc"},  # transformers 5 checks the field's type
        "cfg-nan": json.dumps({**config, "rms_norm_eps": float("nan")}).encode(),  # json writes NaN
        "cfg-inf": json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": float("inf")}}).encode(),
        # 12 heads of 32 in 2 groups over 72 channels: --heads 10 fits the groups but not the hidden size.
        "wide": {**config, "hidden_size": 72, "num_attention_heads": 12, "num_key_value_heads": 2},
    }.items():  # fmt: skip
        _config(zoo, name, content)
    for name in ("cfg-zero-heads",):  # a checkpoint whose weights are fine but whose config is not
        shutil.copy(good / "model.safetensors", zoo / name)

    text = "\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(400))
    (zoo / "calib.txt").write_text(text)
    (zoo / "calib.csv").write_text("text\nhello\n")
    (zoo / "binary.txt").write_bytes(b"some text\n\x00\x01\x02\xff" * 50)
    (zoo / "latin1.txt").write_bytes(b"line one\nline two\n" + LATIN1)
    (zoo / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "' + LATIN1.strip() + b'"}\n')
    (zoo / "notjson.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (zoo / "calib-folder").mkdir()
    (zoo / "calib-folder" / "a.txt").write_text(text)
    (zoo / "calib-folder" / "b.txt").write_bytes(LATIN1)

    (zoo / "latin1.yaml").write_bytes(TINY_RECIPE.read_bytes() + b"# " + LATIN1)
    (zoo / "binary.yaml").write_bytes(b"\x00\x00\x00\x08binary")
    (zoo / "list.yaml").write_text("- a\n- b\n")
    (zoo / "token-cache").mkdir()  # distill's token cache: a row that tokenized anything would leave files here

    for name, relative, content in (
        ("eval-latin1", "wikitext-2-raw/wiki.test.raw", b" = Title = \n" + LATIN1),
        ("eval-binary", "gsm8k/test.jsonl", b"\x00\x01binary\n"),
        ("eval-mmlu-latin1", "mmlu/test/philosophy_test.csv", b"question,choice0,choice1,choice2,choice3,answer\n" + LATIN1),
        ("eval-no-answer", "gsm8k/test.jsonl", b'{"question": "1 + 1?"}\n'),
        ("eval-empty-wikitext", "wikitext-2-raw/wiki.test.raw", b"\n \n"),
    ):
        shutil.copytree(EVAL_DATA, zoo / name)
        (zoo / name / relative).write_bytes(content)

    (zoo / "latin1.json").write_bytes(b'{"minitron": "' + LATIN1.strip() + b'"}')
    (zoo / "binary.json").write_bytes(b"\x00\x01\x02")
    (zoo / "lm-eval.json").write_text(json.dumps({"lm_eval_version": "0.4", "results": {}}))
    _outputs_zoo(zoo)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    build_zoo(root)
    return root


def snapshot(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``roots`` (hidden ones included) with its mode, and for files their size and
    modification time. (A folder's time changes when a temporary file is made and removed inside it, which
    leaves nothing behind.)"""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()
            is_file = not path.is_dir()
            found[str(path)] = (stat.st_mode, stat.st_size if is_file else 0, stat.st_mtime_ns if is_file else 0)
    return found


@pytest.mark.parametrize("row", CASES, ids=[c.id for c in CASES])
def test_bad_input(row: Case, zoo: Path, tmp_path: Path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # anything written to the working directory lands in the snapshot
    args = [a.format(zoo=zoo, tmp=work, repo=REPO) for a in row.args]
    before = snapshot(zoo, work)
    result = minitron(*args, cwd=work) if row.process else minitron_in_process(*args)
    assert_user_error(result, *row.words, code=row.code)
    after = snapshot(zoo, work)
    changed = sorted(set(before) ^ set(after)) + sorted(k for k in before if k in after and before[k] != after[k])
    assert not changed, f"on disk after a refused command: {changed}"


def test_the_table_covers_every_verb():
    verbs = {c.args[0] for c in CASES}
    assert {"inspect", "importance", "prune", "distill", "eval", "report", "quickstart"} <= verbs
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)



# --- helper `outputs`: a distillation run folder to resume ----------------------------------------------------


def _outputs_zoo(zoo: Path) -> None:
    """``old-run``: the recipe.yaml of a run started with loss.temperature=2, as ``distill`` leaves it."""
    from minitron.recipe import load_recipe

    overrides = [a.format(zoo=zoo, tmp="unused", repo=REPO) for a in DISTILL_GOOD.split()[2:]]
    old = load_recipe(TINY_RECIPE, [*overrides, f"output.dir={zoo / 'old-run'}", "loss.temperature=2"])
    (zoo / "old-run").mkdir()
    (zoo / "old-run" / "recipe.yaml").write_text(old.to_yaml())
