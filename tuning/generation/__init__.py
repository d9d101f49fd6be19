"""Floor 3: answers as inference.py gives them, and the comparison page."""
