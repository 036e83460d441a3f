"""Reference harness: token ids and labels exactly as LLaMA-Factory 0.9.5 builds them.

Used by `tests/test_lf_parity.py` to check `preprocess_data.py` against the real LLaMA-Factory code, not a copy,
and by `benchmarks/bench_preprocess.py` (`lf_throughput`: LF's preprocessing timed as LF runs it, num_proc workers).

How LLaMA-Factory is imported
-----------------------------
* `ensure_llamafactory()` installs the PyPI wheel `llamafactory==0.9.5` with `pip install --no-deps --target
  <repo>/.cache/lf-0.9.5` (once; the folder is reused). None of LF's own dependencies are installed.
* LF is imported in a separate worker process (`python tests/lf_reference.py --serve SITE`), so nothing below
  leaks into the test process. The worker registers *empty package shells* for `llamafactory`,
  `llamafactory.extras`, `llamafactory.data`, `llamafactory.data.processor` and `llamafactory.hparams` whose
  `__path__` points into the installed wheel: their submodules are LF's real files, but the package
  `__init__`s (which import accelerate, peft, trl, the trainer, the web UI ...) are not run. There are two
  stand-ins: one is `peft.utils` with its two file-name constants, imported by `llamafactory.extras.constants`,
  and only when peft is not installed; the other is a `torchaudio` whose every attribute raises (imported by
  `llamafactory.data.mm_plugin`, used only to load audio inputs), only when torchaudio is not installed.
* Then the worker runs LF's own pipeline for a file-based dataset: `datasets.load_dataset("json", ...)` (as LF's
  loader does for local files), `DatasetAttr.join(dataset_info_entry)` (LF's `dataset_info.json` semantics for
  `columns`/`tags`), `converter.align_dataset` (alpaca/sharegpt -> LF's `_prompt/_response/_system/_tools`),
  `template.get_template_and_fix_tokenizer` with a real `DataArguments`, and `dataset.map` of
  `SupervisedDatasetProcessor.preprocess_dataset` or `PairwiseDatasetProcessor.preprocess_dataset` (batched),
  with `cutoff_len` given, `train_on_prompt=False`, `mask_history=False`, no packing.
* The tokenizer is loaded as LF's `load_tokenizer` does: `AutoTokenizer.from_pretrained(path, use_fast=True,
  split_special_tokens=False, padding_side="right")`.

LF drops invalid rows (wrong role order, odd/even message count, missing pairwise response). Every returned
sample carries `source_index`, the 0-based index of the input row it came from, so callers can align samples.

Command line (for eyeballing): `python tests/lf_reference.py --demo TOKENIZER_DIR` prints a few encoded records;
`python tests/lf_reference.py --request job.json` runs one job and prints its JSON result.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Optional

LF_VERSION = "0.9.5"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_SITE = REPO / ".cache" / f"lf-{LF_VERSION}"
IGNORE_INDEX = -100

# Our --prompt-type -> LLaMA-Factory template name.
OUR_TO_LF_TEMPLATE = {"qwen3": "qwen3", "qwen_lf": "qwen"}


class LFUnavailable(RuntimeError):
    """LLaMA-Factory could not be installed or imported; callers skip with this message."""


# --------------------------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------------------------
def _installed(site: Path) -> bool:
    return (site / "llamafactory" / "data" / "template.py").is_file() and (site / ".lf-complete").is_file()


def ensure_llamafactory(dest: Path | str = DEFAULT_SITE, timeout: float = 300) -> Path:
    """Install `llamafactory==0.9.5` (wheel only, --no-deps) into `dest` unless already there; return `dest`.

    `LF_WHEEL=/path/to/llamafactory-0.9.5-py3-none-any.whl` installs from a local wheel instead of the index.
    Raises `LFUnavailable` with pip's output when the install fails.
    """
    dest = Path(dest)
    if _installed(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    spec = os.environ.get("LF_WHEEL") or f"llamafactory=={LF_VERSION}"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check",
           "--no-warn-script-location", "--quiet", "--target", str(tmp), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not (tmp / "llamafactory" / "data" / "template.py").is_file():
            raise LFUnavailable(f"`{' '.join(cmd)}` failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}"
                                f"\n{proc.stderr[-2000:]}")
        (tmp / ".lf-complete").write_text(spec + "\n")
        if _installed(dest):  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except subprocess.TimeoutExpired as e:
        raise LFUnavailable(f"`{' '.join(cmd)}` timed out after {timeout}s") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------------------------
# Inside the worker process: import LF's real modules and run its pipeline
# --------------------------------------------------------------------------------------------------------------
_LF: dict[str, Any] = {}


def _import_llamafactory(site: Path) -> dict[str, Any]:
    """Import LF's data modules from `site` without running its package __init__s (worker process only)."""
    if _LF:
        return _LF
    import importlib
    import importlib.util
    import types

    site = Path(site)
    root = site / "llamafactory"
    for name in ("llamafactory", "llamafactory.extras", "llamafactory.hparams", "llamafactory.data",
                 "llamafactory.data.processor"):
        shell = types.ModuleType(name)
        shell.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        shell.__package__ = name
        shell.__file__ = None
        sys.modules[name] = shell
    if importlib.util.find_spec("peft") is None:  # llamafactory.extras.constants imports two constants from it
        peft = types.ModuleType("peft")
        peft_utils = types.ModuleType("peft.utils")
        peft_utils.SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
        peft_utils.WEIGHTS_NAME = "adapter_model.bin"
        peft.utils = peft_utils
        sys.modules["peft"] = peft
        sys.modules["peft.utils"] = peft_utils
    if importlib.util.find_spec("torchaudio") is None:  # llamafactory.data.mm_plugin imports it for audio inputs
        import importlib.machinery

        from transformers.utils import import_utils

        import_utils.is_torchaudio_available()  # cached as False before the stand-in exists
        torchaudio = types.ModuleType("torchaudio")
        torchaudio.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)

        def _no_audio(name: str):
            raise AttributeError(f"torchaudio.{name}: torchaudio is not installed; the parity jobs hold no audio")

        torchaudio.__getattr__ = _no_audio
        sys.modules["torchaudio"] = torchaudio
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "ERROR")
    mods = {
        "template": importlib.import_module("llamafactory.data.template"),
        "converter": importlib.import_module("llamafactory.data.converter"),
        "parser": importlib.import_module("llamafactory.data.parser"),
        "data_args": importlib.import_module("llamafactory.hparams.data_args"),
        "supervised": importlib.import_module("llamafactory.data.processor.supervised"),
        "pairwise": importlib.import_module("llamafactory.data.processor.pairwise"),
    }
    for mod in mods.values():
        if not str(Path(mod.__file__).resolve()).startswith(str(root.resolve())):
            raise LFUnavailable(f"{mod.__name__} was imported from {mod.__file__}, not from {root}")
    _LF.update(mods)
    return _LF


