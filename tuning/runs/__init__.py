"""Floor 3: the run layer every training script shares."""
