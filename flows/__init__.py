"""Prefect orchestration of the pipeline: the `rlhf` flow and its deployments (flows.rlhf), and a
local Prefect server (flows.server). Thin wrappers: the logic lives in the stages and the runner."""
