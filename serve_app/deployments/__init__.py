"""Thin hosts of the stages: one plain host class per stage (its versioned models, I/O, metrics and
timings) and one group deployment hosting 1..4 consecutive stages (`group.StageGroup`), placed by
the `placement` setting (serve_app/placement.py)."""
