"""Loss functions: pure, jax-only. Shapes: logits and labels [batch, classes] -> [batch]."""
import jax.numpy as jnp
import optax


def softmax_xent(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Cross-entropy with (soft) label distributions. -> [batch]."""
  return optax.softmax_cross_entropy(logits, labels)


def sigmoid_xent(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Independent binary cross-entropy per class, summed over classes (big_vision). -> [batch]."""
  return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)


CLASSIFICATION_LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}


def classification_loss(name: str, label_smoothing: float = 0.0):
  """Returns `loss(logits, labels) -> [batch]` for `config.loss`, with optional smoothing."""
  if name not in CLASSIFICATION_LOSSES:
    raise ValueError(f"config.loss={name!r}: expected one of {sorted(CLASSIFICATION_LOSSES)}.")
  fn = CLASSIFICATION_LOSSES[name]
  if not label_smoothing:
    return fn
  return lambda logits, labels: fn(logits, optax.smooth_labels(labels, label_smoothing))
