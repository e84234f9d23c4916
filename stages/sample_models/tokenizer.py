"""A small byte-level BPE tokenizer trained locally (the `tokenizers` library), saved beside a test model."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"


def write_tokenizer(model_dir: str | Path, texts: Iterable[str], vocab_size: int) -> Path:
    """Train a BPE tokenizer of at most `vocab_size` tokens on `texts` and save it in `model_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, bos_token=EOS)
    wrapped.save_pretrained(str(model_dir))
    return Path(model_dir)


def domain_corpus(documents: int, seed: int = 0) -> list[str]:
    """Repetitive, learnable text (a model's loss on it falls within a few steps)."""
    import random

    rng = random.Random(seed)
    subjects = ["the reactor", "the pump", "valve seven", "the turbine", "the condenser", "coolant loop b"]
    verbs = ["reports", "holds", "exceeds", "drops below", "returns to", "stays at"]
    objects = ["nominal pressure", "rated temperature", "the safety margin", "its set point", "full flow", "the alarm limit"]
    return [
        " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(rng.randint(4, 12)))
        for _ in range(documents)
    ]
