"""The dealer's material, made before the query that uses it.

Everything random in a query depends on nothing the client sent: server2's masks, the shares of them it
deals, the bits of its masks, and the numbers server0 and server1 draw together for the comparison. So it
can be made while the servers wait for queries, and a query's own time is its openings and its arithmetic.

Each step of the network (a product, a ReLU, a truncation) hands its dealing to :func:`material` as one
function ``deal()``, which returns what each server keeps (tensors on the servers that keep them). What
happens then depends on where the network is being built:

* nowhere in particular (tests, tools): ``deal()`` is called there, in the query, as if this module did
  not exist;
* under :func:`recording`: ``deal()`` is called, and what it returns is collected. A function built this
  way, on a query's shapes, deals a whole query's material (:class:`Lots` keeps it on the servers);
* under :func:`using`: ``deal()`` is not called; the step gets the recorded material instead, in the
  order the steps ask for it, which the recording kept. The query computes with it and nothing else.

The serving side keeps a query's material in queues on the servers (:class:`Lots`) until one query takes it;
a dequeued lot is gone: a mask used twice would tell server0 and server1 the difference of two values.
"""
import contextlib
import threading
import uuid
from typing import Callable, Dict, List

from ._tf import tf
from .waiting import BackgroundCall

_building = threading.local()  # the recording or using under way in this thread, if any


class Recording:
    """What the steps of one query dealt: ``tensors`` flat, and how each step's share of them nests."""

    def __init__(self):
        self.tensors: List[tf.Tensor] = []
        self.structures: List[object] = []

    def take(self, dealt):
        self.structures.append(dealt)
        self.tensors.extend(tf.nest.flatten(dealt))
        return dealt


class Using:
    """Hands a recorded query's material to the steps of another trace of the same query, in order."""

    def __init__(self, structures, tensors):
        self.structures, self.tensors = list(structures), list(tensors)
        self.steps = self.offset = 0

    def take(self, _deal):
        if self.steps == len(self.structures):
            raise RuntimeError("the query asks for more material than was dealt for it")
        structure = self.structures[self.steps]
        size = len(tf.nest.flatten(structure))
        dealt = tf.nest.pack_sequence_as(structure, self.tensors[self.offset:self.offset + size])
        self.steps, self.offset = self.steps + 1, self.offset + size
        return dealt

    def check_all_taken(self):
        if self.steps != len(self.structures) or self.offset != len(self.tensors):
            raise RuntimeError(f"the query took {self.steps} of the {len(self.structures)} steps' material dealt "
                               "for it: the dealing and the query were built from different computations")


def material(deal: Callable[[], object]):
    """What one step deals: made by ``deal()`` now, or taken from material made before (the module's docstring)."""
    building = getattr(_building, "current", None)
    if building is None:
        return deal()
    if isinstance(building, Recording):
        return building.take(deal())
    return building.take(deal)


def dealing_only() -> bool:
    """Whether the steps are traced for their dealing only (:func:`recording`): then a step may return any
    value of its output's shape after its ``deal()``, and skip the rest, which nothing would run."""
    return isinstance(getattr(_building, "current", None), Recording)


@contextlib.contextmanager
def _building_with(building):
    if getattr(_building, "current", None) is not None:
        raise RuntimeError("a query's material is being recorded or used already")
    _building.current = building
    try:
        yield building
    finally:
        _building.current = None


def recording() -> "contextlib.AbstractContextManager[Recording]":
    """Within it, every step's ``deal()`` is called and its material collected (a query's whole material)."""
    return _building_with(Recording())


@contextlib.contextmanager
def using(structures, tensors):
    """Within it, the steps take ``tensors`` (recorded with ``structures``) instead of dealing; all of them."""
    with _building_with(Using(structures, tensors)) as building:
        yield building
    building.check_all_taken()


