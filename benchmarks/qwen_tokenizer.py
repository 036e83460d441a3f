"""Build Qwen's tokenizer (151,643 byte-level BPE tokens + Qwen3's added tokens) from a `qwen.tiktoken` file.

No Qwen tokenizer ships with the project; the tiktoken rank file does ship in public wheels (e.g.
`pip download dashscope==1.20.0 --no-deps`, file `dashscope/resources/qwen.tiktoken`). The ranks are the
token ids; each token's merge is the last merge tiktoken's BPE makes when it encodes the token's own bytes
with the tokens ranked below it, which is how tiktoken vocabularies become Hugging Face merges. With
`tiktoken` installed the result is checked against tiktoken on the given texts.

    python benchmarks/qwen_tokenizer.py qwen.tiktoken OUT_DIR [--check FILE.json]
"""
from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

# Qwen2/Qwen3's pre-tokenizer split (single digits; tiktoken's cl100k pattern otherwise).
PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Ids 151643.. in order; the tag tokens are plain added tokens in Qwen3, the rest are special.
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
         "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
         "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
         "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
         "<think>", "</think>"]


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts tiktoken's BPE joins last when it encodes `token` with the tokens ranked below it."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, at = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best):
                best, at = rank, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not reachable by merges of lower rank")
    return parts[0], parts[1]


def build(tiktoken_file: Path, out_dir: Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = read_ranks(tiktoken_file)
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = sorted((r, last_merge(t, ranks)) for t, r in ranks.items() if len(t) > 1)
    bpe = Tokenizer(BPE(vocab, [(text(a), text(b)) for _, (a, b) in merges], fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    for token in ADDED:
        plain = token.strip("</>") in ("tool_call", "tool_response", "think")
        bpe.add_tokens([AddedToken(token, special=not plain, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)
    return fast, ranks


def check(fast, ranks: dict[bytes, int], texts: list[str]) -> str:
    """Ids of `texts` against tiktoken's encoding of the same ranks (NFC applied first, as the tokenizer does)."""
    import unicodedata

    import tiktoken

    specials = {t: fast.convert_tokens_to_ids(t) for t in ADDED}
    enc = tiktoken.Encoding("qwen", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    differ = sum(fast._tokenizer.encode(t, add_special_tokens=False).ids
                 != enc.encode(unicodedata.normalize("NFC", t), allowed_special="all") for t in texts)
    return f"{len(texts) - differ} of {len(texts)} texts give tiktoken's ids"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tiktoken_file", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--check", type=Path, help="a JSON list of records whose string values are compared with tiktoken")
    a = p.parse_args()
    fast, ranks = build(a.tiktoken_file, a.out_dir)
    print(f"{a.out_dir}: {len(fast)} tokens ({len(ranks)} BPE + {len(ADDED)} added), eos {fast.eos_token_id}")
    if a.check:
        texts = [v for r in json.loads(a.check.read_text()) for v in r.values() if isinstance(v, str) and v]
        print(check(fast, ranks, texts))


if __name__ == "__main__":
    main()
