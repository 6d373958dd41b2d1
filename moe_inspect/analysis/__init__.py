"""Analyses over captured routing: accumulation, balance, comparison, ablation, placement, model outputs,
engine records, distributed reduction."""
