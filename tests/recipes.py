"""MindSpeed-LLM's published dense Qwen3 recipes, read from /work/shared/reference/mindspeed_qwen3_recipes.md
(sections `qwen3/...` and `v2.1.0/...`), with only paths, shapes and sizes edited for the tiny model."""
from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mindspeed_qwen3_recipes.md"
if not REFERENCE.is_file():
    REFERENCE = Path("/work/shared/reference/mindspeed_qwen3_recipes.md")

# Dense Qwen3 recipes in scope: full and LoRA fine-tuning, dense pretraining, generation, data and checkpoint
# conversion (no eval/DPO).
IN_SCOPE = re.compile(r"^(qwen3|v2\.1\.0)/(tune_\w*_(full|lora)\w*|pretrain_qwen3_\d\w*_4K_ptd\w*|generate_\w+|"
                      r"data_convert_\w+|ckpt_convert_\w+)$")

# --max-position-embeddings stays the recipe's (4096, 32768, 40960): a run setting that differs from the tiny
# model's 512 as MindSpeed's values differ from the published Qwen3 configs' 40960.
TINY_SHAPE = {"--num-layers": "4", "--hidden-size": "64", "--ffn-hidden-size": "128", "--num-attention-heads": "4",
              "--num-query-groups": "2", "--kv-channels": "16",
              "--padded-vocab-size": "448", "--seq-length": "128"}
SIZES = {"--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "1", "--context-parallel-size": "1",
         "--target-tensor-parallel-size": "1", "--target-pipeline-parallel-size": "1", "--micro-batch-size": "2",
         "--global-batch-size": "4", "--train-iters": "2", "--max-new-tokens": "4", "--workers": "1",
         "--save-interval": "2", "--num-layers-per-virtual-pipeline-stage": None}


def split_flags(argv: list[str]) -> list[list[str]]:
    """argv as [flag, values...] groups, in order."""
    flags: list[list[str]] = []
    for tok in argv:
        if tok.startswith("--"):
            flags.append([tok])
        else:
            flags[-1].append(tok)
    return flags


def load_recipes() -> dict[str, tuple[str, list[list[str]]]]:
    """name -> (entry script, flags as [flag, values...] in recipe order)."""
    text = REFERENCE.read_text()
    recipes = {}
    for block in re.finditer(r"^## (\S+)\n`(?:python|torchrun) (\S+)` \(\d+ flags\)\n```\n(.*?)```", text, re.M | re.S):
        name, script, body = block.groups()
        if not IN_SCOPE.match(name):
            continue
        flags = split_flags(body.split())
        recipes[name] = (script.lstrip("./"), flags)
    # v2.2.0 tune recipes: today's with the older dynamic-padding spelling (the reference's note on old releases)
    for name, (script, flags) in list(recipes.items()):
        if name.startswith("qwen3/tune_") and any(f[0] == "--no-pad-to-seq-lengths" for f in flags):
            recipes[name.replace("qwen3/", "v2.2.0/")] = (script, [["--variable-seq-lengths"] if f[0] ==
                                                                   "--no-pad-to-seq-lengths" else f for f in flags])
    return recipes


def edit(flags: list[list[str]], paths: dict[str, str], extra: dict[str, str] | None = None) -> list[str]:
    """argv with PATH values, model shape and parallel/batch sizes replaced (None: the size flag is dropped)."""
    table = {**TINY_SHAPE, **SIZES, **(extra or {})}
    argv: list[str] = []
    for flag, *values in flags:
        if flag in table:
            if table[flag] is None:
                continue
            values = [table[flag]]
        elif values == ["PATH"]:
            values = [paths[flag]]
        argv += [flag, *values]
    return argv


def recipe_argv(script: Path, tmp_path: Path, entry: str = "posttrain_gpt.py") -> list[str]:
    """The arguments one of our example recipes passes to `entry`, captured by a stand-in `torchrun`/`python`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    out = tmp_path / f"{script.stem}.args"
    for name in ("torchrun", "python", "python3"):
        fake = bin_dir / name
        fake.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {out}\n')
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True, capture_output=True)
    argv = out.read_text().splitlines()
    return argv[argv.index(entry) + 1:]


def tied(flags: list[list[str]]) -> bool:
    return not any(f[0] == "--untie-embeddings-and-output-weights" for f in flags)
