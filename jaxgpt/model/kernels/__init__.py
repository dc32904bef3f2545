"""Hand-written kernels the model can choose: the Pallas head kernel (GPU) and splash attention (TPU)."""
