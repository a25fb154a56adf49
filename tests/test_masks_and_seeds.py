"""What server2 deals and what the openers hold, checked on the series' ReLU (relu.py), truncation (truncation.py)
and, in the whole network, its products (product.py).

A mask is only as good as its secrecy: ``c = x + r`` is uniformly random to server0 only if some part of
``r`` grows from a seed that server0 never gets. A mutant in which server2 draws one seed for both halves
of r (r = 2 r0, and server0 holds r0) computes right and opens words whose bits look uniform, yet server0
recovers every secret as c - 2^k - 2 r0. These tests look at who holds which seed and what can be
computed from it:

* what an opener holds: no whole-number combination of every 64-bit tensor server0 (or server1) holds or
  receives gives the secrets or the results;
* seeds and openings: no seed is drawn twice, each seed grows one mask on server2 and one server only (or,
  for server0 and server1's common randomness, on those two only), and no opened word comes out twice,
  within a run, across a batch of equal values, or across two runs;
* what crosses between the servers, read off the traced graph: each of server2's seeds goes to one server,
  nothing server2 sends goes to both, with the types and sizes of a formula.
"""
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from tf_encrypted.operations import secure_random

import private_predictions.masking as masking_module
import private_predictions.product as product_module
import private_predictions.relu as relu_module
import private_predictions.truncation as truncation_module
from conftest import shared
from private_predictions import connect, load_logits_model, load_mnist, share_model
from private_predictions._tf import tf
from private_predictions.protocol import FIXED_POINT
from private_predictions.relu import relu
from private_predictions.packing import words_for
from private_predictions.traffic import crossings, graphs, party
from private_predictions.truncation import truncate

SCALE, K = FIXED_POINT.scaling_factor, 42  # the network's divisor and the bound of its products
SERVERS = ("server0", "server1")
# The series' modules, and the names under which they use seeds, masks and openings.
MODULES = (masking_module, product_module, relu_module, truncation_module)


@pytest.fixture(scope="module")
def protocol(cluster):
    return connect(cluster.config)


def rebuilt(result):
    y0, y1 = result.unwrapped
    return y0.value + y1.value  # added here (outside the servers' devices): the test's own view


def the_three(protocol, values):
    """relu.py's ReLU with and without a divisor, and truncation.py's truncation, each on secrets of its own
    (``values``: a dict of three arrays), or all on the same secrets (one array)."""
    values = values if isinstance(values, dict) else dict.fromkeys(("relu / scale", "relu", "truncate"), values)
    return {"relu / scale": rebuilt(relu(protocol, shared(protocol, values["relu / scale"]), K, divisor=SCALE)),
            "relu": rebuilt(relu(protocol, shared(protocol, values["relu"]), K)),
            "truncate": rebuilt(truncate(protocol, shared(protocol, values["truncate"]), K, SCALE))}


def secrets(count, seed):
    return np.random.default_rng(seed).integers(-2**K, 2**K, count)


def words(values):
    """numpy int64 values as the unsigned 64-bit words they are on the ring."""
    return np.asarray(values, dtype=np.int64).view(np.uint64)


# --- What an opener holds ---------------------------------------------------------------------------

def _odd_inverse(value: int) -> int:
    return pow(value, -1, 2**64)


def in_span(target, vectors) -> bool:
    """Whether target = sum of a_i * vectors[i] mod 2^64 for some whole numbers a_i: exact, on the ring.

    Elimination coordinate by coordinate (a Howell form): the pivot is a generator whose entry there has the
    fewest factors 2, 2^v times an odd number; it clears that entry from the others, and 2^(64 - v) times the
    pivot, zero there, joins them.
    """
    free = [words(v).copy() for v in vectors]
    residual = words(target).copy()
    factors_of_two = lambda word: (int(word) & -int(word)).bit_length() - 1
    with np.errstate(over="ignore"):
        for i in range(len(residual)):
            free = [g for g in free if g.any()]
            if not free:
                return not residual[i:].any()
            nonzero = [j for j, g in enumerate(free) if g[i]]
            if not nonzero:
                if residual[i]:
                    return False
                continue
            chosen = min(nonzero, key=lambda j: factors_of_two(free[j][i]))
            v = factors_of_two(free[chosen][i])
            pivot = free[chosen] * np.uint64(_odd_inverse(int(free[chosen][i]) >> v))  # 2^v at i
            free = [g - np.uint64(int(g[i]) >> v) * pivot for j, g in enumerate(free) if j != chosen]
            if v:
                free.append(pivot << np.uint64(64 - v))
            if int(residual[i]) % 2**v:
                return False
            residual = residual - np.uint64(int(residual[i]) >> v) * pivot
    return not residual.any()


