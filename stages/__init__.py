"""The stage entry points of the DAG, one module per stage (moe_study/registry.py lists them)."""
