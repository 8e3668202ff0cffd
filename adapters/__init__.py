"""Test-time training: the `Trainer` that fits a temporary LoRA adapter per prompt, its configuration,
and the adapter directories it hands over (`AdapterHandle`) with their lifecycle."""
