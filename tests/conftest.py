"""Shared fixtures: tiny Hugging Face model directories built once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_llm.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """`factory(family="qwen3", tie_word_embeddings=False, dtype="float32", **shape)` -> cached model dir."""
    cache: dict[tuple, Path] = {}

    def factory(family: str = "qwen3", tie_word_embeddings: bool = False, dtype: str = "float32", **shape) -> Path:
        key = (family, tie_word_embeddings, dtype, tuple(sorted(shape.items())))
        if key not in cache:
            name = f"{family}_{'tied' if tie_word_embeddings else 'untied'}_{dtype}_{len(cache)}"
            cache[key] = build_tiny_model(tmp_path_factory.mktemp("models") / name, family,
                                          tie_word_embeddings=tie_word_embeddings, dtype=dtype, **shape)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_tied(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen3", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"{SHARED_DATASETS} is absent: the shared demo datasets live beside the checkout")
    return SHARED_DATASETS


def run_cli(*args: str, cwd: Path = REPO, check: bool = True, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repo root; returns the completed process (text output)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_torchrun(script: str, *args: str, nproc: int = 2, check: bool = True, env: dict | None = None,
                 timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node N script args...` on a free port (gloo on CPU)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return run_cli("-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                   "--master_port", str(port), script, *args, check=check, env=env, timeout=timeout)
