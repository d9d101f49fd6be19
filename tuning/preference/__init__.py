"""Floor 4: the preference stages' trainers (reward model, DPO, RLOO) and their reports."""
