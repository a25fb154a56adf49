"""No value inside the network can leave the fixed-point encoding's range, for any image in [0, 1]."""
from types import SimpleNamespace

import numpy as np
import pytest

from private_predictions import load_logits_model, load_mnist, share_model
from private_predictions._tf import tf
from private_predictions.protocol import FIXED_POINT, VALUE_LIMIT
from private_predictions.paths import MODEL_PATH
from private_predictions.value_range import (MAX_SCALE_DOWN, UnsupportedModelError, ValueRangeError, bounds, check_fits,
                                             fitting, kernel_and_bias, scaled_down, servers_factors)

LIMIT = VALUE_LIMIT


@pytest.fixture(scope="module")
def model():
    return load_logits_model()


def largest_values(model, images):
    """Each layer's largest magnitude on ``images`` as the servers hold it, computed in the open."""
    outputs = tf.keras.Model(model.inputs, [layer.output for layer in model.layers])(images)
    return [factor * float(np.abs(output).max()) for output, factor in zip(outputs, servers_factors(model))]


def test_the_bound_holds_for_real_random_and_extreme_images(model):
    (_, _), (x_test, _) = load_mnist()
    generator = np.random.default_rng(0)
    images = np.concatenate([x_test[:500], generator.random((200, 28, 28, 1)),
                             generator.integers(0, 2, (200, 28, 28, 1)), np.zeros((1, 28, 28, 1)),
                             np.ones((1, 28, 28, 1))]).astype(np.float32)
    proven = [bound for _, bound in bounds(model)]
    for seen, bound in zip(largest_values(model, images), proven):
        assert seen <= bound * (1 + 1e-6)


def test_the_servers_sum_where_keras_averages_until_the_next_weighted_layer(model):
    kinds = [type(layer).__name__ for layer in model.layers]
    factors = servers_factors(model)
    for kind, factor, before in zip(kinds, factors, [1.0] + factors[:-1]):
        if kind in ("Conv2D", "Dense"):
            assert factor == 1.0
        elif kind == "AveragePooling2D":
            assert factor == 4.0 * before
        else:
            assert factor == before
    assert max(factors) == 4.0  # every pooling layer of this model is followed by a convolution or dense layer


def test_the_committed_model_fits_the_encoding(model):
    computed, divisor, _ = fitting(model, LIMIT)
    assert max(bound for _, bound in bounds(computed)) < LIMIT and divisor <= MAX_SCALE_DOWN


def test_a_model_slightly_too_large_is_computed_at_a_smaller_scale_with_the_same_answers(model):
    larger = tf.keras.Sequential.from_config(model.get_config())
    weights = model.get_weights()
    weights[-2] = weights[-2] * (1.6 * LIMIT / max(bound for _, bound in bounds(model)))  # the last kernel
    larger.set_weights(weights)
    computed, divisor, peak = fitting(larger, LIMIT)
    assert peak >= LIMIT and divisor >= 2
    assert max(bound for _, bound in bounds(computed)) < LIMIT
    (_, _), (x_test, _) = load_mnist()
    np.testing.assert_allclose(computed(x_test[:8]).numpy() * divisor, larger(x_test[:8]).numpy(), rtol=1e-4, atol=1e-4)


def test_a_layer_without_bias_is_bounded_and_scaled_down_too():
    model = tf.keras.Sequential([tf.keras.layers.Conv2D(3, 3, use_bias=False, input_shape=(6, 6, 1)),
                                 tf.keras.layers.Flatten(), tf.keras.layers.Dense(2)])
    model.set_weights([np.full((3, 3, 1, 3), 4.0), np.ones((48, 2)), np.zeros(2)])  # logits up to 48 * 36
    computed, divisor, peak = fitting(model, LIMIT)
    assert 48 * 36 <= peak == pytest.approx(48 * 36, rel=1e-4) and divisor == 3  # with the rounding margins
    images = np.random.default_rng(5).random((3, 6, 6, 1))
    np.testing.assert_allclose(computed(images).numpy() * divisor, model(images).numpy(), rtol=1e-5)