def test_the_span_check_finds_a_mask_counted_twice_and_misses_one_half_unknown():
    generator = np.random.default_rng(5)
    x = generator.integers(-2**K, 2**K, 200)
    r0, r1, other = (generator.integers(-2**63, 2**63, 200) for _ in range(3))
    with np.errstate(over="ignore"):
        ones = np.ones(200, np.int64)
        assert in_span(x, [x + 2**K + 2 * r0, r0, ones, other])  # c - 2^k - 2 r0
        assert in_span(x, [x + 2**K + r0 + r1, r0, r1 * 2**40, other, ones]) is False  # 2^40 r1 only
        assert in_span(x, [x + 2**K + r0 + r1, r0, ones, other]) is False
        assert in_span(x * 4, [x + r0, r0 * 4, ones]) and not in_span(x, [x * 4 + r0, r0, ones])


def views(graph, shape):
    """For each of server0 and server1: every 64-bit tensor of ``shape`` that an op of that server makes or
    uses, which is all it holds (its share, its masks, what it computes) and all it receives of that shape."""
    seen = {server: {} for server in SERVERS}
    for op in graph.get_operations():
        if party(op.device) in seen:
            for tensor in list(op.inputs) + list(op.outputs):
                if tensor.dtype == tf.int64 and tuple(tensor.shape.as_list()) == shape:
                    seen[party(op.device)][tensor.name] = tensor
    return {server: list(tensors.values()) for server, tensors in seen.items()}


def test_neither_opener_can_compute_the_secrets_or_the_results_from_all_it_holds(protocol):
    """server0 (and server1) holds its share, the masks it grows from its seeds, what server2 sends it, what it
    opens and what it computes from all that. If one half of a mask r = r0 + r1 grew from a seed that both
    servers get, c - 2^k - 2 r0 would be the secret: checked here exactly, for every combination."""
    values = {name: secrets(300, seed) for seed, name in enumerate(("relu / scale", "relu", "truncate"))}
    shape = (300,)

    @tf.function
    def compute():
        results = the_three(protocol, values)
        return results, views(tf.compat.v1.get_default_graph(), shape)

    results, held = compute()
    targets = {**{f"the secrets of {name}": secret for name, secret in values.items()},
               **{f"the result of {name}": result.numpy() for name, result in results.items()}}
    for server, tensors in held.items():
        vectors = [tensor.numpy() for tensor in tensors] + [np.ones(shape, np.int64)]  # ones: any public constant
        assert 3 * 10 < len(vectors) < shape[0] // 2, (server, len(vectors))  # far fewer unknowns than equations
        for name, target in targets.items():
            assert not in_span(target, vectors), f"{server} computes {name} from the {len(vectors)} words it holds"


# --- Seeds and openings ------------------------------------------------------------------------------

class Recorder:
    """While a computation is traced: the seeds the series' code draws (secure_random.secure_seed, as
    relu.py and truncation.py call it), every mask grown from a seed (masking.uniform, under each name the
    modules import it as), and every value opened (masking.open_masked), each with the server it is on.

    ``tensors()``, returned by the traced function, gives their values on each run."""

    def __init__(self, monkeypatch):
        self.drawn, self.grown, self.opened = [], [], []
        uniform, open_masked = masking_module.uniform, masking_module.open_masked

        def drawing(*args, **kwargs):
            seed = secure_random.secure_seed(*args, **kwargs)
            self.drawn.append((party(seed.op.device), seed))
            return seed

        def growing(shape, seed, low, high, dtype=tf.int64):
            mask = uniform(shape, seed, low, high, dtype)
            self.grown.append((party(mask.op.device), (tuple(shape), int(low), int(high), mask.dtype.name), seed))
            return mask

        def opening(protocol, share0, share1):
            value = open_masked(protocol, share0, share1)
            self.opened.append((party(value.op.device), value))
            return value

        proxy = SimpleNamespace(**{name: getattr(secure_random, name) for name in dir(secure_random)
                                   if not name.startswith("__")})
        proxy.secure_seed = drawing
        for module in MODULES:
            for name, replacement in (("secure_random", proxy), ("uniform", growing), ("_uniform", growing),
                                      ("open_masked", opening)):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, replacement)

    def tensors(self):
        return {"drawn": [seed for _, seed in self.drawn], "grown": [seed for _, _, seed in self.grown],
                "opened": [value for _, value in self.opened]}


