"""Studies on a lent or remote GPU machine: run there through Snakemake, bring the per-run records home.

drive (there): the unfinished runs in a time budget, packed into one tarball; records: what a run's
record is and its identity; bundle: pack and import; rebuild: the report from committed records alone.
CLI: `python -m moe_study.remote {todo,run,pack,import,rebuild}` (README, "Running a study on a lent/remote GPU").
"""
