"""Create the work pools that prefect.yaml's deployments name, so `prefect deploy --all` works.

    python -m flows.pools              # or: make pools   (PREFECT_API_URL set)

Pools that exist are left as they are (a team may have tuned their concurrency or job
template); missing ones are created as process pools with Prefect's default job template,
as `prefect work-pool create NAME --type process` would.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import yaml

POOL_TYPE = "process"


def pool_names(prefect_yaml: Path) -> list[str]:
    """Every work pool a deployment of `prefect_yaml` names, in order of first use."""
    spec = yaml.safe_load(prefect_yaml.read_text()) or {}
    names = [(d.get("work_pool") or {}).get("name") for d in spec.get("deployments") or []]
    return list(dict.fromkeys(n for n in names if n))


async def ensure_pools(names: list[str]) -> list[str]:
    """Creates the pools of `names` that the server lacks; returns the ones it created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    created = []
    async with get_client() as client:
        for name in names:
            try:
                await client.read_work_pool(name)
            except ObjectNotFound:
                await client.create_work_pool(WorkPoolCreate(
                    name=name, type=POOL_TYPE,
                    base_job_template=ProcessWorker.get_default_base_job_template()))
                created.append(name)
    return created


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=Path("prefect.yaml"))
    args = parser.parse_args(argv)
    names = pool_names(args.file)
    created = asyncio.run(ensure_pools(names))
    for name in names:
        print(f"work pool {name}: {'created (' + POOL_TYPE + ')' if name in created else 'exists'}")


if __name__ == "__main__":
    main()
