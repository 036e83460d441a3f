"""Reading and writing Hugging Face safetensors directories, one tensor at a time."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Optional

import torch

from mindspeed_llm.checkpoint.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied from --hf-cfg-dir next to exported weights (config, generation config, tokenizer, remote code).
CFG_PATTERNS = ("*.json", "*.model", "*.model.*", "*.jinja", "merges.txt", "*.tiktoken", "modeling_*.py",
                "configuration_*.py", "tokenization_*.py")


class SafetensorsSource:
    """Lazy reader over an HF directory's safetensors shards (`TensorSource` for the family rules).

    Files are opened on first use and memory-mapped by safetensors. `get` and `get_slice` return zero-copy views
    of the mapping (safetensors >= 0.6), so a vocab-parallel shard of a large embedding is never read whole; a
    view keeps its shard file mapped until it dies, so results that outlive a layer must go through `own`.
    """

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise ConversionError(f"--load-dir {self.dir} is not a directory; point it at the Hugging Face model "
                                  f"directory (config.json + *.safetensors)")
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConversionError(f"{index} is not a valid safetensors index ({exc}); re-download it or remove "
                                      f"it if the model has a single model.safetensors") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise ConversionError(f"{self.dir}: shard {missing[0]} named in {INDEX_NAME} is missing"
                                      f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                      f"re-download the model files")
            self.weight_map: dict[str, str] = dict(weight_map)
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                bins = sorted(p.name for p in self.dir.glob("pytorch_model*.bin"))
                hint = (f"found {bins[0]}: convert it to safetensors first (transformers save_pretrained)" if bins
                        else "no *.safetensors weights found")
                raise ConversionError(f"--load-dir {self.dir}: {hint}")
            if len(files) > 1:
                raise ConversionError(f"{self.dir} holds {len(files)} safetensors files but no {INDEX_NAME}; add "
                                      f"the index file")
            from safetensors import safe_open

            with safe_open(str(self.dir / files[0]), "pt") as f:
                self.weight_map = {k: files[0] for k in f.keys()}
        self._stack = ExitStack()
        self._open: dict[str, object] = {}
        self._lent: set[int] = set()   # storage addresses of the mapped tensors handed out since `release`

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()
        self._lent.clear()

    def release(self, keep: Iterable[str] = ()) -> None:
        """Close shard files not named in `keep` (bounds open mappings while streaming layer by layer)."""
        keep = set(keep)
        for name in [n for n in self._open if n not in keep]:
            del self._open[name]
        if not self._open:
            self.close()
            self._stack = ExitStack()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        if name not in self.weight_map:
            raise ConversionError(f"{self.dir}: tensor {name} is missing from the checkpoint (not in any shard); "
                                  f"the weights do not match config.json")
        fname = self.weight_map[name]
        if fname not in self._open:
            from safetensors import safe_open

            self._open[fname] = self._stack.enter_context(safe_open(str(self.dir / fname), "pt"))
        return self._open[fname]

    def files_for(self, names: Iterable[str]) -> set[str]:
        return {self.weight_map[n] for n in names if n in self.weight_map}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._lend(self._file(name).get_tensor(name))

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        sl = self._file(name).get_slice(name)
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return self._lend(sl[index]).contiguous()

    def _lend(self, t: torch.Tensor) -> torch.Tensor:
        self._lent.add(t.untyped_storage().data_ptr())
        return t

    def own(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as a compact tensor in its own (anonymous) memory: copies views of a mapped shard, and of any larger
        storage, so that keeping `t` neither pins a shard's mapping nor makes torch.save write the parent."""
        storage = t.untyped_storage()
        if (storage.data_ptr() in self._lent or storage.nbytes() != t.numel() * t.element_size()
                or not t.is_contiguous()):
            return t.clone(memory_format=torch.contiguous_format)
        return t


class SafetensorsWriter:
    """Writes `model-XXXXX-of-NNNNN.safetensors` files and, on `finish()`, the index (written last)."""

    def __init__(self, out_dir: Path, num_files: int):
        self.dir = out_dir
        self.num_files = num_files
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def file_name(self, k: int) -> str:
        return f"model-{k:05d}-of-{self.num_files:05d}.safetensors"

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = self.file_name(k)
        tensors = {n: t.contiguous() for n, t in tensors.items()}
        save_file(tensors, str(self.dir / name), metadata={"format": "pt"})
        for n, t in tensors.items():
            self.weight_map[n] = name
            self.total_size += t.numel() * t.element_size()

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=4) + "\n")


def copy_hf_cfg(cfg_dir: Path, out_dir: Path) -> list[str]:
    """Copy config/tokenizer files (never weights or the old index) from `cfg_dir` into `out_dir`."""
    copied = []
    for pattern in CFG_PATTERNS:
        for src in sorted(cfg_dir.glob(pattern)):
            if src.name == INDEX_NAME or not src.is_file():
                continue
            shutil.copy2(src, out_dir / src.name)
            copied.append(src.name)
    return copied


def publish_dir(tmp: Path, final: Path, last: Optional[str] = None) -> None:
    """Move the finished files of `tmp` into `final` (created if needed), `last` after all others; remove tmp."""
    final.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in tmp.iterdir())
    if last in names:
        names.remove(last)
        names.append(last)
    stale = final / INDEX_NAME
    if stale.exists():
        stale.unlink()            # an old index must not describe a half-replaced directory
    for name in names:
        os.replace(tmp / name, final / name)
    tmp.rmdir()
