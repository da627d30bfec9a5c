"""Dagster orchestration: thin assets over the science code, their resources, checks and automation.

Nothing outside this package and `xmm_pipeline.definitions` imports Dagster.
"""