def _describe(grown):
    places = Counter(where for where, _ in grown)
    shapes = sorted({f"{what[3]} {what[0]} in [{what[1]}, {what[2]})" for _, what in grown})
    return ", ".join(f"{count} on {where}" for where, count in sorted(places.items())) + f": {'; '.join(shapes)}"


@pytest.mark.parametrize("computation", ["relu and truncate", "network"])
def test_no_seed_is_used_twice_and_no_opened_word_comes_out_twice(protocol, monkeypatch, computation):
    """Two runs on a batch of equal secrets: 4 equal rows of 64 values through the ReLU (with and without a
    divisor) and the truncation, or 32 copies of one image through the whole network.

    A seed is drawn once; it grows one mask, on server2 and on the one server that holds that share (a seed
    server0 draws grows server0 and server1's common randomness, on those two). A mask drawn once for the
    whole batch, or once for two runs, would open equal words for equal secrets: no 64-bit word opened
    comes out twice, except that server0 and server1 each open every value."""
    closing = []
    if computation == "network":
        secure_model = share_model(load_logits_model(), protocol)  # the weights' masks are drawn here, once
        closing.append(secure_model.close)
        (_, _), (x_test, _) = load_mnist()
        images = np.repeat(x_test[:1], 32, axis=0)
        values = np.round(images * protocol.fixedpoint_config.scaling_factor).astype(np.int64)
        computed = lambda: secure_model.network(shared(protocol, values, scaled=True))
    else:
        values = np.tile(secrets(64, 1), (4, 1))
        computed = lambda: the_three(protocol, values)
    recorder = Recorder(monkeypatch)  # after the model is shared: what a query draws and opens

    @tf.function
    def compute():
        computed()
        return recorder.tensors()

    try:
        runs = [compute() for _ in range(2)]
    finally:
        for close in closing:
            close()
    drawn = Counter(seed.numpy().tobytes() for run in runs for seed in run["drawn"])
    assert len(drawn) > 10 and max(drawn.values()) == 1, "a seed was drawn twice"
    for run in runs:
        where_drawn = {seed.numpy().tobytes(): where for (where, _), seed in zip(recorder.drawn, run["drawn"])}
        uses = {}
        for (where, what, _), seed in zip(recorder.grown, run["grown"]):
            uses.setdefault(seed.numpy().tobytes(), []).append((where, what))
        for seed, grown in uses.items():
            assert seed in where_drawn, f"masks grown from a seed the code did not draw: {_describe(grown)}"
            places = Counter(where for where, _ in grown)
            expected = ({"server0", "server1"},) if where_drawn[seed] in SERVERS else \
                ({"server2", "server0"}, {"server2", "server1"})
            assert set(places) in expected and max(places.values()) == 1 and len({what for _, what in grown}) == 1, \
                f"a seed drawn on {where_drawn[seed]} grows masks {_describe(grown)}"
    opened = {}  # each distinct 64-bit value opened, and where
    for run in runs:
        for (where, _), value in zip(recorder.opened, run["opened"]):
            assert value.dtype == tf.int64, "open_masked opens 64-bit words only"
            opened.setdefault(value.numpy().tobytes(), []).append(where)
    assert all(sorted(places) == list(SERVERS) for places in opened.values()), \
        "a value opened other than once by each of server0 and server1"
    # Each run opens calls / 2 values (c in a ReLU, c in a truncation), each by both servers: 3 at least.
    calls = len(recorder.opened)
    assert len(opened) == calls >= 2 * (1 + 1 + 1), (len(opened), calls)
    words_opened = np.concatenate([np.frombuffer(value, np.uint64) for value in opened])
    assert len(np.unique(words_opened)) == len(words_opened), \
        f"{len(words_opened) - len(np.unique(words_opened))} of {len(words_opened)} words opened came out twice"


# --- What crosses between the servers ------------------------------------------------------------------

def computed_from_servers(graph) -> set:
    """The names of the ops of ``graph`` whose values are computed from a tensor made on server0 or server1
    (data, not the order that tf.function's automatic control dependencies put between stateful ops such as
    seeds). A graph lists each op after its inputs."""
    found = set()
    for op in graph.get_operations():
        if party(op.device) in SERVERS or any(t.op.name in found for t in op.inputs):
            found.add(op.name)
    return found