def test_a_model_that_could_overflow_is_refused_before_anything_is_shared(model):
    scaled = tf.keras.Sequential.from_config(model.get_config())
    scaled.set_weights([weights * 3 for weights in model.get_weights()])
    # Nothing is shared, so no servers are needed: the check comes first.
    with pytest.raises(ValueRangeError, match=r"values up to \d+ .*below 729"):
        share_model(scaled, SimpleNamespace(fixedpoint_config=FIXED_POINT))


def test_the_scale_of_the_proof_is_the_encodings():
    from private_predictions.value_range import SCALE
    assert SCALE == FIXED_POINT.scaling_factor


def fused_relu_model(weight):
    """Flatten -> Dense(1, relu) on 28 x 28 images: pre-activation values down to 784 * weight."""
    model = tf.keras.Sequential([tf.keras.layers.Flatten(input_shape=(28, 28, 1)),
                                 tf.keras.layers.Dense(1, activation="relu")])
    model.set_weights([np.full((784, 1), weight), np.zeros(1)])
    return model


def largest_before_relu(model, images):
    """The largest magnitude before the model's fused ReLUs, in Keras: each such layer without its ReLU."""
    inputs = [images] + tf.keras.Model(model.inputs, [layer.output for layer in model.layers])(images)
    largest = 0.0
    for layer, layer_inputs in zip(model.layers, inputs):
        if layer.get_config().get("activation") == "relu" and type(layer).__name__ != "Activation":
            linear = type(layer).from_config({**layer.get_config(), "activation": "linear"})
            linear.build(layer.input_shape)
            linear.set_weights(layer.get_weights())
            largest = max(largest, float(np.abs(linear(layer_inputs)).max()))
    return largest


def extreme_images(shape, count=20):
    generator = np.random.default_rng(1)
    return np.concatenate([np.zeros((1,) + shape), np.ones((1,) + shape), generator.random((count,) + shape),
                           generator.integers(0, 2, (count,) + shape)]).astype(np.float32)


def test_a_fused_relu_is_bounded_before_it_and_refused_when_that_is_far_too_large():
    model = fused_relu_model(-10.0)
    before = largest_before_relu(model, extreme_images((28, 28, 1)))
    assert before == pytest.approx(7840)  # the all-ones image
    assert bounds(model)[-1][1] >= before
    with pytest.raises(ValueRangeError, match=r"values up to 7840 .*below 729"):
        fitting(model, LIMIT)


def test_a_fused_relu_too_large_only_before_it_is_scaled_down_not_accepted():
    model = tf.keras.Sequential([tf.keras.layers.Conv2D(1, 3, activation="relu", input_shape=(6, 6, 1)),
                                 tf.keras.layers.Flatten(), tf.keras.layers.Dense(1)])
    model.set_weights([np.full((3, 3, 1, 1), -100.0), np.zeros(1), np.ones((16, 1)), np.full(1, 0.5)])
    # After the ReLU every value is 0 (and the logit 0.5); before it they reach -900, above the limit.
    assert largest_before_relu(model, extreme_images((6, 6, 1))) == pytest.approx(900)
    computed, divisor, peak = fitting(model, LIMIT)
    assert peak >= 900 and divisor == 2
    assert max(bound for _, bound in bounds(computed)) < LIMIT
    images = extreme_images((6, 6, 1))
    np.testing.assert_allclose(computed(images).numpy() * divisor, model(images).numpy(), rtol=1e-6)


