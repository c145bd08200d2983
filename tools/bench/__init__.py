"""``python -m tools.throughput``: cli (arguments, orchestration, report assembly), measure (the timed
modes), host_cost (the host's share of each backend as on a GPU), variants (training-step variants), meter
(CPU and memory use), env (machine and versions), report (figures, ratios, warnings, verdicts), render
(Markdown and chart)."""
