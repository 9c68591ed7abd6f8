"""One vLLM engine process, run by tests/test_vllm.py and bench/vllm.py:

    python vllm_engine.py MODEL_DIR DATA_DIR|- PROMPTS_JSON [OPTIONS_JSON]

With a DATA_DIR the kvx connector buys and sells through the node serving it; with `-`
the engine runs without a connector. The prompts run one after another, each alone (so
that a prompt's output does not depend on what it was batched with). Prints `OUT:` and
the greedy output token ids of each prompt as JSON, and with `"ttft": true` first times
each prompt's first token alone (`TTFT:`, seconds), after a request that warms the
engine up. vLLM spawns its engine core, hence the __main__ guard.

OPTIONS: `kv` (more kv_transfer_config), `max_tokens` (12), `max_model_len` (2048),
`prefix_caching` (true), `ttft` (false), `memory` (0.1, vLLM's share of the host's),
`kv_cache_dtype` ("auto"), `dtype` ("float32").
"""

import json
import sys
import time


def main() -> None:
    model, data_dir, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    options = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    from vllm import LLM, SamplingParams

    kwargs = {}
    if data_dir != "-":
        kwargs["kv_transfer_config"] = {
            "kv_connector": "KvxConnector",
            "kv_connector_module_path": "kvx.integrations.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"data_dir": data_dir},
            **options.get("kv", {}),
        }
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        dtype=options.get("dtype", "float32"),
        max_model_len=options.get("max_model_len", 2048),
        gpu_memory_utilization=options.get("memory", 0.1),  # of the host's, on the CPU build
        enforce_eager=True,  # compiling costs 16 s a start and changes nothing kvx does
        enable_prefix_caching=options.get("prefix_caching", True),
        kv_cache_dtype=options.get("kv_cache_dtype", "auto"),
        **kwargs,
    )
    greedy = SamplingParams(max_tokens=options.get("max_tokens", 12), temperature=0)
    first = SamplingParams(max_tokens=1, temperature=0)
    outs, ttft = [], []
    if options.get("ttft"):  # the engine's first request pays for its own warming up
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], first, use_tqdm=False)
    for prompt in prompts:
        request = {"prompt_token_ids": prompt}
        if options.get("ttft"):
            start = time.perf_counter()
            llm.generate([request], first, use_tqdm=False)
            ttft.append(time.perf_counter() - start)
        outs.append(list(llm.generate([request], greedy, use_tqdm=False)[0].outputs[0].token_ids))
    if ttft:
        print("TTFT:" + json.dumps(ttft), flush=True)
    print("OUT:" + json.dumps(outs), flush=True)


if __name__ == "__main__":
    main()
