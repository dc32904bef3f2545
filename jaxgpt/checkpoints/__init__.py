"""What a run leaves on disk and how it comes back: the run directory and metrics, Orbax checkpoints
with checksums, and ``load_model`` for run directories, Hugging Face directories and hub ids."""