def _default_columns(formatting: str, ranking: bool, keys: set[str]) -> dict[str, str]:
    """dataset_info `columns` for the usual column names, listing only the optional ones the data has."""
    if formatting == "alpaca":
        cols = {"prompt": "instruction", "query": "input", "response": "output"}
        optional = ("system", "history")
    else:
        cols = {"messages": "conversations"}
        optional = ("system", "tools")
    if ranking:
        cols.update(chosen="chosen", rejected="rejected")
    cols.update({k: k for k in optional if k in keys})
    return cols


def _lf_pipeline(lf: dict[str, Any], job: dict[str, Any], data_file: Path, cache_dir: Path,
                 num_proc: Optional[int] = None) -> tuple[Any, Any, Any]:
    """LF's loader path for one local file: (loaded dataset, aligned dataset, dataset processor).

    `num_proc` is LF's `preprocessing_num_workers` (used by load_dataset and align_dataset, as in LF).
    """
    import datasets
    from transformers import AutoTokenizer

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    formatting = job["formatting"]
    ranking = job.get("stage", "sft") == "rm"
    if formatting not in ("alpaca", "sharegpt"):
        raise ValueError(f"formatting must be alpaca or sharegpt, got {formatting!r}")
    # LF's loader, load_from == "file": load_dataset(<file type>, data_files=[...], split="train")
    ext = data_file.suffix.lstrip(".")
    file_type = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow"}[ext]
    dataset = datasets.load_dataset(file_type, data_files=[str(data_file)], split="train", cache_dir=str(cache_dir),
                                    num_proc=num_proc)
    keys = set(dataset.column_names)

    info = {"file_name": data_file.name, "formatting": formatting, "ranking": ranking}
    info["columns"] = job.get("columns") or _default_columns(formatting, ranking, keys)
    if job.get("tags"):
        info["tags"] = job["tags"]
    attr = lf["parser"].DatasetAttr("file", dataset_name=data_file.name)
    attr.join(info)

    data_args = lf["data_args"].DataArguments(
        template=job["template"], dataset_dir=str(data_file.parent), cutoff_len=int(job["cutoff_len"]),
        train_on_prompt=False, mask_history=False, enable_thinking=job.get("enable_thinking", True),
        overwrite_cache=True, preprocessing_num_workers=num_proc, packing=False, tool_format=job.get("tool_format"),
        default_system=job.get("default_system"))

    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"], use_fast=True, split_special_tokens=False,
                                              padding_side="right")
    template = lf["template"].get_template_and_fix_tokenizer(tokenizer, data_args)
    aligned = lf["converter"].align_dataset(dataset, attr, data_args, _TrainingArgs())

    cls = lf["pairwise"].PairwiseDatasetProcessor if ranking else lf["supervised"].SupervisedDatasetProcessor
    return dataset, aligned, cls(template=template, tokenizer=tokenizer, processor=None, data_args=data_args)


