"""`--tokenizer-type PretrainedFromHF`: a local Hugging Face tokenizer, made to agree with the chat template."""
from __future__ import annotations

import json
from pathlib import Path

from mindspeed_llm.errors import UserError

TOKENIZER_TYPES = ("PretrainedFromHF",)


def _auto_map_file(path: Path) -> str | None:
    """The config file in `path` whose `auto_map` names custom tokenizer code, if any."""
    for name in ("tokenizer_config.json", "config.json"):
        try:
            auto_map = json.loads((path / name).read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map:
            return name
    return None


def build_tokenizer(name_or_path: str | None, use_fast: bool = True, template=None,
                    tokenizer_type: str = "PretrainedFromHF", seq_length: int | None = None,
                    trust_remote_code: bool = False):
    """Load the tokenizer from a local directory; with a chat template, eos becomes its stop word.
    Python files shipped in the directory run only with `trust_remote_code` (--trust-remote-code)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise UserError(f"--tokenizer-type {tokenizer_type!r} is not supported; use {', '.join(TOKENIZER_TYPES)}")
    if not name_or_path:
        raise UserError("--tokenizer-name-or-path is required (the Hugging Face model directory)")
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise UserError(f"--tokenizer-name-or-path {name_or_path}: no such directory")
    from transformers import AutoTokenizer

    kwargs = {"model_max_length": seq_length} if seq_length else {}
    custom = _auto_map_file(path)
    if custom and not trust_remote_code:
        # transformers would quietly fall back to a built-in class, which may tokenize differently
        raise UserError(f"--tokenizer-name-or-path {name_or_path}: its tokenizer is custom Python code (auto_map "
                        f"in {custom}), which is not run unless you pass --trust-remote-code (only for a "
                        f"directory you trust)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                  trust_remote_code=trust_remote_code, use_fast=use_fast, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--tokenizer-name-or-path {name_or_path}: cannot load a tokenizer ({first})") from None
    tokenizer.padding_side = "right"
    if template is not None:
        from mindspeed_llm.data.templates import fix_tokenizer

        fix_tokenizer(tokenizer, template)
    elif tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: vocabulary, BPE merges, added tokens and special tokens. The same for
    the fast and slow class of one tokenizer, different when any id or merge differs (a name alone does not)."""
    import hashlib
    import json

    merges: list[str] = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    elif getattr(tokenizer, "bpe_ranks", None):
        merges = [" ".join(pair) for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    added = sorted((int(i), str(t.content), bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items())
    blob = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "merges": merges, "added": added,
                       "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}},
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
