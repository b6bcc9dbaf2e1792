"""The miniature study: the paper's analyses (main table over seeds, specialist against
generalist, aggregation, ratio sweep, per-task overlap, feature recipes) in one command,
``python -m icons.run +experiment=miniature_study`` (its ``study`` stage, ``driver.py``)."""
