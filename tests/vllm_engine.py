"""One vLLM engine process, run by tests/test_vllm.py and bench/vllm.py:

    python vllm_engine.py MODEL_DIR DATA_DIR|- PROMPTS_JSON [EXTRA_CONFIG_JSON]

With a DATA_DIR the kvx connector buys and sells through the node serving it; with `-`
the engine runs without a connector. Prints `OUT:` and the greedy output token ids of
each prompt as JSON. vLLM spawns its engine core, hence the __main__ guard.
"""

import json
import sys


def main() -> None:
    model, data_dir, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    config = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    from vllm import LLM, SamplingParams

    kwargs = {}
    if data_dir != "-":
        kwargs["kv_transfer_config"] = {
            "kv_connector": "KvxConnector",
            "kv_connector_module_path": "kvx.integrations.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"data_dir": data_dir},
            **config,
        }
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=2048,
        gpu_memory_utilization=0.1,  # of the host's memory, on the CPU build
        **kwargs,
    )
    greedy = SamplingParams(max_tokens=12, temperature=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
    print("OUT:" + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)


if __name__ == "__main__":
    main()