def _job_data_file(job: dict[str, Any], tmp: Path) -> Path:
    if job.get("data_file"):
        return Path(job["data_file"]).resolve()
    data_file = tmp / "data.json"
    data_file.write_text(json.dumps(job["records"], ensure_ascii=False))
    return data_file


def _run_job(site: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Encode one dataset with LF. See `lf_encode` for the job fields (`lf_throughput` for kind "throughput")."""
    lf = _import_llamafactory(site)
    if job.get("kind") == "throughput":
        return _throughput_job(lf, job)
    ranking = job.get("stage", "sft") == "rm"
    with tempfile.TemporaryDirectory(prefix="lf-job-") as tmp:
        tmp = Path(tmp)
        dataset, aligned, processor = _lf_pipeline(lf, job, _job_data_file(job, tmp), tmp / "hf-cache")

        # LF's _get_preprocessed_dataset: dataset.map(processor.preprocess_dataset, batched=True, ...). Batches of
        # one row let us record which input row each kept sample came from (the processor is row-independent).
        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            out = processor.preprocess_dataset(batch)
            n = len(next(iter(out.values()))) if out else 0
            out = {k: v for k, v in out.items() if k not in ("images", "videos", "audios")}
            out["source_index"] = [indices[0]] * n
            return out

        columns = list(next(iter(aligned)).keys()) if len(aligned) else []
        encoded = aligned.map(encode, batched=True, batch_size=1, with_indices=True, remove_columns=columns,
                              load_from_cache_file=False, keep_in_memory=True)
        rows = encoded.to_list()
        want = (["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"] if ranking
                else ["input_ids", "labels"])
        samples = [{"source_index": r["source_index"], **{k: list(r[k]) for k in want}} for r in rows]
        result: dict[str, Any] = {"n_input": len(dataset), "samples": samples,
                                  "eos_token_id": processor.tokenizer.eos_token_id,
                                  "pad_token_id": processor.tokenizer.pad_token_id}
        if job.get("with_aligned"):
            result["aligned"] = [{k: r[k] for k in ("_prompt", "_response", "_system", "_tools")}
                                 for r in aligned.to_list()]
        return result


def _throughput_job(lf: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Time LF's whole supervised path on a file, run as LF runs it (`preprocessing_num_workers` = workers)."""
    import time

    workers = int(job["workers"])
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        cpu_start = cpu_seconds()
        start = time.perf_counter()
        _, aligned, processor = _lf_pipeline(lf, job, Path(job["data_file"]).resolve(), Path(tmp) / "hf-cache",
                                             num_proc=workers)
        # LF's _get_preprocessed_dataset, verbatim but for `desc`
        encoded = aligned.map(processor.preprocess_dataset, batched=True,
                              batch_size=processor.data_args.preprocessing_batch_size,
                              remove_columns=list(next(iter(aligned)).keys()), num_proc=workers,
                              load_from_cache_file=False)
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu_start
        import pyarrow.compute as pc

        ids, labels = (pc.list_flatten(encoded.data.column(c)) for c in ("input_ids", "labels"))
        first = encoded.select(range(min(int(job.get("first_n", 0)), len(encoded)))).to_list()
        return {"seconds": seconds, "cpu_seconds": cpu, "samples": len(encoded), "tokens": len(ids),
                "supervised_tokens": int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0),
                "first": [[r["input_ids"], r["labels"]] for r in first]}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool workers are joined when a map ends)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _TrainingArgs:
    """The two fields of Seq2SeqTrainingArguments that align_dataset reads."""

    local_process_index = 0
    should_log = False


