"""Predictions against measurements: steps (estimator), cache (KV hits), scheduler (a recorded
step log)."""
