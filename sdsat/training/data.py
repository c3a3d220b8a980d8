"""Training data: texts from a corpus, packed into fixed-length token rows.

Sources (``load_texts``):
- ``"stdlib"`` (default, offline): the Python source of this interpreter's standard library,
  tests excluded. Files are ordered by a hash of their relative path (deterministic, and a
  ``limit`` takes a spread of packages, not the alphabet's first) and split by file.
- a local ``.jsonl`` / ``.parquet`` / ``.txt`` file or a directory of them: one text per
  JSONL line or parquet row (field ``text_field``), one per text file. Split by record.
- a Hugging Face dataset id (``name`` or ``name:config``, with ``data_dir`` a folder inside
  its repository), where the hub is reachable; gated datasets read the token in ``HF_TOKEN``.

With ``chat=True`` each record's ``messages`` field (a list of {role, content}) is rendered
with the tokenizer's chat template. Splits are "train" and "validation", never overlapping: a
record goes to validation when a stable hash of its key falls below ``val_fraction``, except
that a Hub dataset with its own validation split ("validation", "valid" or "val"; never
"test") uses it and keeps its train split whole.

``self_distill`` replaces texts by the model's own greedy continuations of prompts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sysconfig
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
LOCAL_SUFFIXES = (".jsonl", ".parquet", ".txt")
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HF_VALIDATION_NAMES = ("validation", "valid", "val")  # "test" stays unseen: it is nobody's validation


def stdlib_files(split: str, val_fraction: float = 0.05) -> list[Path]:
    """The standard library's .py files of this split, in a fixed hash order."""
    _check_split(split, val_fraction)
    return [path for h, path in _stdlib_index() if (h < val_fraction) == (split == "validation")]


@functools.lru_cache(maxsize=1)
def _stdlib_index() -> tuple[tuple[float, Path], ...]:
    """(hash of the relative path, path) of every stdlib source file, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if STDLIB_EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]):
            files.append((_hash01(rel.as_posix()), rel.as_posix(), path))
    return tuple((h, path) for h, _, path in sorted(files))


def load_texts(
    source: str,
    split: str,
    *,
    text_field: str = "text",
    chat: bool = False,
    tokenizer=None,
    limit: int | None = None,
    val_fraction: float = 0.05,
    data_dir: str | None = None,
) -> list[str]:
    """Texts of one split of ``source`` (at most ``limit``); ValueError when there are none.

    chat: render ``text_field`` (``"messages"`` when left at "text") with the tokenizer's
    chat template. data_dir: for a Hub dataset, the folder of its repository to read.
    """
    _check_split(split, val_fraction)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if chat and tokenizer is None:
        raise ValueError("chat=True needs a tokenizer (its chat template formats the messages)")
    field = "messages" if chat and text_field == "text" else text_field
    local = source == "stdlib" or _is_local(source)
    if data_dir is not None and local:
        raise ValueError(f"data_dir={data_dir!r} applies to Hugging Face datasets, not to the local source {source!r}")
    if source == "stdlib":
        texts = _stdlib_texts(split, val_fraction, limit)
    else:
        records = _local_records(source, split, val_fraction) if local else _hub_records(source, split, val_fraction, data_dir)
        texts = []
        for key, record in records:
            text = _record_text(record, field, chat, tokenizer, f"{source} ({key})")
            texts += [text] if text.strip() else []
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise ValueError(f"data source {source!r} has no texts in split {split!r} (empty corpus)")
    return texts


def pack(texts: list[str], tokenizer, row_len: int):
    """Tokenize ``texts`` (EOS after each) and cut the stream into rows of exactly
    ``row_len`` tokens: a ``datasets.Dataset`` with one column, ``input_ids``."""
    import datasets

    if row_len < 2:
        raise ValueError(f"row_len must be >= 2, got {row_len}")
    sep = tokenizer.eos_token_id

    def tokenize(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + [sep] if sep is not None else x for x in ids]}

    def group(batch: dict) -> dict:
        return {"input_ids": pack_ids(batch["input_ids"], row_len)}

    ds = datasets.Dataset.from_dict({"text": list(texts)})
    ds = ds.map(tokenize, batched=True, remove_columns=["text"], desc="tokenize")
    ds = ds.map(group, batched=True, batch_size=1000, desc=f"pack rows of {row_len}")
    if len(ds) == 0:
        total = sum(len(t) for t in texts)
        raise ValueError(f"corpus too small: {len(texts)} texts ({total} chars) fill no row of {row_len} tokens")
    return ds


def pack_ids(sequences: list[list[int]], row_len: int) -> list[list[int]]:
    """Concatenate token sequences and cut them into rows of row_len; drop the remainder."""
    stream = [t for seq in sequences for t in seq]
    usable = len(stream) - len(stream) % row_len
    return [stream[i : i + row_len] for i in range(0, usable, row_len)]


def self_distill(loaded, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                 max_seconds: float | None = None, sampling: list | None = None,
                 on_batch: Callable[[list[list[int]]], None] | None = None) -> list[list[int]]:
    """Each prompt followed by the model's own continuation (plain decoding, SATs banned):
    greedy, or per prompt as ``sampling`` says (its SamplingParams; None: greedy).

    max_seconds: stop after the batch that crosses this time (the prompts done so far are
    returned), so the work fits a time budget at whatever speed this machine has.
    on_batch: called with the rows made so far after each batch (to save them as it goes).
    """
    from ..decode.generate import generate, make_sequences
    from .progress import Progress

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if sampling is not None and len(sampling) != len(prompts):
        raise ValueError(f"sampling has {len(sampling)} entries for {len(prompts)} prompts")
    out: list[list[int]] = []
    progress = Progress("self-distillation", len(prompts), "prompts", log)
    tokens = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        chunk_sampling = sampling[start : start + batch_size] if sampling is not None else None
        sequences = generate(loaded, make_sequences(loaded, chunk, max_new_tokens), num_sat=0, sampling=chunk_sampling)
        out.extend(list(s.prompt_ids) + list(s.output_ids) for s in sequences)
        tokens += sum(len(s.output_ids) for s in sequences)
        elapsed = time.perf_counter() - progress.start
        progress.update(len(out), extra=f"{tokens / elapsed:.0f} new tok/s")
        if on_batch is not None:
            on_batch(out)
        if max_seconds is not None and elapsed >= max_seconds and len(out) < len(prompts):
            log.info("self-distillation: time budget of %.0f s reached after %d of %d prompts", max_seconds, len(out), len(prompts))
            break
    return out


def _check_split(split: str, val_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _hash01(key: str) -> float:
    """A stable number in [0, 1) for a key (not Python's salted hash)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


def _stdlib_texts(split: str, val_fraction: float, limit: int | None) -> list[str]:
    texts = []
    for path in stdlib_files(split, val_fraction):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            texts.append(text)
        if limit is not None and len(texts) >= limit:
            break
    return texts


def _is_local(source: str) -> bool:
    path = Path(source).expanduser()
    if path.exists():
        return True
    if source.startswith((".", "/", "~")) or source.endswith(LOCAL_SUFFIXES):
        raise ValueError(f"data source {source!r}: no such file or directory")
    return False


def _local_records(source: str, split: str, val_fraction: float):
    """(key, record) pairs of this split from a local file or directory."""
    root = Path(source).expanduser()
    files = sorted(p for p in root.rglob("*") if p.suffix in LOCAL_SUFFIXES) if root.is_dir() else [root]
    if root.is_file() and root.suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"data source {source!r}: unsupported file type; use {', '.join(LOCAL_SUFFIXES)}")
    if not files:
        raise ValueError(f"data source {source!r}: no {', '.join(LOCAL_SUFFIXES)} files in the directory")
    for path in files:
        for index, record in _read_file(path):
            key = f"{path.name}:{index}"
            if (_hash01(key) < val_fraction) == (split == "validation"):
                yield key, record


