"""Analyses over captured routing: accumulation, balance, comparison, ablation, placement, model outputs,
token specialisation, engine records, distributed reduction."""
