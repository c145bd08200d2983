"""``python -m tools.throughput``: cli (arguments, orchestration, report assembly), measure (the timed
modes), variants (training-step variants), meter (CPU and memory use), env (machine and versions),
report (figures, verdicts, Markdown and plot)."""