def servers_largest_values(model, images, generator):
    """Each layer's largest magnitude as the servers compute it (network.py), in whole numbers: inputs
    round(x * scale), weights round(w / area * scale), biases round(b * scale^2), each truncation
    floor(x / scale) plus 0 or 1 (random here); a ReLU that truncates lets a product in (-2^15, 0)
    through or not (random here, relu.py); a fused ReLU's layer counts its values before the ReLU too."""
    scale = FIXED_POINT.scaling_factor
    x, doubled, seen = np.round(images * scale).astype(np.int64), False, []
    areas = [1.0] + servers_factors(model)[:-1]

    def truncate(values):
        return values // scale + generator.integers(0, 2, values.shape)

    for layer, area in zip(model.layers, areas):
        kind, before_relu = type(layer).__name__, 0.0
        if kind in ("Conv2D", "Dense"):
            x = truncate(x) if doubled else x
            kernel, bias = kernel_and_bias(layer)
            kernel = np.round(kernel / area * scale).astype(np.int64)
            bias = np.round(bias * float(scale) ** 2).astype(np.int64)
            if kind == "Conv2D":  # valid padding, strides 1
                windows = np.lib.stride_tricks.sliding_window_view(x, kernel.shape[:2], axis=(1, 2))
                x = np.einsum("nhwcij,ijco->nhwo", windows, kernel)
            else:
                x = x @ kernel
            x, doubled = x + bias, True
            before_relu = np.abs(x).max() / scale ** 2
        elif kind == "AveragePooling2D":
            (height, width), (n, h, w, c) = layer.pool_size, x.shape
            x = x[:, :h // height * height, :w // width * width].reshape(
                n, h // height, height, w // width, width, c).sum(axis=(2, 4))
        elif kind == "Flatten":
            x = x.reshape(len(x), -1)
        if layer.get_config().get("activation") == "relu":
            through = (x >= 0) | ((x > -2**15) & (generator.integers(0, 2, x.shape) == 0)) if doubled else x >= 0
            x, doubled = np.where(through, truncate(x) if doubled else x, 0), False
        seen.append(max(before_relu, np.abs(x).max() / (scale ** 2 if doubled else scale)))
    if doubled:
        seen[-1] = max(seen[-1], np.abs(truncate(x)).max() / scale)
    return seen


def test_the_bound_holds_for_the_servers_rounded_weights_and_truncations():
    scale = FIXED_POINT.scaling_factor
    tf.keras.utils.set_random_seed(7)
    model = tf.keras.Sequential([
        tf.keras.layers.Conv2D(3, 3, activation="relu", input_shape=(8, 8, 1)),
        tf.keras.layers.AveragePooling2D(2),
        tf.keras.layers.Conv2D(4, 2),
        tf.keras.layers.Activation("relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(3),
    ])
    # Every weight 0.7 of a unit above a whole number of units, as the servers hold it (the second
    # convolution's divided by the pooling's area): each is rounded up by 0.3 of a unit. The first
    # convolution's are positive, so the all-ones image reaches its largest values.
    kernels = [np.abs(model.layers[0].get_weights()[0]), model.layers[2].get_weights()[0],
               model.layers[5].get_weights()[0]]
    areas = [1.0, 4.0, 1.0]
    kernels = [(np.floor(k / area * scale) + 0.7) / scale * area for k, area in zip(kernels, areas)]
    model.set_weights([kernels[0], np.full(3, 0.1), kernels[1], np.full(4, -0.1), kernels[2], np.zeros(3)])
    generator = np.random.default_rng(8)
    images = extreme_images((8, 8, 1), count=100)
    proven = [bound for _, bound in bounds(model)]
    for _ in range(5):
        for seen, bound in zip(servers_largest_values(model, images, generator), proven):
            assert seen <= bound
    # A margin, not a loose bound: the first convolution's largest value (all-ones image) is reached to
    # within its nine weights' half units and one truncation's unit.
    assert proven[0] - servers_largest_values(model, images, generator)[0] < 6 / scale


def test_the_bound_holds_when_a_relu_lets_values_just_below_zero_through():
    # Every product of the first layer is its bias, a little below 0: the servers' ReLU may let it through
    # as -1 unit (relu.py). Many such units, each times -1, add up in the next layer.
    scale = FIXED_POINT.scaling_factor
    model = tf.keras.Sequential([
        tf.keras.layers.Conv2D(8, 3, activation="relu", input_shape=(8, 8, 1)),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(2),
    ])
    model.set_weights([np.zeros((3, 3, 1, 8)), np.full(8, -0.1 / scale), np.full((288, 2), -1.0), np.zeros(2)])
    # The worst case: every such product let through, every truncation rounded down. Black images only, so
    # that the proof's margins for the first layer's rounded weights are not larger than the effect.
    worst = SimpleNamespace(integers=lambda low, high, shape: np.zeros(shape, np.int64))
    proven = [bound for _, bound in bounds(model, low=0.0, high=0.0)]
    seen = servers_largest_values(model, np.zeros((1, 8, 8, 1)), worst)
    assert seen[-1] == 288 / scale  # 288 units of -1, each times -1
    assert all(value <= bound for value, bound in zip(seen, proven))


def sequential(*layers):
    return lambda: tf.keras.Sequential(list(layers))


REFUSED = {
    "dilation_rate 2": (sequential(tf.keras.layers.Conv2D(2, 3, dilation_rate=2, name="dilated", input_shape=(8, 8, 1)),
                                   tf.keras.layers.Flatten(), tf.keras.layers.Dense(2)),
                        r"dilated \(Conv2D\) has dilation_rate \(2, 2\).*dilation_rate=1"),
    "groups 2": (sequential(tf.keras.layers.Conv2D(4, 3, groups=2, name="grouped", input_shape=(8, 8, 2)),
                            tf.keras.layers.Flatten(), tf.keras.layers.Dense(2)),
                 r"grouped \(Conv2D\) has groups=2.*groups=1"),
    "channels first": (sequential(tf.keras.layers.Conv2D(2, 3, data_format="channels_first", name="first",
                                                         input_shape=(1, 8, 8)),
                                  tf.keras.layers.Flatten(), tf.keras.layers.Dense(2)),
                       r"first \(Conv2D\) has data_format 'channels_first'.*data_format='channels_last'"),
    "dense on images": (sequential(tf.keras.layers.Conv2D(2, 3, input_shape=(8, 8, 1)),
                                   tf.keras.layers.Dense(3, name="on_images"),
                                   tf.keras.layers.Flatten(), tf.keras.layers.Dense(2)),
                        r"on_images \(Dense\) gets 4-D inputs.*Flatten layer before it"),
    "ends in pooling": (sequential(tf.keras.layers.Conv2D(2, 3, input_shape=(8, 8, 1)),
                                   tf.keras.layers.AveragePooling2D(2, name="last_pool")),
                        r"last_pool \(AveragePooling2D\) comes after .*4 times .*End the model with a Dense"),
    "pooling, then flatten": (sequential(tf.keras.layers.Conv2D(2, 3, input_shape=(8, 8, 1)),
                                         tf.keras.layers.AveragePooling2D(2, name="pool"), tf.keras.layers.Flatten()),
                              r"pool \(AveragePooling2D\) comes after .*End the model with a Dense"),
    "ends in a convolution": (sequential(tf.keras.layers.Conv2D(2, 3, name="last_conv", input_shape=(8, 8, 1))),
                              r"last_conv \(Conv2D\) gives the model's output the shape .*Flatten and Dense"),
    "max pooling": (sequential(tf.keras.layers.Conv2D(2, 3, input_shape=(8, 8, 1)),
                               tf.keras.layers.MaxPooling2D(2, name="max_pool"),
                               tf.keras.layers.Flatten(), tf.keras.layers.Dense(2)),
                    r"max_pool \(MaxPooling2D\) is not a layer the servers can compute\. The servers compute "
                    r"Conv2D and Dense .*AveragePooling2D, Flatten and Activation.*Use AveragePooling2D instead"),
    "overlapping pooling": (sequential(tf.keras.layers.Conv2D(2, 3, input_shape=(8, 8, 1)),
                                       tf.keras.layers.AveragePooling2D(3, strides=1, name="overlapping"),
                                       tf.keras.layers.Flatten(), tf.keras.layers.Dense(2)),
                            r"overlapping \(AveragePooling2D\) .*non-overlapping windows.*default strides"),
    "padded pooling": (sequential(tf.keras.layers.Conv2D(2, 2, input_shape=(8, 8, 1)),
                                  tf.keras.layers.AveragePooling2D(2, padding="same", name="padded"),
                                  tf.keras.layers.Flatten(), tf.keras.layers.Dense(2)),
                       r"padded \(AveragePooling2D\) .*padding 'same'.*non-overlapping windows.*default strides"),
    "softmax": (sequential(tf.keras.layers.Flatten(input_shape=(8, 8, 1)),
                           tf.keras.layers.Dense(2, activation="softmax", name="probabilities")),
                r"probabilities \(Dense\) has activation 'softmax'.*Use 'linear' on the last layer"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_the_servers_do_not_compute_is_refused_before_anything_is_shared(case):
    build, message = REFUSED[case]
    model = build()

    def share(*args, **kwargs):
        raise AssertionError("a weight was shared")

    with pytest.raises(UnsupportedModelError, match=message):
        share_model(model, SimpleNamespace(fixedpoint_config=FIXED_POINT, define_private_variable=share))


# Models that the servers would compute differently from Keras, although their layers' list bounds -----------
# The servers apply model.layers one after the other, each once, and recognise layers and activations by name
# (network.py): the proof walks the same list, so it must refuse whatever Keras computes otherwise.

def relu(x):
    """Not Keras's ReLU, but Keras serialises it as 'relu', the name network.py reads."""
    return 50 * tf.nn.relu(x)


class Doubling(tf.keras.layers.Layer):
    def call(self, inputs):
        return 2 * inputs


class LoudDense(tf.keras.layers.Dense):
    def call(self, inputs):
        return 2 * super().call(inputs)


class TwoDense(tf.keras.Model):
    def __init__(self):
        super().__init__()
        self.flatten, self.dense = tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)

    def call(self, inputs):
        return self.dense(self.flatten(inputs)) * 2


def images_input(name=None):
    return tf.keras.Input((28, 28, 1), name=name)


def dense_applied_twice():
    """The reviewer's first model: Keras applies `twice` twice, the servers once (their answers differed by 0.76)."""
    images = images_input()
    twice = tf.keras.layers.Dense(10, name="twice")
    return tf.keras.Model(images, twice(twice(tf.keras.layers.Dense(10)(tf.keras.layers.Flatten()(images)))))


def dense_twice_in_a_sequential():
    twice = tf.keras.layers.Dense(10, name="twice")
    return tf.keras.Sequential([tf.keras.layers.Flatten(input_shape=(28, 28, 1)), tf.keras.layers.Dense(10), twice, twice])


def custom_relu():
    """The reviewer's second model: Keras computes 50 ReLU(x), the servers ReLU(x) (answers 72.7 apart)."""
    return tf.keras.Sequential([tf.keras.layers.Flatten(input_shape=(28, 28, 1)),
                                tf.keras.layers.Dense(10, activation=relu, name="custom")])


def relu_registered_as_relu():
    with tf.keras.utils.custom_object_scope({"relu": relu}):
        return tf.keras.Sequential([tf.keras.layers.Conv2D(2, 3, input_shape=(28, 28, 1)),
                                    tf.keras.layers.Activation("relu", name="registered"),
                                    tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)])


def skip_connection():
    images = images_input()
    pixels = tf.keras.layers.Flatten()(images)
    added = tf.keras.layers.Add(name="skip")([pixels, tf.keras.layers.Dense(784)(pixels)])
    return tf.keras.Model(images, tf.keras.layers.Dense(10)(added))


def two_outputs():
    images = images_input()
    pixels = tf.keras.layers.Flatten()(images)
    return tf.keras.Model(images, [tf.keras.layers.Dense(10, name="head_a")(pixels),
                                   tf.keras.layers.Dense(10, name="head_b")(pixels)])


def two_inputs():
    left, right = images_input("left"), images_input("right")
    added = tf.keras.layers.Add()([tf.keras.layers.Flatten()(left), tf.keras.layers.Flatten()(right)])
    return tf.keras.Model([left, right], tf.keras.layers.Dense(10)(added))


def a_tensorflow_operation():
    images = images_input()
    return tf.keras.Model(images, tf.keras.layers.Dense(10)(tf.keras.layers.Flatten()(images) * 50))


NOT_AS_KERAS = {
    "a dense layer applied twice": (dense_applied_twice, r"Layer twice \(Dense\) is applied 2 times, but the servers "
                                    r"apply each layer once.*a layer of its own"),
    "a dense layer twice in a sequential": (dense_twice_in_a_sequential,
                                            r"Layer twice \(Dense\) is applied 2 times.*a layer of its own"),
    "a custom function named relu": (custom_relu, r"Layer custom \(Dense\) has an activation named 'relu' that is not "
                                     r"Keras's own \(.*test_value_range\.relu\).*Use activation='relu'"),
    "a custom function registered as relu": (relu_registered_as_relu, r"Layer registered \(Activation\) has an "
                                             r"activation named 'relu' that is not Keras's own.*activation='relu'"),
    "tf.nn.relu": (sequential(tf.keras.layers.Flatten(input_shape=(28, 28, 1)), tf.keras.layers.Dense(10),
                              tf.keras.layers.Activation(tf.nn.relu, name="tensorflows"), tf.keras.layers.Dense(10)),
                   r"Layer tensorflows \(Activation\) has activation tf.nn.relu.*Use activation='relu'"),
    "a lambda layer": (sequential(tf.keras.layers.Flatten(input_shape=(28, 28, 1)),
                                  tf.keras.layers.Lambda(lambda x: 50 * x, name="scale"), tf.keras.layers.Dense(10)),
                       r"Layer scale \(Lambda\) runs a Python function, which the servers cannot compute.*"
                       r"The servers compute Conv2D and Dense"),
    "a custom layer": (sequential(tf.keras.layers.Flatten(input_shape=(28, 28, 1)), Doubling(name="doubling"),
                                  tf.keras.layers.Dense(10)),
                       r"Layer doubling \(Doubling\) is not a layer the servers can compute.*The servers compute Conv2D"),
    "a subclass of Dense": (sequential(tf.keras.layers.Flatten(input_shape=(28, 28, 1)), LoudDense(10, name="loud")),
                            r"Layer loud \(LoudDense\) is a subclass of tf\.keras\.layers\.Dense.*"
                            r"Use tf\.keras\.layers\.Dense itself"),
    "a tensorflow operation": (a_tensorflow_operation, r"\(TFOpLambda\) is not a layer the servers can compute"),
    "a skip connection": (skip_connection, r"Layer skip \(Add\) takes 2 inputs \(a branch or a skip connection .*"
                                           r"single chain of layers"),
    "two outputs": (two_outputs, r"The model has 1 input\(s\) \(.*\) and 2 output\(s\) \(head_a, head_b\).*one input "
                                 r"and one output"),
    "two inputs": (two_inputs, r"The model has 2 input\(s\) \(left, right\) and 1 output\(s\).*one input and one output"),
    "a model inside the model": (sequential(tf.keras.Sequential([tf.keras.layers.Flatten(input_shape=(28, 28, 1))],
                                                                name="inner"), tf.keras.layers.Dense(10)),
                                 r"Layer inner \(Sequential\) is a model inside the model.*inner\.layers"),
    "a subclassed model": (TwoDense, r"The model is a TwoDense, a subclass of tf\.keras\.Model.*would not run its own "
                                     r"code.*tf\.keras\.Sequential"),
    "a model not built": (sequential(tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)),
                          r"model sequential.* has not been built.*input_shape=\(height, width, channels\)"),
}


@pytest.mark.parametrize("case", NOT_AS_KERAS)
def test_what_keras_computes_otherwise_than_the_servers_is_refused_before_anything_is_shared(case):
    build, message = NOT_AS_KERAS[case]
    model = build()

    def share(*args, **kwargs):
        raise AssertionError("a weight was shared")

    for prove in (lambda: fitting(model, LIMIT), lambda: check_fits(model, LIMIT),
                  lambda: share_model(model, SimpleNamespace(fixedpoint_config=FIXED_POINT, define_private_variable=share))):
        with pytest.raises(UnsupportedModelError, match=message):
            prove()


def test_keras_own_activations_are_accepted_however_they_are_named():
    model = tf.keras.Sequential([
        tf.keras.layers.Conv2D(2, 3, activation="relu", input_shape=(8, 8, 1)),
        tf.keras.layers.Conv2D(2, 3, activation=tf.keras.activations.relu),
        tf.keras.layers.Conv2D(2, 3, activation=None), tf.keras.layers.Activation("relu"),
        tf.keras.layers.Activation(tf.keras.activations.relu), tf.keras.layers.Activation("linear"),
        tf.keras.layers.Flatten(), tf.keras.layers.Dense(3, activation="linear"), tf.keras.layers.Dense(2)])
    check_fits(model, LIMIT)


def test_the_committed_model_has_keras_own_activations_when_loaded_from_its_file():
    # Only its last layer's softmax is refused; load_logits_model turns it into 'linear'.
    with pytest.raises(UnsupportedModelError, match=r"Layer dense \(Dense\) has activation 'softmax'"):
        bounds(tf.keras.models.load_model(MODEL_PATH))


def a_chain(functional):
    layers = [tf.keras.layers.Conv2D(2, 3, activation="relu", name="conv"), tf.keras.layers.AveragePooling2D(2),
              tf.keras.layers.Flatten(), tf.keras.layers.Dense(3)]
    if not functional:
        return tf.keras.Sequential([tf.keras.Input((8, 8, 1))] + layers)
    x = images = tf.keras.Input((8, 8, 1))
    for layer in layers:
        x = layer(x)
    return tf.keras.Model(images, x)


def test_a_functional_chain_is_bounded_as_the_same_sequential_model():
    tf.keras.utils.set_random_seed(3)
    sequential_model, functional_model = a_chain(False), a_chain(True)
    functional_model.set_weights(sequential_model.get_weights())
    assert [bound for _, bound in bounds(functional_model)][1:] == [bound for _, bound in bounds(sequential_model)]
    images = extreme_images((8, 8, 1))
    computed, divisor, _ = fitting(functional_model, 0.5 * max(bound for _, bound in bounds(functional_model)))
    np.testing.assert_allclose(computed(images).numpy() * divisor, functional_model(images).numpy(), rtol=1e-5, atol=1e-6)


def test_layers_of_another_model_are_applied_once_in_this_one(model):
    # Each of these layers has two inbound nodes, the committed model's and this model's: this one applies it once.
    again = tf.keras.Sequential([tf.keras.Input((28, 28, 1))] + model.layers)
    assert all(len(layer.inbound_nodes) == 2 for layer in again.layers)
    assert bounds(again) == bounds(model)


def test_the_committed_model_is_still_scaled_down_and_fitted(model):
    (_, _), (x_test, _) = load_mnist()
    peak = max(bound for _, bound in bounds(model))
    halved = scaled_down(model, 2)
    np.testing.assert_allclose(halved(x_test[:8]).numpy() * 2, model(x_test[:8]).numpy(), rtol=1e-4, atol=1e-4)
    computed, divisor, found = fitting(model, 0.6 * peak)
    assert found == peak and divisor == 2 and max(bound for _, bound in bounds(computed)) < 0.6 * peak
    np.testing.assert_allclose(computed(x_test[:8]).numpy() * 2, model(x_test[:8]).numpy(), rtol=1e-4, atol=1e-4)
