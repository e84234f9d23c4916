"""Model checkpoints: safetensors reading, tensor naming, embedding roles, the Hugging Face hub client."""
