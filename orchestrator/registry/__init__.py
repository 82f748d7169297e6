"""Checkpoints as MLflow registered models, and converting checkpoints (Hugging Face, DeepSpeed, LoRA)."""
