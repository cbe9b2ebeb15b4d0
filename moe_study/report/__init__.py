"""The study report: plan table, per-run rows, the DuckDB database, intervals, summary and plots."""
