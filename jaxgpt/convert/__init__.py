"""Hugging Face GPT-2 <-> jaxgpt (``python -m jaxgpt.convert`` is the command line)."""

from jaxgpt.convert.hf import config_from_hf, config_to_hf, load_hf_gpt2, save_hf_gpt2

__all__ = ["config_from_hf", "config_to_hf", "load_hf_gpt2", "save_hf_gpt2"]
