"""What people see of the swarm: snapshots for `swarmllm status` and the web monitor."""

from swarmllm.observe.snapshot import SwarmSnapshot, collect, model_view

__all__ = ["SwarmSnapshot", "collect", "model_view"]
