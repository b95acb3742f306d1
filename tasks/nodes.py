"""Where the nodes of a multi-node `finetune train` (train.num_nodes > 1) meet, and where each
writes: the FINETUNE_RDZV_* and FINETUNE_NODE_STORAGE environment variables, read by train
on every node and set by whatever starts the nodes (a person, SLURM, Kubernetes, or the
Prefect flow, which hosts the meeting point itself). They are environment, not params: they
name this run's machines, not what it computes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import PipelineError

RDZV_ENDPOINT_ENV, RDZV_ID_ENV, RDZV_TIMEOUT_ENV = "FINETUNE_RDZV_ENDPOINT", "FINETUNE_RDZV_ID", "FINETUNE_RDZV_TIMEOUT"
# The address the other nodes reach this one at (its first process serves the gradient sums'
# store there); unset, its host name, which is wrong where that resolves to a loopback address
# (many containers) or to an interface the other nodes cannot reach.
NODE_ADDR_ENV = "FINETUNE_NODE_ADDR"
RDZV_TIMEOUT_S = 600.0  # torch's own default join timeout
# shared (default): the nodes share the workspace's filesystem, the first process of all writes
# the checkpoints and outputs; local: each node has its own checkout (a Prefect worker's, a
# pod's disk) and its first process writes them there (DDP keeps every replica's weights equal).
NODE_STORAGE_ENV, NODE_STORAGE_KINDS = "FINETUNE_NODE_STORAGE", ("shared", "local")
RDZV_BACKEND = "finetune-c10d"  # c10d, with a hold on the backend to count who joined


@dataclass
class Rendezvous:
    """Where and how this node's processes meet the other nodes' (FINETUNE_RDZV_*)."""

    endpoint: str
    run_id: str
    timeout_s: float
    local_addr: str | None = None
    backend: str = RDZV_BACKEND
    backends: list[Any] = field(default_factory=list)  # filled when the launcher creates it

    def joined(self) -> int | None:
        """Nodes in the rendezvous's last state, this one included; None when unreadable."""
        import pickle

        try:
            state = self.backends[0].get_state()
            nodes = pickle.loads(state[0]).participants if state else {}
        except Exception:  # the host node may be gone: the count is a courtesy
            return None
        # This node took itself out when it gave up (if it could): count it once either way.
        return len([node for node in nodes if node.pid != os.getpid()]) + 1

    def timed_out(self, nodes: int) -> str:
        joined = self.joined()
        count = f"{nodes - joined} of the {nodes} nodes never joined" if joined else f"not all {nodes} nodes joined"
        return (f"train.num_nodes is {nodes}, but {count} the rendezvous at {self.endpoint} (id "
                f"{self.run_id}) within {self.timeout_s:g} s ({RDZV_TIMEOUT_ENV}): start `finetune "
                f"train` on every node with the same {RDZV_ENDPOINT_ENV} and {RDZV_ID_ENV}")

    def unreachable(self) -> str | None:
        """The message for a rendezvous this node never reached (None once it had): the
        endpoint is wrong, its host is down, or a firewall is in the way."""
        if self.backends:
            return None
        return (f"could not reach the rendezvous at {self.endpoint} ({RDZV_ENDPOINT_ENV}): check that the "
                "node (or flow run) hosting it is up and that this node can reach that address and port")


def node_local_storage() -> bool:
    """Whether each node writes checkpoints and outputs into its own workspace
    (FINETUNE_NODE_STORAGE=local) rather than the first node into a shared one."""
    kind = os.environ.get(NODE_STORAGE_ENV, NODE_STORAGE_KINDS[0])
    if kind not in NODE_STORAGE_KINDS:
        raise PipelineError(f"{NODE_STORAGE_ENV} is {kind!r}: set it to shared (the nodes share the "
                            "workspace's filesystem) or local (each node has its own checkout)")
    return kind == "local"


def rendezvous_timeout() -> float:
    """FINETUNE_RDZV_TIMEOUT: seconds a node waits for the others to join (600 unset)."""
    timeout = os.environ.get(RDZV_TIMEOUT_ENV, str(RDZV_TIMEOUT_S))
    try:
        timeout_s = float(timeout)
    except ValueError:
        timeout_s = 0.0
    if timeout_s <= 0:
        raise PipelineError(f"{RDZV_TIMEOUT_ENV} is {timeout!r}: give the seconds to wait for "
                            "the other nodes, a positive number")
    return timeout_s


def split_endpoint(endpoint: str, nodes: int) -> tuple[str, int]:
    """FINETUNE_RDZV_ENDPOINT's host and port."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"train.num_nodes is {nodes}: set {RDZV_ENDPOINT_ENV} to host:port of "
                            f"the node that hosts the rendezvous, the same on every node "
                            f"(got {endpoint!r})")
    return host, int(port)


def rendezvous(nodes: int) -> Rendezvous:
    """One node: a private rendezvous on this host. Several: FINETUNE_RDZV_ENDPOINT (host:port,
    the same on every node; the node whose address it is hosts the store, unless another
    process there already does), FINETUNE_RDZV_ID and FINETUNE_RDZV_TIMEOUT from the
    environment."""
    import uuid

    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as registry
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    node_local_storage()  # a bad value fails here, not after the nodes met
    if nodes == 1:
        meeting = Rendezvous("127.0.0.1:0", uuid.uuid4().hex, RDZV_TIMEOUT_S)
    else:
        endpoint = os.environ.get(RDZV_ENDPOINT_ENV, "")
        split_endpoint(endpoint, nodes)
        meeting = Rendezvous(endpoint, os.environ.get(RDZV_ID_ENV, "finetune-train"), rendezvous_timeout(),
                             os.environ.get(NODE_ADDR_ENV) or None)

    def handler(params):
        params.backend = "c10d"  # the registered name is ours; the backend is torch's c10d
        backend, store = create_backend(params)
        meeting.backends.append(backend)
        return create_handler(store, backend, params)

    registry.register(RDZV_BACKEND, handler)
    return meeting
