"""No value inside the network can leave the fixed-point encoding's range, for any image in [0, 1]."""
from types import SimpleNamespace

import numpy as np
import pytest

from private_predictions import load_logits_model, load_mnist, share_model
from private_predictions._tf import tf
from private_predictions.protocol import FIXED_POINT
from private_predictions.value_range import MAX_SCALE_DOWN, ValueRangeError, bounds, fitting, servers_factors

LIMIT = FIXED_POINT.scaling_base ** FIXED_POINT.precision_integral


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
    assert peak == pytest.approx(48 * 36) and divisor == 3
    images = np.random.default_rng(5).random((3, 6, 6, 1))
    np.testing.assert_allclose(computed(images).numpy() * divisor, model(images).numpy(), rtol=1e-5)


def test_a_model_that_could_overflow_is_refused_before_anything_is_shared(model):
    scaled = tf.keras.Sequential.from_config(model.get_config())
    scaled.set_weights([weights * 3 for weights in model.get_weights()])
    # Nothing is shared, so no servers are needed: the check comes first.
    with pytest.raises(ValueRangeError, match=r"values up to \d+ .*below 729"):
        share_model(scaled, SimpleNamespace(fixedpoint_config=FIXED_POINT))