def _serve(site: Path) -> None:
    """Worker loop: one JSON job per stdin line -> one JSON result per line on the original stdout."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything LF/datasets print goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    try:
        _import_llamafactory(site)
        out.write(json.dumps({"ready": True}) + "\n")
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        out.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}) + "\n")
        out.flush()
        return
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = {"ok": True, **_run_job(site, json.loads(line))}
        except BaseException as e:  # noqa: BLE001
            import traceback

            reply = {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# --------------------------------------------------------------------------------------------------------------
# In the caller (test) process
# --------------------------------------------------------------------------------------------------------------
class LFWorker:
    """A long-lived `python tests/lf_reference.py --serve SITE` process (imports LF once, ~5 s)."""

    def __init__(self, site: Path | str | None = None, startup_timeout: float = 180):
        self.site = Path(site) if site else ensure_llamafactory()
        self._lock = threading.Lock()
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "LLAMAFACTORY_VERBOSITY": "ERROR"}
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(self.site)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     cwd=str(REPO), env=env, bufsize=1)
        hello = self._readline(startup_timeout)
        if not hello.get("ready"):
            self.close()
            raise LFUnavailable(f"LLaMA-Factory {LF_VERSION} could not be imported from {self.site}:\n"
                                f"{hello.get('error', '')}")

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-3000:]

    def _readline(self, timeout: float) -> dict:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            self.proc.kill()
            raise LFUnavailable(f"LF worker gave no answer in {timeout}s; stderr:\n{self._stderr_tail()}")
        if not result or not result[0]:
            raise LFUnavailable(f"LF worker exited (rc {self.proc.poll()}); stderr:\n{self._stderr_tail()}")
        return json.loads(result[0])

    def call(self, job: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        with self._lock:
            if self.proc.poll() is not None:
                raise LFUnavailable(f"LF worker is not running (rc {self.proc.returncode}); "
                                    f"stderr:\n{self._stderr_tail()}")
            self.proc.stdin.write(json.dumps(job, ensure_ascii=False) + "\n")
            self.proc.stdin.flush()
            reply = self._readline(timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"LLaMA-Factory failed on this job:\n{reply.get('error')}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        self._stderr.close()


_WORKER: Optional[LFWorker] = None


def get_worker(site: Path | str | None = None) -> LFWorker:
    """The process-wide worker, started on first use and closed at exit."""
    global _WORKER
    if _WORKER is None or _WORKER.proc.poll() is not None:
        _WORKER = LFWorker(site)
        atexit.register(_WORKER.close)
    return _WORKER


def _thinking(enable_thinking: Any) -> Optional[bool]:
    """Accept True/False/None or our CLI spelling "true"/"false"/"none"."""
    if enable_thinking is None or isinstance(enable_thinking, bool):
        return enable_thinking
    value = str(enable_thinking).strip().lower()
    if value not in ("true", "false", "none"):
        raise ValueError(f"enable_thinking must be true, false or none, got {enable_thinking!r}")
    return {"true": True, "false": False, "none": None}[value]


def lf_encode(records: Optional[Iterable[dict]] = None, *, fmt: str, tokenizer_dir: Path | str, template: str,
              enable_thinking: Any = True, cutoff_len: int = 2048, pairwise: bool = False,
              columns: Optional[dict] = None, tags: Optional[dict] = None, data_file: Path | str | None = None,
              with_aligned: bool = False, worker: Optional[LFWorker] = None) -> dict[str, Any]:
    """Run LF on `records` (or on `data_file`); returns {"n_input", "samples": [...], "eos_token_id", ...}.

    `template` is LF's name ("qwen3", "qwen"); `columns`/`tags` are `dataset_info.json` entries (defaults: LF's
    column names, plus `system`/`history` (alpaca) or `system`/`tools` (sharegpt) when the data has them).
    `enable_thinking` True/False/None is LF's `DataArguments.enable_thinking` (None is allowed by its type).
    """
    if (records is None) == (data_file is None):
        raise ValueError("give exactly one of records or data_file")
    job = {"formatting": fmt, "stage": "rm" if pairwise else "sft", "tokenizer": str(tokenizer_dir),
           "template": template, "enable_thinking": _thinking(enable_thinking), "cutoff_len": int(cutoff_len),
           "columns": columns, "tags": tags, "with_aligned": with_aligned}
    if data_file is not None:
        job["data_file"] = str(Path(data_file).resolve())
    else:
        job["records"] = list(records)
    return (worker or get_worker()).call(job)


def lf_supervised(records: Optional[Iterable[dict]] = None, fmt: str = "alpaca", tokenizer_dir: Path | str = "",
                  template: str = "qwen3", enable_thinking: Any = True, cutoff_len: int = 2048, **kw
                  ) -> list[tuple[list[int], list[int]]]:
    """[(input_ids, labels)] per kept sample, as LF's SupervisedDatasetProcessor builds them."""
    res = lf_encode(records, fmt=fmt, tokenizer_dir=tokenizer_dir, template=template,
                    enable_thinking=enable_thinking, cutoff_len=cutoff_len, pairwise=False, **kw)
    return [(s["input_ids"], s["labels"]) for s in res["samples"]]


