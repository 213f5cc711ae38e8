"""LoRA recovery of pruned models (peft), zeros kept."""
