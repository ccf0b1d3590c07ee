"""One call that turns an adapter name into a local folder, wherever the adapter lives."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from swarmllm.adapters.hub import fetch_from_hub, is_repo_id
from swarmllm.adapters.package import AdapterNotFoundError, AdapterUnavailableError
from swarmllm.adapters.store import AdapterStore
from swarmllm.adapters.swarm_hub import SwarmHub

__all__ = ["resolve_adapter"]


async def resolve_adapter(
    name: str, swarm_hub: SwarmHub | None = None, hub_dir: str | os.PathLike[str] | None = None, *,
    store: AdapterStore | None = None, model: str | None = None,
) -> Path:
    """The local folder of the adapter called `name`, fetched, verified and stored if needed.

    Async because the swarm is: call it from the event loop `swarm_hub` is registered on (a server), or
    `asyncio.run(resolve_adapter(name, hub_dir=...))` from sync code without a swarm.

    Looks, in order:

    1. in the local store (`store`, else the swarm hub's, else the default cache), by name; a name once
       stored stays pinned to that content;
    2. in the swarm, if `swarm_hub` is given (`SwarmHub.fetch`: size limit, sha256 check; the peer then
       provides it too if it serves). `model`, if given, must match the model it was published for;
    3. if `name` looks like a repo id `org/name`, in a hub: that repo of the folder `hub_dir` if given,
       else on the Hugging Face hub. The copy is added to the local store under `name`.

    A swarm that does not know the name, or whose providers are all unreachable, falls through to the hub;
    any other error (too large, failed verification, wrong model) is raised as is. Raises
    AdapterNotFoundError saying where it looked if no source has the adapter.
    """
    store = store or (swarm_hub.store if swarm_hub is not None else AdapterStore())
    sha = await asyncio.to_thread(store.sha_of, name)
    if sha is not None:
        return store.root / sha
    tried = ["the local store"]
    if swarm_hub is not None:
        try:
            return await swarm_hub.fetch(name, model)
        except (AdapterNotFoundError, AdapterUnavailableError) as e:
            tried.append(f"the swarm ({e})")
    if not is_repo_id(name):
        tried.append("no hub (the name is not a repo id of the form org/name)")
    else:
        try:
            folder = await asyncio.to_thread(fetch_from_hub, name, hub_dir)
        except AdapterNotFoundError as e:
            tried.append(str(e))
        else:
            sha = await asyncio.to_thread(store.add, folder, name)
            return store.root / sha
    raise AdapterNotFoundError(f"adapter {name!r} not found; looked in {', '.join(tried)}")
