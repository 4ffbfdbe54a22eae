"""Layer 3, finetune: a short distillation of a compressed candidate from the original."""
