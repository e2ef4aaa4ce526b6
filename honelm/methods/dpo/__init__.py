"""Direct Preference Optimization and its loss variants (see ``loss.py``)."""
