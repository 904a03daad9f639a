"""Parity of an exported model with PyTorch + PEFT: max |logit difference| on fixed prompts.

The prompts are fixed text (one per demo domain), so every version of every federation is measured
on the same inputs; the goal in float32 is 1e-3.
"""

from __future__ import annotations

import numpy as np
import torch

PROMPTS = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
)
TOLERANCE = 1e-3
MAX_PROMPT_TOKENS = 48  # within every format's context (LiteRT's is the smallest)


def prompt_ids(tokenizer) -> list[np.ndarray]:
    # built as 2-D lists: a numpy [None] view has a zero stride, which ExecuTorch's exporter refuses
    return [np.array([tokenizer(p)["input_ids"][:MAX_PROMPT_TOKENS]], dtype=np.int64) for p in PROMPTS]


@torch.no_grad()
def reference(peft_model, prompts: list[np.ndarray]) -> list[np.ndarray]:
    """PyTorch + PEFT's logits: the model as devices running torch serve it."""
    return [peft_model(input_ids=torch.from_numpy(ids)).logits.numpy() for ids in prompts]


def max_difference(run, prompts: list[np.ndarray], expected: list[np.ndarray], lora: list[np.ndarray]) -> float:
    """max |logits - expected| over every prompt and position, `run(input_ids, lora)` the runtime's."""
    worst = 0.0
    for ids, want in zip(prompts, expected):
        got = run(ids, lora)
        if got.shape != want.shape:
            raise ValueError(f"the runtime's logits have shape {got.shape}, PyTorch's {want.shape}")
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))))
    return worst
