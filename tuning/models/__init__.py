"""Floor 2: devices, loading, LoRA, reward-model scores, answer log-probs and the packing checks."""
