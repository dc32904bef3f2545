"""Generation: KV-cache prefill and decode with sampling rules, and text in, streamed text out."""
