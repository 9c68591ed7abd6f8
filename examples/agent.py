"""An agent that answers a question about a document: it buys the document's KV cache
from the swarm when some node has read the document with the same model, and when it had
to read it itself, it sells its own to the next agent.

    kvx node --data-dir my-node &          # the node of this host (README: Running a node)
    python examples/agent.py --data-dir my-node --document README.md \\
        --question "What does a node sell?"

The model is SmolLM2-135M-Instruct (fetched once, then read offline), or --model PATH: a
.gguf file or a Hugging Face model directory. Every agent that should trade with this one
must load the same weights, tokenizer and dtype (their fingerprint says so).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import torch

from kvx import PeerClient
from kvx.integrations import hf


async def ask(data_dir: Path, loaded: hf.Loaded, document: str, question: str, n: int) -> None:
    tokenizer, model, fp = loaded.tokenizer, loaded.model, loaded.fp
    doc = tokenizer(document, return_tensors="pt").input_ids
    tail = tokenizer(f"\n\nQuestion: {question}\nAnswer:", return_tensors="pt").input_ids
    ids = torch.cat([doc, tail], dim=1)
    async with PeerClient(data_dir) as client:
        # Buys the longest prefix any node sells (the document, in whole blocks), or
        # prefills everything here when nobody sells it; either way the same tokens.
        outcome = await hf.generate(client, model, fp, ids, max_new_tokens=n, do_sample=False)
        if outcome.bought is not None:
            b = outcome.bought
            print(
                f"bought {b.tokens} tokens of KV from {b.seller.hex()[:16]} "
                f"for {b.price} micro-credits in {b.seconds:.3f} s"
            )
        else:
            # We paid for this prefill: offer the document's KV (not the question's) to
            # the next agent. publish_prompt runs the document once more to get it.
            _, sold = await hf.publish_prompt(client, model, fp, doc)
            print(f"prefilled {ids.shape[1]} tokens here ({outcome.miss}); selling {sold} now")
        print(f"first token after {outcome.first_token_s:.3f} s")
    answer = outcome.output_ids[0, ids.shape[1] :]
    print("answer:", tokenizer.decode(answer, skip_special_tokens=True).strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="this host's node")
    parser.add_argument("--document", type=Path, required=True, help="a text file")
    parser.add_argument("--question", required=True)
    parser.add_argument("--model", type=Path, help="a .gguf file or a model directory")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    loaded = hf.load_model(args.model) if args.model else hf.load_smollm2()
    text = args.document.read_text()
    asyncio.run(ask(args.data_dir, loaded, text, args.question, args.max_new_tokens))


if __name__ == "__main__":
    main()