class Lots:
    """One bucket's material dealt ahead: a FIFO queue on each server holds that server's part of each lot.

    ``build()`` builds a query's computation (the network, on zero images); here it is traced for its dealing
    only (:func:`recording`), and each server's part of the material goes in that server's queue, where it
    stays: nothing of it passes through this process. A query built under :meth:`taking` dequeues one lot from each queue: a dequeued lot
    is gone from the queue, so no other query can take it. The queues are deleted with this object.
    """

    def __init__(self, build: Callable[[], None], party: Callable[[str], str]):
        self._build, self._party = build, party
        self._queues: Dict[str, tf.queue.FIFOQueue] = {}
        self._places: Dict[str, List[int]] = {}  # for each server, the positions of its tensors in a lot
        self.structures: List[object] = []
        self.bytes: Dict[str, int] = {}  # what one lot holds on each server
        self.deal = tf.function(self._deal)
        self.deal.get_concrete_function()  # traced now: the queues and the structures are known from here on

    def _deal(self):
        with recording() as made:
            self._build()
        self.structures[:] = made.structures
        if not self._queues:
            for position, tensor in enumerate(made.tensors):
                if self._party(tensor.device) is None:
                    raise ValueError(f"{tensor.name} was dealt on no server ({tensor.device!r}): deal under tf.device")
                self._places.setdefault(self._party(tensor.device), []).append(position)
            with tf.init_scope():  # made once, on each server, outside the traced function
                for server, places in self._places.items():
                    tensors = [made.tensors[position] for position in places]
                    with tf.device(tensors[0].device):
                        # A name of its own: in eager mode TensorFlow names a queue after a counter of this
                        # process, and a serving process started after one that was killed would count the same
                        # way, find the queues it left on the servers, and take lots dealt for another model.
                        self._queues[server] = tf.queue.FIFOQueue(
                            CAPACITY, [t.dtype for t in tensors], [t.shape for t in tensors],
                            shared_name=f"material/{uuid.uuid4().hex}/{server}", name=f"material-{server}")
                    self.bytes[server] = sum(t.shape.num_elements() * t.dtype.size for t in tensors)
        sizes = []
        for server, places in self._places.items():
            with tf.device(made.tensors[places[0]].device):
                with tf.control_dependencies([self._queues[server].enqueue([made.tensors[p] for p in places])]):
                    sizes.append(self._queues[server].size())
        return sizes

    def taking(self):
        """Within a query's trace: the steps take one lot, dequeued from the servers' queues (:func:`using`)."""
        tensors = {}
        for server, places in self._places.items():
            queue = self._queues[server]
            with tf.device(queue.queue_ref.device):
                # An empty queue fails the query at once instead of waiting for a lot nobody will deal.
                with tf.control_dependencies([tf.debugging.assert_positive(
                        queue.size(), message="no material was dealt for this query (dealing.Stock.top_up)")]):
                    tensors.update(zip(places, queue.dequeue()))
        return using(self.structures, [tensors[position] for position in range(len(tensors))])

    def ready(self) -> int:
        """How many lots the servers' queues hold now (each holds as many: one function fills all, one empties all)."""
        return int(next(iter(self._queues.values())).size())


CAPACITY = -1  # no bound: an enqueue never waits (the serving side keeps two lots or so: Stock)


class Stock:
    """How many lots of each bucket wait in the servers' queues; one more dealt while the servers wait.

    ``deal(bucket)`` puts one more lot in that bucket's queues. Before a query is let in, :meth:`top_up` makes
    sure a lot waits for it: a query never waits for its own dealing, and never finds the queues empty. Once
    it is let in, :meth:`deal_ahead` deals the next lot in a thread of its own, while the servers wait for the
    query (a query arriving meanwhile takes the lot that waited). Each query that computes takes one lot, and
    the serving side says so (:meth:`used`).
    """

    def __init__(self, deal: Callable[[int], None], lots_per_bucket: int = 2):
        self._deal, self.lots_per_bucket = deal, lots_per_bucket
        self._ready: Dict[int, int] = {}
        self._dealing = None  # (bucket, BackgroundCall) while a lot is dealt ahead

    def ready(self, bucket: int) -> int:
        """How many lots of this bucket are dealt and not taken (the one being dealt ahead not counted yet)."""
        return self._ready.get(bucket, 0)

    def _finish(self) -> None:
        """Wait for the lot being dealt ahead, and count it (a failure to deal it is raised here)."""
        if self._dealing is not None:
            (bucket, call), self._dealing = self._dealing, None
            call.wait(None)
            call.result()
            self._ready[bucket] = self.ready(bucket) + 1

    def top_up(self, bucket: int) -> None:
        """At least one lot of this bucket waits when this returns (dealt now if none does)."""
        self._finish()
        while self.ready(bucket) < 1:
            self._deal(bucket)
            self._ready[bucket] = self.ready(bucket) + 1

    def deal_ahead(self, bucket: int) -> None:
        """Deal one more lot of this bucket in the background, unless ``lots_per_bucket`` wait already."""
        if self._dealing is None and self.ready(bucket) < self.lots_per_bucket:
            self._dealing = (bucket, BackgroundCall(self._deal, bucket, name="dealing ahead"))

    def used(self, bucket: int, count: int = 1) -> None:
        """A query of this bucket computed: it took a lot."""
        self._ready[bucket] = self.ready(bucket) - count

    def forget(self, bucket: int) -> None:
        """Count no lot of this bucket (its queues were dropped: SecureModel.discard_lots); the next query's
        is dealt before it."""
        if self._dealing is not None and self._dealing[0] == bucket:
            self._dealing = None  # not waited for: the servers may be what failed
        self._ready[bucket] = 0

    def settle(self, seconds: float) -> None:
        """Let a lot being dealt ahead finish (up to ``seconds``: a silent server's call is abandoned)."""
        if self._dealing is not None:
            if self._dealing[1].wait(seconds):
                try:
                    self._finish()
                    return
                except Exception:  # noqa: BLE001 - the servers' failure is reported by what waits on them
                    pass
            self._dealing = None

    def clear(self) -> None:
        self._ready.clear()
