"""Evaluation: perplexity, the forgetting probe, SFT eval loss and SNR drift (the evaluate stage's pieces)."""
