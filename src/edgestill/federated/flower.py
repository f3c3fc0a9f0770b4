"""The rounds on Flower's simulation engine (`flwr`, the `federated` extra; Ray runs the clients).

Each of `clients` virtual SuperNodes runs the ClientApp; its partition id is the client's number. In every round the
ServerApp sends each node a `train` message (the round, and from round 2 the server's logits on the public texts as an
ArrayRecord); the node runs `client_step(k, round, server_logits)` and replies with its logits on the public texts and
a few metrics. The ServerApp then calls `server_step(round, [logits of client 0, 1, ...], metrics)`, which returns the
server's logits for the next round. What the steps do is the job's (jobs/federate.py): this module only moves arrays.

`client_step` runs in Ray worker processes: it must be a module-level function (or a functools.partial of one) that
finds everything it needs from its arguments (the job's is keyed by the run folder). Failures on a node come back
as one EdgestillError naming the client and its error.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numpy as np

from edgestill.errors import EdgestillError

log = logging.getLogger(__name__)

FLOWER = "flwr[simulation]==1.42.0"
NODES_TIMEOUT_S = 300  # the simulated SuperNodes register within seconds; minutes means Ray did not start


def require_flower():
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        raise EdgestillError(f"federated rounds run on Flower's simulation engine, which is not installed ({e.name}); "
                             f"pip install '{FLOWER}' (or: pip install -e '.[federated]')") from None


def simulate(clients: int, rounds: int, client_step: Callable, server_step: Callable, first_round: int = 1,
             server_logits: np.ndarray | None = None, cpus: int = 2, cpus_per_client: int = 1,
             round_timeout_s: float | None = None) -> None:
    """Run rounds first_round..rounds: every client's step, then the server's (see the module docstring).
    `server_logits`: what the server sent at the end of round first_round - 1 (a resumed run)."""
    require_flower()
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["round"])
        server = msg.content["server"]["logits"].numpy() if "server" in msg.content else None
        logits, metrics = client_step(k, rnd, server)
        return Message(RecordDict({"logits": ArrayRecord({"logits": Array(np.ascontiguousarray(logits))}),
                                   "metrics": MetricRecord({"client": k, **metrics})}), reply_to=msg)

    server_app = ServerApp()
    failure: list[BaseException] = []

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            nodes, waited = [], time.monotonic()
            while len(nodes) < clients:
                if time.monotonic() - waited > NODES_TIMEOUT_S:
                    raise EdgestillError(f"only {len(nodes)} of {clients} simulated Flower nodes started in "
                                         f"{NODES_TIMEOUT_S} s; see Ray's log above")
                time.sleep(0.2)
                nodes = list(grid.get_node_ids())
            server = server_logits
            for rnd in range(first_round, rounds + 1):
                content = {"config": ConfigRecord({"round": rnd})}
                if server is not None:
                    content["server"] = ArrayRecord({"logits": Array(np.ascontiguousarray(server))})
                messages = [Message(RecordDict(content), dst_node_id=n, message_type="train") for n in nodes]
                replies = list(grid.send_and_receive(messages, timeout=round_timeout_s))
                errors = [r.error.reason for r in replies if r.has_error()]
                if errors or len(replies) < clients:
                    raise EdgestillError(f"round {rnd}: {len(errors)} of {clients} clients failed"
                                         f"{' and ' + str(clients - len(replies)) + ' never answered' if len(replies) < clients else ''}"
                                         f"{': ' + errors[0] if errors else ''}")
                by_client = sorted(replies, key=lambda r: int(r.content["metrics"]["client"]))
                logits = [r.content["logits"]["logits"].numpy() for r in by_client]
                metrics = [dict(r.content["metrics"]) for r in by_client]
                server = server_step(rnd, logits, metrics)
        except BaseException as e:  # run_simulation only logs what its ServerApp raises
            failure.append(e)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app, client_app, num_supernodes=clients, backend_config={
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False, "logging_level": "error"}})
    if failure:
        raise failure[0]
