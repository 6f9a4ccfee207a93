"""Prefect orchestration of the OpenLLM DVC pipeline.

DVC decides what must be recomputed; Prefect runs it on a schedule, retries what fails and
shows the runs in its UI. ``pipelines.flows`` holds the flows, ``pipelines.serve`` serves them
as scheduled deployments (``python -m pipelines.serve``).
"""
