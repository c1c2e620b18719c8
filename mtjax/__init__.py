"""mtjax: Mutual-Taught (co-adapting a policy and its reward model) in JAX/Flax."""

__version__ = "0.1.0"
