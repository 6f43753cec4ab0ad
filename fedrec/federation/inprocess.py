"""A Ray-free Grid that runs a ClientApp in this process, one Context per virtual node.

For tests and quick experiments: the real ServerApp strategy and the real ClientApp
handlers exchange real Flower Messages, without the Simulation Engine. A client that
raises becomes an error reply, as in Flower's runtime.
"""

import copy
from collections.abc import Iterable
from types import SimpleNamespace

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedrec.federation.flower import set_task_identity

CLIENT_APP_RAISED = 100


class InProcessGrid(Grid):
    def __init__(self, client_app, run_config: dict, num_nodes: int, run_id: int = 1):
        set_task_identity(run_id)
        self.client_app, self._run_id = client_app, run_id
        self.contexts = {
            node: Context(run_id=run_id, node_id=node, state=RecordDict(), run_config=run_config,
                          node_config={"partition-id": node - 1, "num-partitions": num_nodes})
            for node in range(1, num_nodes + 1)}
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # the run is fixed at construction
        pass

    @property
    def run(self):  # Flower's legacy workflows (fedrec/federation/secagg.py) read run.run_id only
        return SimpleNamespace(run_id=self._run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _call(self, msg: Message) -> Message:
        # Each node gets its own copy, as over a real transport: Flower's legacy SecAgg+
        # workflow sends one content object to many nodes, and its client mod mutates it.
        msg = copy.deepcopy(msg)
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # noqa: BLE001 - mirrors Flower's runtime
            return Message(Error(code=CLIENT_APP_RAISED, reason=repr(exc)), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            key = f"{len(self._replies)}-{i}"
            self._replies[key] = self._call(msg)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
