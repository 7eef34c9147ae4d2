"""Data: the demo data set, row formats, validation, cleaning and splits."""
