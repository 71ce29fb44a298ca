"""Tiny transformers bases and real PEFT adapters for the GGUF / llama.cpp tests.

The bases are built from transformers configs with seeded random weights (2 layers, hidden 64, 4 query heads
over 2 key/value heads so that llama's k permutation uses ``n_head_kv``), saved with ``save_pretrained`` beside
a sentencepiece ``tokenizer.model`` trained here (llama.cpp's converter needs a vocabulary; the tests feed token
ids directly). :func:`convert_base` runs llama.cpp's own ``convert_hf_to_gguf.py`` on them.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import torch

#: the tiny shapes every base shares
DIMS = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False}
#: the prompt (token ids) every comparison starts from
PROMPT = [5, 17, 33, 8, 61, 42, 12, 90]


def build_base(directory: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """Save a seeded random tiny ``model_type`` model (``llama``, ``qwen2``, ``phi3``) and a tokenizer to ``directory``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**DIMS, **overrides})
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def write_tokenizer(directory: Path) -> None:
    """Train a small sentencepiece model into ``directory/tokenizer.model`` (when sentencepiece is installed)."""
    try:
        import sentencepiece as spm
    except ImportError:
        return
    text = ("the quick brown fox jumps over the lazy dog " * 40 + "adapters land in llama cpp and peft " * 40).split()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=40,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2,
                                   user_defined_symbols=["<|endoftext|>"])  # llama.cpp looks it up for phi3
    (directory / "tokenizer.model").write_bytes(buf.getvalue())


def converter_dir() -> Path | None:
    """llama.cpp's converter folder (``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``), or ``None``.

    ``ADAPTKIT_LLAMA_CPP_DIR`` names it; else ``.ci/run`` extracts it from the llama-cpp-python sdist into
    ``${ADAPTKIT_WHEEL_CACHE:-~/.cache/adaptkit-wheels}/llama.cpp-<llama_cpp version>``.
    """
    if os.environ.get("ADAPTKIT_LLAMA_CPP_DIR"):
        d = Path(os.environ["ADAPTKIT_LLAMA_CPP_DIR"])
    else:
        try:
            import llama_cpp
        except ImportError:
            return None
        cache = Path(os.environ.get("ADAPTKIT_WHEEL_CACHE", Path.home() / ".cache" / "adaptkit-wheels"))
        d = cache / f"llama.cpp-{llama_cpp.__version__}"
    return d if (d / "convert_hf_to_gguf.py").is_file() else None


def convert_bases(jobs: dict[Path, Path], converter: Path) -> None:
    """Convert transformers checkpoints (``{model dir: out .gguf}``) to GGUF f32 with llama.cpp's
    ``convert_hf_to_gguf.py``, all at once (each run is mostly interpreter start-up and imports)."""
    runs = {src: subprocess.Popen([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(src), "--outtype",
                                   "f32", "--outfile", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}) for src, out in jobs.items()}
    for src, run in runs.items():
        _, err = run.communicate(timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed on {src.name}:\n{err[-3000:]}")


def make_adapter(base_dir: Path, out: Path, seed: int = 1, std: float = 0.2, **lora) -> Path:
    """Save a real PEFT LoRA adapter (``LoraConfig(**lora)``) on ``base_dir`` with random A and B factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude" in name:  # DoRA: a trained magnitude stays near the weight norms it starts at
                p.mul_(1 + torch.randn(p.shape, generator=g) * std)
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "modules_to_save" in name:  # a trained copy differs from the base
                p.add_(torch.randn(p.shape, generator=g) * std)
    peft_model.save_pretrained(out)
    return out


def peft_model(base_dir: Path, adapter_dir: Path | None):
    """The base with the adapter loaded by peft (or the base alone), in eval mode, float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return model if adapter_dir is None else PeftModel.from_pretrained(model, adapter_dir).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of ``prompt`` by ``n`` tokens, and the logits of the whole sequence (float64)."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], model(input_ids=torch.tensor([ids])).logits[0].double()


def cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation of ``prompt`` by ``n`` tokens with a ``llama_cpp.Llama``, one token per eval."""
    import numpy as np

    llm.reset()
    llm.eval(list(prompt))
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    """The logits (float64) of every position of ``ids`` in one eval (``logits_all=True``)."""
    import numpy as np

    llm.reset()
    llm.eval(list(ids))
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))
