"""Run by vLLM's own interpreter (a separate venv; tests/test_deploy_vllm.py runs it), never imported by adaptkit.

``python vllm_probe.py JOBS.json`` loads every adapter directory of the jobs the way ``vllm serve --enable-lora``
does: ``PEFTHelper.from_local_dir`` + ``validate_legal(LoRAConfig(max_lora_rank=...))`` and
``LoRAModel.from_local_checkpoint`` on CPU; for each module vLLM would apply it writes ``scaling * B @ A`` into the
job's safetensors file. Prints one JSON result per job: ``{"ok": true}`` or ``{"ok": false, "error": "..."}``.
"""

import json
import sys

import vllm
from safetensors.torch import save_file
from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper


def probe(job):
    helper = PEFTHelper.from_local_dir(job["dir"], max_position_embeddings=64)
    helper.validate_legal(LoRAConfig(max_lora_rank=job["max_rank"]))
    model = LoRAModel.from_local_checkpoint(job["dir"], expected_lora_modules=set(job["modules"]), peft_helper=helper,
                                            lora_model_id=1, device="cpu")
    deltas = {name: ((w.lora_b.float() @ w.lora_a.float()) * w.scaling).contiguous() for name, w in model.loras.items()}
    save_file(deltas, job["out"])


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    results = []
    for job in jobs:
        try:
            probe(job)
            results.append({"ok": True, "vllm": vllm.__version__})
        except Exception as e:  # noqa: BLE001 - every failure is a result here
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}", "vllm": vllm.__version__})
    print("PROBE " + json.dumps(results))


if __name__ == "__main__":
    main()
