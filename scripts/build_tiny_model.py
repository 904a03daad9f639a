"""Rebuild the tiny pretrained Llama fixture (shared/device/assets/tiny-llama) from packaged text.

    python scripts/build_tiny_model.py [--out DIR] [--steps 500]

Deterministic for a given Python version (the code domain is that version's standard library),
package set and torch build: fixed seeds, one thread, no data-dependent ordering. Trained only on
public-domain and permissively licensed text (Shakespeare, SPDX licenses, CPython's source, KJV)
and never on any document held out for evaluation. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fleettune.shared import corpora
from fleettune.shared.protocol.adapter_spec import LAYOUTS

OUT = Path(__file__).resolve().parents[1] / "shared" / "device" / "assets" / "tiny-llama"
# The model learns general English (KJV, Shakespeare); the tokenizer also sees legal and code text.
# Legal and code are then new domains for the model but not for its vocabulary, so adaptation to
# them, and forgetting of the general text, both show in a few federated rounds.
MODEL_CHARS = {"general": 3_000_000, "literature": 1_500_000}
TOKENIZER_CHARS = {**MODEL_CHARS, "legal": 300_000, "code": 300_000}
SEQ, BATCH, LR = 256, 16, 3e-3


def build_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=LAYOUTS["tiny-llama"].vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer("\n\n".join(corpora.train_text(d, n, seed=1) for d, n in TOKENIZER_CHARS.items()))
    text = "\n\n".join(corpora.train_text(d, n, seed=1) for d, n in MODEL_CHARS.items())
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    blocks = ids[: len(ids) // SEQ * SEQ].view(-1, SEQ)
    print(f"{len(text) / 1e6:.1f} M chars, {len(ids) / 1e6:.2f} M tokens, {len(blocks)} blocks of {SEQ}")

    dims = LAYOUTS["tiny-llama"]
    config = LlamaConfig(**dims.llama_config(), max_position_embeddings=1024, rms_norm_eps=1e-5,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    model.train()
    for step in range(args.steps):
        batch = blocks[torch.randint(len(blocks), (BATCH,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} {time.time() - start:6.1f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    (args.out / "BUILD.json").write_text(json.dumps({
        "script": "scripts/build_tiny_model.py", "steps": args.steps, "batch": BATCH, "seq": SEQ, "lr": LR,
        "model_chars": MODEL_CHARS, "tokenizer_chars": TOKENIZER_CHARS,
        "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - start),
    }, indent=2) + "\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
