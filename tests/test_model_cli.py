"""`kvx model export` makes the model directory vLLM needs from the demo's GGUF (which
transformers refuses to save as it is), and `kvx model info` gives the KV bytes per
token an operator sizes a store by. Both with the real SmolLM2-135M-Instruct."""

import json
import subprocess
import sys

import pytest
import torch

hf = pytest.importorskip("kvx.integrations.hf", reason="needs the 'hf' extra")


def kvx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvx.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_the_demo_gguf_exports_to_a_directory_that_loads_with_the_same_weights(tmp_path):
    gguf = hf.load_smollm2()
    with pytest.raises(ValueError, match="not serializable"):  # why the command exists
        gguf.model.save_pretrained(tmp_path / "plain")
    out = tmp_path / "smollm2"
    made = kvx("model", "export", str(out))
    assert made.returncode == 0, made.stderr
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    exported = hf.load_model(out)
    assert exported.fp.layout == gguf.fp.layout
    theirs, ours = gguf.model.state_dict(), exported.model.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    again = kvx("model", "export", str(out))
    assert again.returncode == 2 and f"{out} exists" in again.stderr
    info = json.loads(kvx("model", "info", str(out), "--json").stdout)
    assert (info["layers"], info["kv_heads"], info["head_dim"]) == (30, 3, 64)
    assert info["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4  # fp32
