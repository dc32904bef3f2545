"""What every stage shares and nothing model-specific: errors, options and the command line, the
device mesh and its sharding rules, multi-host launch, the platform being compiled for, atomic swaps."""
