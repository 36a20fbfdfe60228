"""The in-process engine: a ``flwr.serverapp.Grid`` that calls the ClientApp directly (platform.md §4.2).

No Ray, no SuperLink, no serialisation: :class:`InProcessGrid` keeps one ``Context`` per node
(``node_config = {"partition-id": k, "num-partitions": K, ...}``, its own ``state``), and
``push_messages`` deep-copies each instruction, calls the ClientApp with the node's context and
stores a deep copy of the reply for ``pull_messages``. Deep copies keep the server and the
clients from sharing tensors, as a real transport would. A ClientApp that raises becomes an
error reply, as in Flower's runtimes.

The real ServerApp then runs on this grid unchanged: :func:`run_inprocess`. Node ids are fixed
(:data:`FIRST_NODE_ID` + partition id), so seeded client sampling picks the same partitions in
every in-process run; nodes' states can be saved and restored with the server's checkpoint
(:meth:`InProcessGrid.node_states`, :meth:`InProcessGrid.load_node_states`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from fed_dfkd.transport import make_message, reply_to

logger = logging.getLogger(__name__)

#: The node id of partition k is FIRST_NODE_ID + k (0 and 1 are Flower's reserved ids).
FIRST_NODE_ID = 1000

ClientCallable = Callable[[Message, Context], Message]
#: Called with ``("down", instruction)`` for each delivered instruction and ``("up", reply)``
#: for each reply, both as the other side receives them.
Observer = Callable[[str, Message], None]


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process."""

    def __init__(
        self,
        client_app: ClientApp | ClientCallable,
        *,
        num_nodes: int,
        run_config: Mapping[str, Any],
        node_config: Mapping[str, Any] | None = None,
        run_id: int = 1,
        observer: Observer | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.client_app = client_app
        self.observer = observer
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        self._served: set[int] = set()
        self.contexts: dict[int, Context] = {}
        for k in range(num_nodes):
            node_id = FIRST_NODE_ID + k
            config = {"partition-id": k, "num-partitions": num_nodes, **dict(node_config or {})}
            self.contexts[node_id] = Context(run_id=run_id, node_id=node_id, node_config=config,
                                             state=RecordDict(), run_config=dict(run_config))

    # -- Grid ----------------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        kwargs = {"ttl": ttl} if ttl is not None else {}
        return make_message(content, dst_node_id=dst_node_id, message_type=message_type,
                            group_id=group_id, run_id=self._run.run_id, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; returns the ids of those delivered (unknown nodes: none)."""
        ids: list[str] = []
        for message in messages:
            metadata = message.metadata
            if not metadata.message_id:
                raise ValueError("a message pushed to the grid needs a message_id")
            context = self.contexts.get(metadata.dst_node_id)
            if context is None:
                logger.warning("no node %s in this grid; message %s not delivered",
                               metadata.dst_node_id, metadata.message_id)
                continue
            delivered = copy.deepcopy(message)
            if self.observer is not None:
                self.observer("down", delivered)
            self._served.add(int(context.node_config["partition-id"]))
            reply = self._call(delivered, context)
            reply = copy.deepcopy(reply)
            if self.observer is not None:
                self.observer("up", reply)
            self._replies[metadata.message_id] = reply
            ids.append(metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        # Every reply exists once push returns, so there is nothing to wait for.
        return self.pull_messages(self.push_messages(messages))

    def _call(self, message: Message, context: Context) -> Message:
        try:
            reply = self.client_app(message, context)
        except Exception as error:  # noqa: BLE001 - a failing client must not stop the server
            logger.warning("ClientApp of node %d raised %s: %s", context.node_id,
                           type(error).__name__, error)
            return reply_to(message, Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                           reason=f"{type(error).__name__}: {error}"))
        if not isinstance(reply, Message):
            return reply_to(message, Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                           reason=f"ClientApp returned {type(reply).__name__}, "
                                                  "not a Message"))
        return reply

    # -- checkpoint of the nodes' state (server.loop.CheckpointableGrid) ----------------------

    def node_states(self) -> dict[int, RecordDict]:
        """Each node's ``Context.state``, by partition id (node ids are this engine's own)."""
        return {int(c.node_config["partition-id"]): c.state for c in self.contexts.values()}

    def changed_partitions(self) -> set[int]:
        changed, self._served = self._served, set()
        return changed

    def load_node_states(self, states: Mapping[int, RecordDict]) -> None:
        for context in self.contexts.values():
            partition = int(context.node_config["partition-id"])
            if partition in states:
                context.state = copy.deepcopy(states[partition])


def run_inprocess(
    run_config: Mapping[str, Any],
    *,
    num_nodes: int,
    server_app: ServerApp | None = None,
    client_app: ClientApp | ClientCallable | None = None,
    observer: Observer | None = None,
    run_id: int = 1,
) -> InProcessGrid:
    """Run the ServerApp against ``num_nodes`` in-process ClientApps; returns the grid.

    Defaults: the project's ``server.app.app`` and ``client.app.app``. The run config goes to
    the ServerApp's and every node's context.
    """
    if server_app is None:
        from server.app import app as server_app
    if client_app is None:
        from client.app import app as client_app
    grid = InProcessGrid(client_app, num_nodes=num_nodes, run_config=run_config, run_id=run_id,
                         observer=observer)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    server_app(grid, context)
    return grid


__all__: Sequence[str] = ("FIRST_NODE_ID", "InProcessGrid", "run_inprocess")
