"""Compile plans: the train step compiled for hardware that is not here (deviceless AOT) and read
for memory, FLOPs and bytes (``python -m jaxgpt.plan``)."""
