"""The notebook's training objective and its error count, for one head or three."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def as_heads(outputs) -> tuple[jax.Array, ...]:
    """Model outputs as a tuple of logit arrays (one for most variants, three for multihead)."""
    return outputs if isinstance(outputs, tuple) else (outputs,)


def cross_entropy(outputs, labels: jax.Array) -> jax.Array:
    """torch.nn.CrossEntropyLoss (mean over the batch); for three heads, the mean of the three."""
    losses = [
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        for logits in as_heads(outputs)
    ]
    return sum(losses) / len(losses)


def correct_count(outputs, labels: jax.Array) -> jax.Array:
    """Correctly classified samples; for three heads the mean of the heads' counts (notebook)."""
    counts = [(jnp.argmax(logits, axis=-1) == labels).sum() for logits in as_heads(outputs)]
    return sum(counts) / len(counts)
