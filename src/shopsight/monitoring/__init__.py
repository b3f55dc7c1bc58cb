"""Closing the loop: served answers joined with what followed, online metrics per model version,
feature drift and training-serving skew (`shopsight monitor`)."""
