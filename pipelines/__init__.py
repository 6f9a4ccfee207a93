"""Prefect orchestration of the OpenLLM DVC pipeline.

DVC decides what must be recomputed; Prefect runs it on a schedule, retries what fails and
shows the runs in its UI. ``pipelines.flows`` holds the flows, built from ``dvc_commands`` (the
stage task), ``run_summary`` (the artifact a run publishes) and ``data_source`` (the source's
fingerprint); ``pipelines.serve`` serves them as scheduled deployments (``python -m
pipelines.serve``) and ``pipelines.deploy`` registers them in a work pool.
"""