def expected_traffic(relus, truncations):
    """What crosses, as {(from, to, kind, dtype, elements): count}, for ReLUs given as (n values, k bits,
    with a divisor or not) and truncations given as n values. A seed is what secure_seed returns: 8 int32."""
    seed = ("seed", "int32", 8)
    sent = Counter()
    for n, k, divided in relus:
        # A ReLU that divides compares bits k ... t of k + 1 (2^t the largest power of 2 up to SCALE); else k bits.
        compared = k + 1 - (SCALE.bit_length() - 1) if divided else k
        words = words_for(compared, relu_module.prime_for(compared))  # its numbers, as bit fields
        hidden = 2 if divided else 1  # what server2 knows of what the ReLU lets through: r_q and h, or r
        sent.update({
            # server2: seeds of server0's shares of r, the bits of r, z and z times each hidden number (and r_q, h)
            ("server2", "server0") + seed: 3 + hidden + 2 * divided,
            # server2: the seed of server1's share of r; its shares of r's bits (mod p, packed) (and of r_q, h);
            # after the comparison, its shares of z and of z times each hidden number, in one tensor
            ("server2", "server1") + seed: 1, ("server2", "server1", "dealt", "int32", n * words): 1,
            ("server2", "server1", "answer", "int64", n * (1 + hidden)): 1,
            # server0 and server1: their part of the comparison's numbers (mod p, packed) to server2
            ("server0", "server2", "value", "int32", n * words): 1,
            ("server1", "server2", "value", "int32", n * words): 1,
            # server0 to server1: the seeds of their common randomness (the flip, the numbers' masks, the
            # rotation); both ways: the shares of c opened
            ("server0", "server1") + seed: 3,
            ("server0", "server1", "value", "int64", n): 1, ("server1", "server0", "value", "int64", n): 1})
        if divided:
            sent[("server2", "server1", "dealt", "int64", n)] += 2
    for n in truncations:
        sent.update({("server2", "server0") + seed: 3,  # server0's shares of r, r_q and h
                     ("server2", "server1") + seed: 1, ("server2", "server1", "dealt", "int64", n): 2,
                     ("server0", "server1", "value", "int64", n): 1, ("server1", "server0", "value", "int64", n): 1})
    return sent


def test_what_server2_sends_goes_to_one_server_only(protocol):
    """A walk of the traced graph: every tensor made on one server and used on another, with its type and size.

    server2's seeds each go to one server; the shares it deals, before the comparison and after it (its
    answer: server1's shares of z and of z times the mask's parts), go to one server, server1: server0's
    grow from seeds. Nothing server2 sends goes to both. The whole traffic is the formula's, to the tensor."""
    sizes = {"relu / scale": 50, "relu": 60, "truncate": 70}

    @tf.function
    def compute():
        return the_three(protocol, {name: secrets(n, 2) for name, n in sizes.items()})

    graph = compute.get_concrete_function().graph
    sent, answers = {}, set()  # (tensor name, destination): (source, tensor); ops computed from what servers sent
    for inner in graphs(graph):
        answers |= computed_from_servers(inner)
        for op in inner.get_operations():
            for tensor in op.inputs:
                source, destination = party(tensor.op.device), party(op.device)
                if source and destination and source != destination:
                    sent[(tensor.name, destination)] = (source, tensor)
    destinations = {}
    for (name, destination), (source, tensor) in sent.items():
        destinations.setdefault(name, set()).add(destination)
    listed = Counter()
    for (name, destination), (source, tensor) in sent.items():
        what = f"{name} ({tensor.dtype.name} {tensor.shape}) from {source} to {', '.join(sorted(destinations[name]))}"
        if tensor.op.type == "SecureSeed":
            kind = "seed"
            assert len(destinations[name]) == 1, f"one seed grows masks on two servers: {what}"
        elif source == "server2":
            kind = "answer" if tensor.op.name in answers else "dealt"
            assert len(destinations[name]) == 1, f"server2 sends the same tensor to both servers: {what}"
        else:
            kind = "value"
        listed[(source, destination, kind, tensor.dtype.name, tensor.shape.num_elements())] += 1
    expected = expected_traffic([(sizes["relu / scale"], K, True), (sizes["relu"], K, False)], [sizes["truncate"]])
    assert listed == expected, {"unexpected": listed - expected, "missing": expected - listed}
    # The same traffic in bytes, as traffic.py counts it for the published costs.
    size = {"int32": 4, "int64": 8, "uint8": 1}
    in_bytes = Counter()
    for (source, destination, _, dtype, elements), count in listed.items():
        in_bytes[(source, destination)] += count * elements * size[dtype]
    assert dict(in_bytes) == crossings(graph)


