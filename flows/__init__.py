"""Prefect flows (docs/design.md §4, §5): `continual_update` wires the cached stages of `tasks.stages` and picks
their Ray resources; `flows.cli` is the `many` command; `flows.config` the YAML run config."""
