"""Ranking evaluation per EVALUATION.md: full ranking, seen items excluded."""
