"""Trained adapters: LoRA weights, block checkpoints, and the hubs that share them."""