def _read_file(path: Path):
    if path.suffix == ".txt":
        yield 0, {"text": path.read_text(encoding="utf-8", errors="replace")}
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield line_no, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{line_no}: not valid JSON ({exc})") from exc
    else:
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist())


def _hub_records(source: str, split: str, val_fraction: float, data_dir: str | None = None):
    """(key, record) pairs of this split from a Hugging Face dataset ``name[:config]``."""
    import datasets

    name, _, config = source.partition(":")
    try:
        splits = datasets.load_dataset(name, config or None, data_dir=data_dir, token=os.environ.get("HF_TOKEN") or None)
    except Exception as exc:  # offline, unknown id, bad config: all reported the same way
        hint = "; it is gated: accept its terms on the Hub and set HF_TOKEN" if "gated" in str(exc).lower() else ""
        raise ValueError(f"cannot load dataset {source!r} (not a local path; Hugging Face hub: {exc}){hint}") from exc
    return split_records(splits, split, val_fraction)


def split_records(splits, split: str, val_fraction: float):
    """(key, record) pairs of one split of a dataset's named splits, never overlapping.

    Its own validation split where it has one (HF_VALIDATION_NAMES), with its train split
    whole; otherwise both come out of the train split (or the first split), by hash.
    """
    train = "train" if "train" in splits else next(iter(splits))
    own = next((candidate for candidate in HF_VALIDATION_NAMES if candidate in splits and candidate != train), None)
    if own is not None:
        name = train if split == "train" else own
        return ((f"{name}:{i}", r) for i, r in enumerate(splits[name]))
    return (
        (f"{train}:{i}", r)
        for i, r in enumerate(splits[train])
        if (_hash01(f"{train}:{i}") < val_fraction) == (split == "validation")
    )


def _record_text(record: dict, field: str, chat: bool, tokenizer, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: record has no field {field!r} (it has {keys}); set text_field")
    value = record[field]
    if not chat:
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, not text")
        return value
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise ValueError(f"{where}: field {field!r} must be a list of {{role, content}} messages for chat=True")
    try:
        return tokenizer.apply_chat_template(value, tokenize=False)
    except Exception as exc:
        raise ValueError(f"{where}: cannot apply the tokenizer's chat template: {exc}") from exc
