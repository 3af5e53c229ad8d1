"""Side-by-side speed benchmarks; ``make bench`` runs :mod:`benchmarks.run`."""
