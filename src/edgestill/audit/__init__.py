"""Backdoor audits (LBKD, docs/references.md [2]): plant a known trigger to measure (`poison`), search a model for
triggers and measure how often they work (`scan`), in a teacher and in the student distilled from it."""
