"""The divergence guard on its own: non-finite loss, gradient norm or weights, and a step that blows the
weights up while staying finite, each stop with one message naming the phase, step, value and setting."""

import math

import jax.numpy as jnp
import pytest

from mtjax.divergence import ABSURD_NORM_FACTOR, DivergenceError, DivergenceGuard, all_finite, global_norm

PARAMS = {"w": jnp.full((4, 4), 0.5), "step": jnp.asarray(3)}  # integer leaves are not weights


def guard():
    g = DivergenceGuard("iter_1/e_step", "dpo.learning_rate", float("inf"))
    g.start(PARAMS)
    return g


def test_a_healthy_step_passes():
    assert global_norm(PARAMS) == pytest.approx(2.0)
    guard().check(1, 4, {"loss": 0.69, "grad_norm": 1.0}, {**PARAMS, "w": PARAMS["w"] * 1.001}, 0)


@pytest.mark.parametrize("row, scale, problem", [
    ({"loss": math.nan, "grad_norm": 1.0}, 1.0, "the loss is nan"),
    ({"loss": 0.5, "grad_norm": math.inf}, 1.0, "the grad norm is inf"),
    ({"loss": 0.5, "grad_norm": 1.0}, math.nan, "the weights are no longer finite"),
    ({"loss": 0.5, "grad_norm": 1.0}, 1e6, "one step scaled the norm of the weights by 1e+06"),
    ({"loss": 0.5, "grad_norm": 1.0}, 1e-3, "one step scaled the norm of the weights by 0.001"),
])
def test_a_diverged_step_stops_with_one_message(row, scale, problem):
    with pytest.raises(DivergenceError) as caught:
        guard().check(2, 4, row, {**PARAMS, "w": PARAMS["w"] * scale}, resumes_from=1)
    message = str(caught.value)
    assert message.startswith(f"iter_1/e_step: training diverged at step 2 of 4: {problem}")
    assert "Lower dpo.learning_rate (now inf) and rerun the same command" in message
    assert message.endswith("resumes from its last good state (step 1).") and "\n" not in message


def test_the_limit_leaves_room_for_healthy_steps():
    g = guard()
    g.check(1, 9, {"loss": 0.5}, {**PARAMS, "w": PARAMS["w"] * (ABSURD_NORM_FACTOR * 0.99)}, 0)
    assert all_finite(PARAMS) and not all_finite({"w": jnp.asarray([jnp.inf])})
