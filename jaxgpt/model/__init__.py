"""The model: ``GPTConfig``, the NNX ``GPT`` read top-down, the KV-cached forward pass, parameters
as flat dicts, and the losses (plain and fused) with their GPU/TPU kernels in ``kernels/``."""
