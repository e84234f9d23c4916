"""Perplexity by one stated convention, so anyone can reproduce it in ten lines of transformers.

The tokens of all documents, each followed by EOS (as cpt packs them), are cut into
non-overlapping windows of seq_len (the last one may be shorter); every token of a window but
its first is predicted from the tokens before it in that window. Perplexity =
exp(total negative log-likelihood / number of predicted tokens), in nats, counting exactly the
predicted tokens (seq_len - 1 per full window).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from ..base.errors import InputError


@dataclass(frozen=True)
class Likelihood:
    """Summed negative log-likelihood (nats) over `tokens` predicted tokens."""

    nll: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        """exp(mean NLL); infinite when that overflows a float (a diverged model), never an OverflowError."""
        try:
            return math.exp(self.mean)
        except OverflowError:
            return math.inf


def token_stream(texts: Iterable[str], tokenizer: Any, max_tokens: int) -> list[int]:
    """The first `max_tokens` tokens of the documents, each followed by EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the model's tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


def windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """Non-overlapping windows; a last window of one token predicts nothing and is dropped."""
    return [ids[start : start + seq_len] for start in range(0, len(ids), seq_len) if len(ids) - start >= 2]


def likelihood(model: Any, ids: list[int], seq_len: int, batch_size: int, what: str, progress: bool | None = None) -> Likelihood:
    """The summed NLL of every predicted token of `ids` (see the module docstring)."""
    import torch

    with torch.no_grad():  # torch imported here: the pipeline reads Likelihood without it
        chunks = windows(ids, seq_len)
        if not chunks:
            raise InputError(f"{what} has fewer than 2 tokens: nothing to evaluate")
        model.eval()
        device = next(model.parameters()).device
        total, predicted = 0.0, 0
        batches = [chunks[i : i + batch_size] for i in range(0, len(chunks), batch_size)]
        for batch in tqdm(batches, desc=f"perplexity {what}", unit="batch", disable=None if progress is None else not progress):
            width = max(len(w) for w in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, window in enumerate(batch):
                input_ids[row, : len(window)] = torch.tensor(window)
                mask[row, : len(window)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            targets = input_ids[:, 1:].to(device)
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            keep = mask[:, 1:].to(device).bool()
            total += float(losses[keep].double().sum())
            predicted += int(keep.sum())
        return Likelihood(total, predicted)


def assistant_loss(model: Any, rows: list[tuple[list[int], list[int]]], batch_size: int, progress: bool | None = None) -> Likelihood:
    """Summed NLL of the assistant tokens (labels != -100) of tokenised chat rows, as sft's loss counts them."""
    import torch

    with torch.no_grad():  # torch imported here: the pipeline reads Likelihood without it
        model.eval()
        device = next(model.parameters()).device
        total, predicted = 0.0, 0
        batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        for batch in tqdm(batches, desc="sft eval loss", unit="batch", disable=None if progress is None else not progress):
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, row_labels) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(ids)] = torch.tensor(row_labels)
                mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            targets = labels[:, 1:].to(device)
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none", ignore_index=-100)
            keep = targets != -100
            total += float(losses[keep].double().sum())
            predicted += int(keep.sum())
        if not predicted:
            raise InputError("the held-out chat rows have no assistant tokens within --seq-len: nothing to evaluate")
        return Likelihood(total, predicted)
