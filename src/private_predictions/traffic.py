"""What the servers send each other in a traced computation, counted on its graph.

TensorFlow sends a tensor from the server that made it to each other server whose ops use it,
once per receiving server. So the bytes that cross between server0, server1 and server2 in one
run of a traced function can be read off its graph, with the branches of its conditions: an
exact count of the payload, the same on every run (gRPC's framing adds a few per cent on the wire),
for tensors of static shape. A tensor of unknown size is counted at the size the caller says is its
largest (the serving side: its queries' keys, a few hundred bytes at most), or refused.
"""
import re
from collections import Counter
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

SERVER = re.compile(r"/job:tfe/replica:0/task:(\d)")  # tf-encrypted's device names for the three servers


def party(device: str) -> Optional[str]:
    """``server0``, ``server1`` or ``server2`` for a device on that server; None for anything else."""
    found = SERVER.search(device or "")
    return f"server{found.group(1)}" if found else None


def graphs(graph) -> Iterator:
    """``graph`` and the graphs of every function its ops call (a condition's branches, a loop's body)."""
    seen, waiting = set(), [graph]
    while waiting:
        current = waiting.pop()
        yield current
        for op in current.get_operations():
            for value in op.node_def.attr.values():
                names = ([value.func.name] if value.HasField("func") else []) + [f.name for f in value.list.func]
                for name in names:
                    function = graph._get_function(name) if name not in seen else None
                    seen.add(name)
                    if function is not None:
                        waiting.append(function.graph)


def crossings(graph, largest: Optional[int] = None) -> Dict[Tuple[str, str], int]:
    """Bytes sent from each server to each other one when ``graph`` runs once: {(from, to): bytes}.

    A dimension of unknown size counts as ``largest``; without it, a tensor of unknown size is refused.
    """
    sent = Counter()
    for inner in graphs(graph):
        counted = set()
        for op in inner.get_operations():
            destination = party(op.device)
            for tensor in op.inputs:
                source = party(tensor.op.device)
                if source is None or destination is None or source == destination:
                    continue
                if (tensor.name, destination) in counted:
                    continue  # sent once to each server that uses it
                counted.add((tensor.name, destination))
                elements = tensor.shape.num_elements()
                if elements is None and largest is not None and tensor.shape.rank is not None:
                    elements = int(np.prod([largest if size is None else size for size in tensor.shape.as_list()]))
                if elements is None:
                    raise ValueError(f"{tensor.name} crosses from {source} to {destination} with no static shape: "
                                     "its bytes cannot be counted on the graph")
                sent[(source, destination)] += elements * tensor.dtype.size
    return dict(sent)