def test_every_64_bit_word_server2_sends_is_uniformly_random_whatever_the_values(protocol):
    """The 64-bit words server2 sends server1 (server1's shares of r_q and h before the comparison; after it,
    server1's shares of z and of z times the mask's parts: r, or r_q and h, or nothing for a step) are each
    the whole less server0's share, which grows from a seed of its own: uniformly random words, even when
    every value is the same, and so are the sums and differences of the rows of one answer. A mutant that
    sends z and z * r themselves (server0's shares zero) computes right and holds nothing the span check
    above can combine into a secret, yet tells server1 each value's sign: its words are 0 or 1, or 0 half
    the time. One mask used for both rows of an answer would show in their difference, z (1 - r)."""
    values = np.repeat(np.array([-5 * SCALE, 5 * SCALE]), 3000)

    receivers = set()

    @tf.function
    def compute():
        the_three(protocol, values)
        relu(protocol, shared(protocol, values), K, step=2**16)
        sent = {}
        for op in tf.compat.v1.get_default_graph().get_operations():
            for tensor in op.inputs:
                if party(tensor.op.device) == "server2" and party(op.device) in SERVERS and tensor.dtype == tf.int64:
                    sent[tensor.name] = tensor
                    receivers.add(party(op.device))
        return sent

    sent = compute()
    assert receivers == {"server1"}, receivers  # server0's shares all grow from seeds
    shapes = Counter(tuple(tensor.shape) for tensor in sent.values())
    # r_q and h of the ReLU with a divisor and of the truncation; the answers of the ReLUs with a divisor,
    # without one, and with a step
    assert shapes == {values.shape: 4, (3,) + values.shape: 1, (2,) + values.shape: 1, (1,) + values.shape: 1}, shapes

    def uniform_top_bytes(words, what):
        counts = np.bincount((words.view(np.uint64) >> np.uint64(56)).astype(np.int64), minlength=256)
        assert chi_square(counts) < 400, f"{what}: the words' top bytes are not uniform (255 degrees of freedom)"

    for name, tensor in sent.items():
        rows = tensor.numpy().reshape(-1, values.size)
        for row in rows:
            uniform_top_bytes(row, name)
        with np.errstate(over="ignore"):
            for first in range(len(rows)):
                for second in range(first + 1, len(rows)):
                    uniform_top_bytes(rows[first] - rows[second], f"{name}: the difference of rows {first}, {second}")
                    uniform_top_bytes(rows[first] + rows[second], f"{name}: the sum of rows {first}, {second}")


# --- Small random numbers, several from one draw ------------------------------------------------------

def chi_square(counts) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


# The moduli of the comparisons: the clip's 16 bits, the network's 28, a ReLU's 42 without a divisor, the whole ring.
PRIMES = [relu_module.prime_for(bits) for bits in (16, 28, 42, 63)]


@pytest.mark.parametrize("prime, base", [(p, base) for p in PRIMES for base in (p, (p - 1) * p)])
def test_small_numbers_drawn_as_digits_are_uniform_independent_and_the_same_from_the_same_seed(protocol, prime, base):
    """masking.small_uniform takes several numbers from each draw: each must be uniform in [0, base), the
    numbers of one draw independent of each other, and two servers with one seed must grow the same ones."""
    rows = 100_000

    @tf.function
    def draw():
        with tf.device(protocol.server_0.device_name):
            seed = secure_random.secure_seed()
            mine = masking_module.small_uniform((rows, 3), seed, base)
        with tf.device(protocol.server_1.device_name):
            theirs = masking_module.small_uniform((rows, 3), seed, base)
        return mine, theirs

    mine, theirs = (value.numpy() for value in draw())
    np.testing.assert_array_equal(mine, theirs)
    assert mine.min() >= 0 and mine.max() < base
    bins = prime  # numbers below (p - 1) p are counted in p bins of p - 1 numbers each
    binned = mine * bins // base
    for column in range(3):  # each uniform: a chi-square of bins - 1 degrees of freedom, within 6 of its sds
        counts = np.bincount(binned[:, column], minlength=bins)
        assert chi_square(counts) < (bins - 1) + 6 * np.sqrt(2 * (bins - 1)), column
    # Numbers 0 and 1 come from the same draw (at least 2 per draw: 3 for 930, 6 for 31): jointly uniform, so
    # independent.
    joint = np.bincount(binned[:, 0] * bins + binned[:, 1], minlength=bins * bins)
    assert chi_square(joint) < (bins * bins - 1) + 6 * np.sqrt(2 * (bins * bins - 1))
