"""Our kernels for the HIQ2 type family, one folder per backend.

Only ``kernels.triton`` (Triton GPU kernels over the packed bytes; needs
``triton``) is Python; the C/CUDA sources next to it are patched into
llama.cpp by ``hiq2gguf runtime build``.
"""
