"""A data drop as fixed-length training blocks: tokenised, documents joined with EOS, packed to seq_len.

Each document goes to the held-out split when the first 8 bytes of its text's sha256, read as an
integer, modulo 10,000 fall below `heldout_percent * 100`: deterministic, independent of file
order, and reproducible by anyone from the text alone. The blocks are streamed to a uint32 file
(one document in memory at a time) and read back memory-mapped, so drops larger than memory
train; the file is named by a hash of everything that determines it and reused when present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..base.errors import InputError
from ..data.drops import iter_texts

log = logging.getLogger(__name__)

HELDOUT_RULE = "int.from_bytes(sha256(text)[:8], 'big') % 10000 < heldout_percent * 100"


@dataclass(frozen=True)
class PackedData:
    blocks: np.ndarray  # [n, seq_len] uint32, memory-mapped
    documents: int
    tokens: int  # training tokens before packing (the remainder is dropped)
    heldout: dict[str, Any]  # the held-out split: rule, percent, documents, tokens, sha256 of each text
    heldout_file: Path  # the held-out documents as {"text": …} JSON lines

    @property
    def count(self) -> int:
        return int(self.blocks.shape[0])


def is_heldout(text: str, heldout_percent: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < heldout_percent * 100


def pack(
    data_dir: Path,
    tokenizer: Any,
    seq_len: int,
    heldout_percent: float,
    text_field: str,
    cache_dir: Path,
    data_digest: str,
) -> PackedData:
    """The training blocks of a drop (cached under `cache_dir` by content and settings)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError(
            "the model's tokenizer has no EOS token, so documents cannot be joined; set eos_token in its tokenizer_config.json"
        )
    key = hashlib.sha256(
        json.dumps(
            {
                "data": data_digest,
                "tokenizer": _tokenizer_digest(tokenizer),
                "seq_len": seq_len,
                "heldout": heldout_percent,
                "field": text_field,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:32]
    blocks_path = cache_dir / f"blocks-{key}.u32"
    meta_path = cache_dir / f"blocks-{key}.json"
    heldout_path = cache_dir / f"blocks-{key}.heldout.jsonl"
    meta = _cached_meta(blocks_path, meta_path, heldout_path, seq_len)
    if meta is None:
        _write_blocks(data_dir, tokenizer, eos, seq_len, heldout_percent, text_field, blocks_path, meta_path, heldout_path)
        meta = json.loads(meta_path.read_text())
    blocks = (
        np.memmap(blocks_path, dtype=np.uint32, mode="r", shape=(meta["blocks"], seq_len))
        if meta["blocks"]
        else np.zeros((0, seq_len), np.uint32)
    )
    return PackedData(blocks, meta["documents"], meta["tokens"], meta["heldout"], heldout_path)


def _cached_meta(blocks_path: Path, meta_path: Path, heldout_path: Path, seq_len: int) -> dict[str, Any] | None:
    """The record of blocks packed before, or None when they must be packed (absent; a damaged cache is warned about)."""
    if not (blocks_path.is_file() and meta_path.is_file() and heldout_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        expected = int(meta["blocks"]) * seq_len * np.dtype(np.uint32).itemsize
        if blocks_path.stat().st_size != expected:
            raise ValueError(f"{blocks_path.name} has {blocks_path.stat().st_size} bytes, not the {expected} its record says")
        return meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("packing the data again: the packed copy in %s is damaged (%s)", blocks_path.parent, exc)
        return None


def _write_blocks(
    data_dir: Path,
    tokenizer: Any,
    eos: int,
    seq_len: int,
    heldout_percent: float,
    text_field: str,
    blocks_path: Path,
    meta_path: Path,
    heldout_path: Path,
) -> None:
    blocks_path.parent.mkdir(parents=True, exist_ok=True)
    partial = blocks_path.with_name(f"{blocks_path.name}.{os.getpid()}.partial")  # ranks of one node may pack at once
    heldout_partial = heldout_path.with_name(f"{heldout_path.name}.{os.getpid()}.partial")
    documents = tokens = blocks = 0
    heldout = {"rule": HELDOUT_RULE, "percent": heldout_percent, "documents": 0, "tokens": 0, "text_sha256": []}
    buffer: list[int] = []
    with open(partial, "wb") as out, open(heldout_partial, "w", encoding="utf-8") as heldout_out:
        for ids in _token_streams(data_dir, tokenizer, eos, heldout_percent, text_field, heldout, heldout_out):
            documents += 1
            tokens += len(ids)
            buffer.extend(ids)
            while len(buffer) >= seq_len:
                out.write(np.asarray(buffer[:seq_len], dtype=np.uint32).tobytes())
                del buffer[:seq_len]
                blocks += 1
        out.flush()
        os.fsync(out.fileno())
    if documents == 0:
        partial.unlink()
        heldout_partial.unlink()
        raise InputError(f"the data drop {data_dir} has no training documents (all {heldout['documents']} are held out, or it is empty)")
    if blocks == 0:
        partial.unlink()
        heldout_partial.unlink()
        raise InputError(
            f"the data drop {data_dir} has {tokens} training tokens, fewer than one sequence of --seq-len {seq_len}; "
            "add data or lower --seq-len"
        )
    os.replace(partial, blocks_path)
    os.replace(heldout_partial, heldout_path)
    meta = {"blocks": blocks, "documents": documents, "tokens": tokens, "seq_len": seq_len, "heldout": heldout}
    meta_partial = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.partial")
    meta_partial.write_text(json.dumps(meta))
    os.replace(meta_partial, meta_path)


def _token_streams(
    data_dir: Path, tokenizer: Any, eos: int, heldout_percent: float, text_field: str, heldout: dict[str, Any], heldout_out: IO[str]
) -> Iterator[list[int]]:
    seen_any = False
    for _where, text in iter_texts(data_dir, text_field):
        seen_any = True
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        if is_heldout(text, heldout_percent):
            heldout["documents"] += 1
            heldout["tokens"] += len(ids)
            heldout["text_sha256"].append(hashlib.sha256(text.encode("utf-8")).hexdigest())
            heldout_out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            continue
        yield ids
    if not seen_any:
        raise InputError(f"the data drop {data_dir} is empty: it holds no documents")


def _tokenizer_digest(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab()
    payload = json.dumps([type(tokenizer).__name__, sorted(vocab.items()), tokenizer.eos_token], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()
