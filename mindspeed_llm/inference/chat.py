"""Interactive chat on rank 0: input is broadcast to every rank, the answer streams as it is generated."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from mindspeed_llm.inference import comm
from mindspeed_llm.inference.engine import Engine
from mindspeed_llm.inference.sampling import sampling_for

QUIT = ("q", "quit", "exit")
CLEAR = ("clear", "new")
HIDDEN = ("\ufffd", "<think>", "</think>")   # never shown while streaming


def _banner() -> None:
    print("=" * 46)
    print(f"1. If you want to quit, please entry one of [{', '.join(QUIT)}]")
    print(f"2. To create new title, please entry one of [{', '.join(CLEAR)}]")
    sys.stdout.flush()


def _read_line() -> Optional[str]:
    """One line from stdin on rank 0 (None at end of input); undecodable bytes are dropped."""
    sys.stdout.write("\n\nYou >> ")
    sys.stdout.flush()
    raw = sys.stdin.buffer.readline()
    if not raw:
        return None
    return raw.decode("utf-8", errors="ignore").strip()


def _visible(text: str) -> str:
    for token in HIDDEN:
        text = text.replace(token, "")
    return text


class _Streamer:
    """Prints the new part of the decoded answer after each step (rank 0 only)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.shown = engine, ""

    def __call__(self, _t: int, outputs: list[list[int]]) -> None:
        text = _visible(self.engine.decode(outputs[0]))
        if text.startswith(self.shown) and len(text) > len(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


class History:
    """Template mode: role messages, the oldest turn dropped beyond --history-turns. Raw mode: earlier prompts
    and answers concatenated ahead of the new prompt (the reference's no-template behaviour, keeping the newest
    turns)."""

    def __init__(self, turns: int, templated: bool) -> None:
        self.turns, self.templated = turns, templated
        self.messages: list[dict[str, str]] = []

    def prompt_ids(self, engine: Engine, text: str) -> list[int]:
        if self.templated:
            return engine.builder.from_messages(self.messages + [{"role": "user", "content": text}])
        raw = "".join(m["content"] for m in self.messages) + text
        return engine.builder.from_text(raw)

    def add(self, question: str, answer: str) -> None:
        self.messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        del self.messages[:max(0, len(self.messages) - 2 * self.turns)]

    def clear(self) -> None:
        self.messages = []


def chat_loop(engine: Engine, args: argparse.Namespace) -> None:
    rank0 = comm.world_rank() == 0
    params = sampling_for("chat", args)
    history = History(args.history_turns, engine.builder.templated)
    if rank0:
        _banner()
    while True:
        line = _read_line() if rank0 else None
        line = comm.broadcast_object(line)
        if line is None or line.lower() in QUIT:
            break
        if not line:
            continue
        if line.lower() in CLEAR:
            history.clear()
            if rank0 and sys.stdout.isatty():
                sys.stdout.write("\033[2J\033[H")
            continue
        try:
            ids = comm.agree(lambda: engine.fit(history.prompt_ids(engine, line), "chat input"))
        except Exception as exc:        # a too-long turn: say so and keep chatting
            if rank0:
                print(f"\n[{exc}]")
            history.clear()
            continue
        if rank0:
            sys.stdout.write("\nMindSpeed-LLM:\n")
        streamer = _Streamer(engine) if rank0 else None
        out = engine.generate([ids], params, on_step=streamer).outputs[0]
        history.add(line, engine.decode(out))
    if rank0:
        sys.stdout.write("\n")
        sys.stdout.flush()
