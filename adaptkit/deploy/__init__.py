"""Deploy targets: what runtimes (vLLM, SGLang, llama.cpp) accept, and exports that land there."""
