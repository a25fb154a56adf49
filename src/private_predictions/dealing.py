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
from typing import Callable, Dict, List, Tuple

from tensorflow.python.ops import gen_data_flow_ops

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

    ``build(images)`` builds a query's computation (the network, on that many zero images); here it is traced
    for its dealing only (:func:`recording`), and each server's part of the material goes in that server's
    queue, where it stays: nothing of it passes through this process. A query built under :meth:`taking`
    dequeues one lot from each queue: a dequeued lot is gone from the queue, so no other query can take it.

    Lots are dealt ``pack`` at a time: the dealing is traced on ``pack`` queries' images at once and cut into
    ``pack`` lots. A dealing's cost is mostly TensorFlow launching its operations, not their arithmetic: 16
    images cost about a fifth as much per image as one, and one lot at a time was about half of a batch of
    1's processor time.
    Every tensor dealt is made image by image along its first axis (masks, their bits and their products
    with the weights' mask), so the first axis cuts it into the queries' lots. A tensor that did not grow
    with the images (a seed, say) would be shared by the lots, a mask used twice: one whose first axis the
    pack does not divide is refused, and test_dealing.py checks that every tensor the network deals grows.

    Every lot has a number, put in each server's queue with that server's part, and a query is told the
    number of the lot it must take. Each server checks the number it dequeued before any of its part is
    used: a computation cut short (a failure, an outage, an interrupt) may have dequeued its lot on some
    servers and not on others, and then the queues' heads no longer line up. Without the numbers, every
    later query would compute with one server's part of a lot and another's part of the next, and answer
    wrong without an error; with them, such a query fails before it opens anything.

    The queues are given to the dealing and to the queries as arguments, not built into them, so that
    :meth:`renew` can replace them without tracing anything again: whatever a computation left running
    still holds the old ones, which are closed (it fails at once if it waits on them) and emptied.
    """

    def __init__(self, build: Callable[[int], None], images: int, party: Callable[[str], str], pack: int = 1):
        self._build, self._images, self._party, self.pack = build, images, party, pack
        self._queues: Dict[str, _Queue] = {}  # for each server, in SERVERS' order once dealt
        self._places: Dict[str, List[int]] = {}  # for each server, the positions of its tensors in a lot
        self.structures: List[object] = []
        self.bytes: Dict[str, int] = {}  # what one lot holds on each server
        self.dealing = tf.function(self._deal, input_signature=[NUMBER, HANDLES])
        self.dealing.get_concrete_function()  # traced now: the queues and the structures are known from here on

    def handles(self) -> Tuple[tf.Tensor, ...]:
        """The servers' queues now, as the dealing and the queries take them (SERVERS' order)."""
        return tuple(self._queues[server].handle for server in SERVERS)

    def deal(self, number: int):
        """Put lots ``number`` to ``number + pack - 1`` in the servers' queues; returns their sizes."""
        return self.dealing(tf.constant(number, tf.int64), self.handles())

    def _deal(self, number, handles):
        with recording() as made:
            self._build(self._images * self.pack)
        self.structures[:] = made.structures
        shapes = [self._lot_shape(tensor) for tensor in made.tensors]  # of each tensor in one lot
        if not self._queues:
            for position, tensor in enumerate(made.tensors):
                if self._party(tensor.device) not in SERVERS:
                    raise ValueError(f"{tensor.name} was dealt on no server ({tensor.device!r}): deal under tf.device")
                self._places.setdefault(self._party(tensor.device), []).append(position)
            if set(self._places) != set(SERVERS):
                raise ValueError(f"material was dealt on {sorted(self._places)} only: a lot has a part on each server")
            with tf.init_scope():  # made once, on each server, outside the traced function
                for server in SERVERS:
                    places = self._places[server]
                    dtypes = [made.tensors[place].dtype for place in places]
                    self._queues[server] = _Queue(made.tensors[places[0]].device, [tf.int64] + dtypes,
                                                  [[]] + [shapes[place] for place in places])
                    self.bytes[server] = sum(tf.TensorShape(shapes[place]).num_elements() * dtype.size
                                             for place, dtype in zip(places, dtypes))
        sizes = []
        for server, handle in zip(SERVERS, handles):
            queue = self._queues[server]
            with tf.device(queue.device):
                numbers = number + tf.range(self.pack, dtype=tf.int64)
                # Cut along the first axis, each tensor into pack lots of the shape one query takes.
                parts = [tf.reshape(made.tensors[position], [self.pack] + shapes[position])
                         for position in self._places[server]]
                put = gen_data_flow_ops.queue_enqueue_many_v2(handle, [numbers] + parts)
                with tf.control_dependencies([put]):
                    sizes.append(gen_data_flow_ops.queue_size_v2(handle))
        return sizes

    def _lot_shape(self, tensor) -> List[int]:
        """The shape of one lot's part of ``tensor``, dealt for a pack: a pack-th of it along its first axis.
        A tensor that cannot be cut so is refused (the class docstring); test_dealing.py checks that every
        tensor the network deals grows with the images, so that each lot's part is its own query's."""
        shape = tensor.shape.as_list()
        if self.pack > 1 and (not shape or shape[0] % self.pack):
            raise ValueError(f"{tensor.name} ({shape}) cannot be cut into {self.pack} lots along its first axis: "
                             "material that does not grow with the images would be shared by the lots")
        return [shape[0] // self.pack] + shape[1:] if shape else []

    def taking(self, number, handles):
        """Within a query's trace: the steps take lot ``number``, dequeued from the servers' queues ``handles``
        (:func:`using`). A server whose queue is empty, or whose next lot has another number, fails the query
        before any of the material is used (the class docstring)."""
        tensors = {}
        for server, handle in zip(SERVERS, handles):
            queue = self._queues[server]
            with tf.device(queue.device):
                # An empty queue fails the query at once instead of waiting for a lot nobody will deal.
                with tf.control_dependencies([tf.debugging.assert_positive(
                        gen_data_flow_ops.queue_size_v2(handle),
                        message="no material was dealt for this query (dealing.Stock.top_up)")]):
                    taken = queue.dequeue(handle)
                with tf.control_dependencies([tf.debugging.assert_equal(
                        taken[0], number, message=f"{MISMATCH} on {server}")]):
                    tensors.update(zip(self._places[server], [tf.identity(part) for part in taken[1:]]))
        return using(self.structures, [tensors[position] for position in range(len(tensors))])

    def renew(self) -> None:
        """New, empty queues on every server; the old ones are closed and emptied (the class docstring)."""
        old, self._queues = self._queues, {server: queue.fresh() for server, queue in self._queues.items()}
        for queue in old.values():
            queue.close()

    def close(self) -> None:
        """Close and empty the queues, which frees the lots' memory on the servers: no lot is dealt after."""
        for queue in self._queues.values():
            queue.close()

    def sizes(self) -> List[int]:
        """How many lots each server's queue holds now."""
        return [queue.size() for queue in self._queues.values()]


# Lots of one image are dealt 16 at a time (Lots): one alone took the servers 22 to 27 ms of processor time,
# 16 together 74 to 98. Larger ones gain less (8 images took 57 ms, 16 images 83) and are dealt one at a time.
PACK_IMAGES = 16


def pack_of(bucket: int) -> int:
    """How many lots of this bucket are dealt together."""
    return PACK_IMAGES if bucket == 1 else 1


CAPACITY = -1  # no bound: an enqueue never waits (the serving side keeps a pack and a half or so: Stock)
NUMBER = tf.TensorSpec([], tf.int64)  # a lot's number
SERVERS = ("server0", "server1", "server2")  # each holds a part of every lot
HANDLES = tuple(tf.TensorSpec([], tf.resource) for _ in SERVERS)  # their queues
MISMATCH = "the material dequeued is not the lot the query was told to take"


class _Queue:
    """One server's queue of lots, by its handle on that server.

    Not a ``tf.queue.FIFOQueue``, for two reasons. In eager mode that class replaces the name it is given
    with a counter of this process, and a serving process started after one that was killed would count
    the same way, find the queues it left on the servers, and take lots dealt for another sharing of the
    model (test_dealing.py). And it deletes its queue when garbage collection takes it, in whatever thread
    runs then, even once the servers are gone: here a queue is closed and emptied instead (:meth:`close`),
    which frees what it held, and the empty queue stays, as the request queues do (queues.py).
    """

    def __init__(self, device: str, dtypes, shapes):
        self.device, self.dtypes, self.shapes = device, dtypes, shapes
        with tf.device(device):
            self.handle = gen_data_flow_ops.fifo_queue_v2(
                component_types=dtypes, shapes=shapes, capacity=CAPACITY, shared_name=f"material/{uuid.uuid4().hex}")

    def fresh(self) -> "_Queue":
        return _Queue(self.device, self.dtypes, self.shapes)

    def dequeue(self, handle=None):
        with tf.device(self.device):
            taken = gen_data_flow_ops.queue_dequeue_v2(self.handle if handle is None else handle, self.dtypes)
        for tensor, shape in zip(taken, self.shapes):
            tensor.set_shape(shape)
        return taken

    def size(self) -> int:
        with tf.device(self.device):
            return int(gen_data_flow_ops.queue_size_v2(self.handle))

    def close(self) -> None:
        """Close the queue (a dequeue waiting on it fails at once), then take out what is left, without waiting."""
        try:
            _close_and_empty(self.handle, tuple(self.dtypes))
        except tf.errors.OutOfRangeError:
            pass  # a computation left running took the last lots between the two looks: empty anyway


@tf.function
def _close_and_empty(handle, dtypes):
    # One call that returns a value: its error, if any, is raised by the call (eager ops on a server run
    # asynchronously, and would raise theirs at some later op). On a closed queue, a dequeue of up to n lots
    # returns fewer if fewer are there, and fails if none is.
    closed = gen_data_flow_ops.queue_close_v2(handle, cancel_pending_enqueues=True)
    with tf.control_dependencies([closed]):
        left = gen_data_flow_ops.queue_size_v2(handle)
    return tf.cond(left > 0, lambda: tf.size(gen_data_flow_ops.queue_dequeue_up_to_v2(handle, left, list(dtypes))[0]),
                   lambda: tf.constant(0))


class Stock:
    """The lots of each bucket that wait in the servers' queues, and their numbers; more dealt while the
    servers wait.

    ``deal(bucket, number)`` puts lots ``number`` to ``number + pack(bucket) - 1`` of that bucket in the
    servers' queues (a pack: :class:`Lots`); ``renew(bucket)`` gives the bucket new, empty queues
    (:meth:`Lots.renew`). Before a query is let in, :meth:`top_up` makes sure a lot waits for it, and
    :meth:`next` is the number it must take. Once it is let in, :meth:`deal_ahead` deals the next pack of
    that size in a thread of its own while the servers wait, if few lots are left. A query that computed
    took its lot (:meth:`used`); one that failed, or was left running, may have taken it on some servers
    only (:meth:`unsure`), and so may a pack dealt ahead that failed: the bucket then gets new queues before
    its next lot is dealt.

    A pack dealt ahead counts as soon as it is in, and a top-up waits for it only if the query needs it
    (none of its size left) or its queues are about to be renewed. Dealing now and renewing hold one lock,
    so a top-up cut short by an interrupt (its caller left, its thread goes on) finishes before the next
    serve's begins; the counts hold another, never held while the servers work, so that what the serving
    thread tells the stock never waits.
    """

    def __init__(self, deal: Callable[[int, int], None], renew: Callable[[int], None],
                 pack: Callable[[int], int] = lambda bucket: 1, lots_per_bucket: int = 2):
        self._deal, self._renew, self._pack, self.lots_per_bucket = deal, renew, pack, lots_per_bucket
        self._dealt: Dict[int, int] = {}  # bucket -> the number of its next lot to deal
        self._taken: Dict[int, int] = {}  # bucket -> the number of its next lot to take
        self._unsure = set()  # buckets whose queues may not line up
        self._dealing = None  # (bucket, BackgroundCall) while a pack is dealt ahead, until it is finished
        self._working = threading.Lock()  # held while dealing now or renewing
        self._counting = threading.Lock()  # held while the counts change

    def ready(self, bucket: int) -> int:
        """How many lots of this bucket are dealt, not taken and usable (none while the bucket's queues may
        not line up)."""
        if bucket in self._unsure:
            return 0
        return self._dealt.get(bucket, 0) - self._taken.get(bucket, 0)

    def next(self, bucket: int) -> int:
        """The number of the lot the next query of this bucket takes."""
        return self._taken.get(bucket, 0)

    def _dealing_done(self, bucket: int, number: int, failed: bool) -> None:
        with self._counting:
            self._dealt[bucket] = number + self._pack(bucket)  # counted even if it failed: never dealt twice
            if failed:
                self._unsure.add(bucket)  # it may be in some servers' queues only

    def _deal_counted(self, bucket: int, number: int) -> None:
        """Deal a pack, and count it, failed or not (a failure is raised)."""
        try:
            self._deal(bucket, number)
        except BaseException:
            self._dealing_done(bucket, number, failed=True)
            raise
        self._dealing_done(bucket, number, failed=False)

    def _deal_in_background(self, bucket: int, number: int) -> None:
        """Deal a pack ahead, and count it. A failure is not raised: the servers may be back by the next
        top-up, and if not, what deals next says so."""
        try:
            self._deal_counted(bucket, number)
        except Exception:  # noqa: BLE001 - see the docstring
            pass

    def settle(self) -> None:
        """Wait for the pack being dealt ahead, if any, and for its thread to end."""
        with self._counting:
            dealing, self._dealing = self._dealing, None
        if dealing is not None:
            dealing[1].wait(None)
            dealing[1].result()

    def _quiet(self, bucket: int) -> bool:
        """Wait for a pack of this bucket on its way in, if any; whether there was one."""
        dealing = self._dealing
        if dealing is None or dealing[0] != bucket:
            return False
        self.settle()
        return True

    def top_up(self, bucket: int) -> None:
        """At least one lot of this bucket waits when this returns (dealt now if none does). A pack of it
        being dealt ahead is waited for only before its queues are renewed or a lot is dealt now."""
        with self._working:
            dealing = self._dealing
            if dealing is not None and dealing[1].done():
                self.settle()  # in and counted: its thread is ended, and the next can be dealt ahead
            while True:
                if bucket in self._unsure:
                    self._quiet(bucket)  # its pack goes in before the queues it goes into are closed
                    self._renew(bucket)
                    with self._counting:
                        self._taken[bucket] = self._dealt.get(bucket, 0)
                        self._unsure.discard(bucket)
                if self.ready(bucket) >= 1:
                    return
                if self._quiet(bucket):
                    continue  # a pack of this bucket came in, or failed: look again
                self._deal_counted(bucket, self._dealt.get(bucket, 0))

    def deal_ahead(self, bucket: int) -> None:
        """Deal the next pack of this bucket in the background if fewer than ``lots_per_bucket`` lots wait,
        or than half a pack; not while another pack is dealt ahead. Called once :meth:`top_up` has returned."""
        with self._counting:
            if (self._dealing is None and bucket not in self._unsure
                    and self.ready(bucket) < max(self.lots_per_bucket, self._pack(bucket) // 2)):
                number = self._dealt.get(bucket, 0)
                self._dealing = (bucket, BackgroundCall(self._deal_in_background, bucket, number, name="dealing ahead"))

    def used(self, bucket: int) -> None:
        """A query of this bucket computed: it took lot :meth:`next`."""
        with self._counting:
            self._taken[bucket] = self.next(bucket) + 1

    def unsure(self, bucket: int) -> None:
        """A query of this bucket failed or was left running: it may have taken its lot on some servers only."""
        with self._counting:
            self._unsure.add(bucket)

    def all_unsure(self) -> None:
        """After a server's outage: any computation cut by it may have taken its lot on some servers only."""
        with self._counting:
            self._unsure.update(self._dealt)

    def close(self) -> None:
        """Wait for a pack being dealt ahead, and count none from now on."""
        with self._working:
            self.settle()
            with self._counting:
                self._dealt.clear()
                self._taken.clear()
                self._unsure.clear()
