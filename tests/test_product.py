"""The products (product.py): the weights are masked once, when the model is shared, and never opened again."""
import numpy as np
import pytest

from conftest import shared
from private_predictions import connect
from private_predictions._tf import tf
from private_predictions.protocol import FIXED_POINT
from private_predictions.serving import secret_network
from private_predictions.traffic import graphs, party
from test_masks_and_seeds import in_span
from test_network import small_model


@pytest.fixture(scope="module")
def protocol(cluster):
    return connect(cluster.config)


@pytest.fixture(scope="module")
def network(protocol):
    return secret_network(small_model(), protocol)[0]


def test_what_server0_and_server1_keep_of_the_weights_adds_up_to_them_and_neither_can_compute_them(network):
    for index, masked in network.masked.items():
        w0, w1 = network.kernel_shares(index)
        b, b0, b1, f0, f1 = (variable.numpy() for variable in
                             (masked.mask, *masked.mask_shares, *masked.opened))
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(f0, f1)  # both hold f = W - b
            np.testing.assert_array_equal(b0 + b1, b)
            np.testing.assert_array_equal(f0 + b, w0 + w1)
            weights = (w0 + w1).ravel()
            # What each holds of this layer: its share of W, its share of b, and f. The weights are not a
            # whole-number combination of them (with b = 2 b0, server0 would compute W = f + 2 b0).
            for held in ((w0, b0, f0), (w1, b1, f1)):
                vectors = [h.ravel() for h in held] + [np.ones_like(weights)]
                assert not in_span(weights, vectors), index


def test_a_query_opens_no_weights_and_server2_deals_a_pooled_product(protocol, network):
    """On a query's graph: nothing of a kernel's shape crosses between the servers (the weights were opened
    when the model was shared), and what server2 deals of a convolution followed by a pooling has the
    pooled shape."""
    images = np.random.default_rng(5).integers(0, FIXED_POINT.scaling_factor + 1, (1, 11, 11, 1))

    @tf.function
    def query():
        return network(shared(protocol, images, scaled=True)).unwrapped[0].value

    graph = query.get_concrete_function().graph
    kernels = {tuple(masked.opened[0].shape.as_list()) for masked in network.masked.values()}
    crossing = []
    for inner in graphs(graph):
        for op in inner.get_operations():
            for tensor in op.inputs:
                source, destination = party(tensor.op.device), party(op.device)
                if source and destination and source != destination and tensor.dtype == tf.int64:
                    crossing.append((source, destination, tuple(tensor.shape.as_list())))
    assert crossing and not [c for c in crossing if c[2] in kernels], [c for c in crossing if c[2] in kernels]
    dealt = {shape for source, destination, shape in crossing if (source, destination) == ("server2", "server1")}
    # The second convolution's 3 x 3 outputs (4 channels, NCHW) are pooled into 1 x 1 before server2 deals them.
    assert (1, 4, 1, 1) in dealt and (1, 4, 3, 3) not in dealt, dealt
