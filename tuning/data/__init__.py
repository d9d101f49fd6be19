"""Floor 1: records, templates, SFT examples, preference pairs, batch layouts and the token cache."""
