"""A product of a shared input with a layer's shared weights, with the weights masked once per model.

Beaver's product (notebook 01): to multiply a secret x by the secret weights W, server0 and server1
open x - a and W - b for masks a and b that server2 dealt, and server2 deals shares of a*b. tf-encrypted
opens W - b in every query, for a fresh b each time: for the last convolution's 18,432 weights that is
most of a query's traffic at batch 1. The weights are the same in every query, so here they are masked
once, when the model is shared:

* server2 draws b, uniformly random, and keeps it; server0 and server1 each grow a share of it from a
  seed that server2 sends to that server only;
* server0 and server1 open f = W - b once, and keep it. f is uniformly random to them (b is, to within
  2^-64: masking.py), and server2 never sees it.

In every query server2 deals a fresh mask a for the input (shares grown from seeds) and one server's share
of a*b (the other's grows from a seed); server0 and server1 open e = x - a, uniformly random to them, and
each computes its share of x*W = e*f + e*b + a*f + a*b. Reusing b is safe because b masks the same W
each time: f says nothing new after its first opening; each query's a, and so e, is fresh, and server1's
share of a*b is masked by a fresh seed that only server0 and server2 hold. (A new sharing of the weights
draws a new b: one b never masks two different W.)

A sum pooling after the product, being linear, is done on each server's share before server2's share of
a*b is added, and server2 pools a*b before dealing it: a quarter of the words or fewer, for 2 x 2 windows.
"""
from tf_encrypted.operations import secure_random
from tf_encrypted.protocol.pond.pond import PondPrivateTensor

from ._tf import tf
from .dealing import dealing_only, material
from .masking import WORDS, open_masked, uniform


class MaskedWeights:
    """One layer's weights W as the products use them: b on server2, a share of b on server0 and on
    server1, and f = W - b on both (opened once, here)."""

    def __init__(self, protocol, weights):
        shares = [share.value for share in weights.read_value().unwrapped]
        shape = tuple(shares[0].shape.as_list())
        servers = (protocol.server_0.device_name, protocol.server_1.device_name)
        with tf.device(protocol.server_2.device_name):
            seeds = [secure_random.secure_seed(), secure_random.secure_seed()]
            self.mask = tf.Variable(uniform(shape, seeds[0], *WORDS) + uniform(shape, seeds[1], *WORDS),
                                    trainable=False, name="weights-mask")
        self.mask_shares, masked = [], []
        for i, device in enumerate(servers):
            with tf.device(device):
                self.mask_shares.append(tf.Variable(uniform(shape, seeds[i], *WORDS), trainable=False,
                                                    name="weights-mask-share"))
                masked.append(shares[i] - self.mask_shares[i])
        self.opened = []
        for device in servers:
            with tf.device(device):
                self.opened.append(tf.Variable(open_masked(protocol, *masked), trainable=False,
                                               name="masked-weights"))


def product(protocol, x: PondPrivateTensor, weights: MaskedWeights, bias, apply, then=lambda value: value):
    """Shares of then(apply(x, W) + bias), for a linear ``apply`` (a convolution or a matrix product, on
    tf-encrypted's tensors) and a linear ``then`` on each server's words (a sum pooling, or nothing)."""
    factory = protocol.tensor_factory
    shape = tuple(x.shape.as_list())
    servers = (protocol.server_0.device_name, protocol.server_1.device_name)
    with tf.name_scope("masked-product"):
        def deal():
            """server2's a and a*b, as shares: server0's grow from seeds, server1's share of a*b is sent."""
            with tf.device(protocol.server_2.device_name):
                seeds = [{"a": secure_random.secure_seed(), "ab": secure_random.secure_seed()},
                         {"a": secure_random.secure_seed()}]
                a = uniform(shape, seeds[0]["a"], *WORDS) + uniform(shape, seeds[1]["a"], *WORDS)
                ab = then(apply(factory.tensor(a), factory.tensor(weights.mask.read_value())).value)
                out_shape = tuple(ab.shape.as_list())
                ab1 = ab - uniform(out_shape, seeds[0]["ab"], *WORDS)
            kept = []
            for i, device in enumerate(servers):
                with tf.device(device):
                    kept.append({"a": uniform(shape, seeds[i]["a"], *WORDS),
                                 "ab": uniform(out_shape, seeds[0]["ab"], *WORDS) if i == 0 else tf.identity(ab1)})
            return kept
        dealt = material(deal)
        if dealing_only():  # a value of the output's shape
            return PondPrivateTensor(protocol, *(factory.tensor(held["ab"]) for held in dealt), x.is_scaled)
        masked = []
        for i, device in enumerate(servers):
            with tf.device(device):
                masked.append(x.unwrapped[i].value - dealt[i]["a"])
        out = []
        for i, (device, bias_share) in enumerate(zip(servers, bias.unwrapped)):
            with tf.device(device):
                e = factory.tensor(open_masked(protocol, *masked))
                f = weights.opened[i].read_value()
                b = weights.mask_shares[i].read_value()
                # e*f + e*b + a*f (+ a*b): server0 adds e*f, each server its own shares' terms.
                terms = apply(e, factory.tensor(f + b if i == 0 else b)) + apply(factory.tensor(dealt[i]["a"]), factory.tensor(f))
                out.append(factory.tensor(then((terms + bias_share).value) + dealt[i]["ab"]))
    return PondPrivateTensor(protocol, out[0], out[1], x.is_scaled)
