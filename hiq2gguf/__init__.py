"""hiq2gguf: Hugging Face LLM -> GGUF with layer-wise high-impact channel groups (HIQ2 types).

    import hiq2gguf
    llm = hiq2gguf.load("model-hiq2.gguf", n_ctx=2048)   # a llama_cpp.Llama on the patched runtime
"""

__version__ = "0.1.0"


# Thin wrappers: `import hiq2gguf` stays light (no torch, numpy or llama_cpp); the
# patched runtime is located and llama_cpp imported on the first call.
def load(path, **llama_kwargs):
    """A ``llama_cpp.Llama`` for the GGUF at ``path``, bound to the patched llama.cpp runtime.

    ``llama_kwargs`` go to ``llama_cpp.Llama`` (n_ctx, n_threads, logits_all, ...;
    ``verbose`` defaults to False). Raises ``hiq2gguf.runtime.RuntimeMissing`` when the
    runtime is not built and ``hiq2gguf.gguf_io.CorruptGGUF`` for a missing or bad file.
    """
    from hiq2gguf import llama

    return llama.load(path, **llama_kwargs)


def open_model(path, **llama_kwargs):
    """``load`` as a context manager that closes the model on exit."""
    from hiq2gguf import llama

    return llama.open_model(path, **llama_kwargs)