def lf_pairwise(records: Optional[Iterable[dict]] = None, fmt: str = "sharegpt", tokenizer_dir: Path | str = "",
                template: str = "qwen3", enable_thinking: Any = True, cutoff_len: int = 2048, **kw
                ) -> list[dict[str, list[int]]]:
    """[{chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels}] per kept sample (LF's
    PairwiseDatasetProcessor)."""
    res = lf_encode(records, fmt=fmt, tokenizer_dir=tokenizer_dir, template=template,
                    enable_thinking=enable_thinking, cutoff_len=cutoff_len, pairwise=True, **kw)
    return [{k: s[k] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
            for s in res["samples"]]


def lf_throughput(data_file: Path | str, *, tokenizer_dir: Path | str, template: str, enable_thinking: Any,
                  cutoff_len: int, workers: int, first_n: int = 0, worker: Optional[LFWorker] = None
                  ) -> dict[str, Any]:
    """Time LF's supervised path on an Alpaca file with `preprocessing_num_workers=workers`.

    Covers what LF does from the file to the tokenized dataset: load_dataset, tokenizer and template,
    align_dataset, and `dataset.map(SupervisedDatasetProcessor.preprocess_dataset, batched=True, num_proc=...)`
    writing Arrow cache files. Returns {"seconds" (wall), "cpu_seconds" (all its processes), "samples", "tokens",
    "supervised_tokens", "first": [[ids, labels]] for the first `first_n` samples}.
    """
    job = {"kind": "throughput", "formatting": "alpaca", "data_file": str(Path(data_file).resolve()),
           "tokenizer": str(tokenizer_dir), "template": template, "enable_thinking": _thinking(enable_thinking),
           "cutoff_len": int(cutoff_len), "workers": int(workers), "first_n": int(first_n)}
    return (worker or get_worker()).call(job, timeout=1800)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def _demo(tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    records = [
        {"instruction": "Reverse the word.", "input": "kalo", "output": "olak", "system": "Be brief.",
         "history": [["Add 1+2.", "3"]]},
        {"instruction": "Upper-case it.", "input": "mine", "output": "<think>\nupper\n</think>\n\nMINE"},
    ]
    for template in ("qwen3", "qwen"):
        for thinking in (True, False, None):
            res = lf_encode(records, fmt="alpaca", tokenizer_dir=tokenizer_dir, template=template,
                            enable_thinking=thinking, cutoff_len=1024)
            for s in res["samples"]:
                ids, labels = s["input_ids"], s["labels"]
                shown = "".join(tok.decode([i]) if l == IGNORE_INDEX else f"«{tok.decode([i])}»"
                                for i, l in zip(ids, labels))
                print(f"--- {template} enable_thinking={thinking} row {s['source_index']}\n{shown}")


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", metavar="SITE", help="worker mode (used by LFWorker)")
    p.add_argument("--install", metavar="DIR", nargs="?", const=str(DEFAULT_SITE), help="install the wheel")
    p.add_argument("--request", metavar="JOB_JSON", help="run one job (lf_encode fields) and print the result")
    p.add_argument("--demo", metavar="TOKENIZER_DIR", help="print a few records encoded by LF (trained in «»)")
    args = p.parse_args(argv)
    if args.serve:
        _serve(Path(args.serve))
    elif args.install:
        print(ensure_llamafactory(Path(args.install)))
    elif args.request:
        job = json.loads(Path(args.request).read_text())
        print(json.dumps(lf_encode(**job)))
    elif args.demo:
        _demo(args.demo)
    else:
        p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
