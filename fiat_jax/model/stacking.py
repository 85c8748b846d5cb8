"""The two layouts of a model's per-layer trees: unrolled (`layer_0`, `layer_1`, ...) and scanned (one `layers`
subtree whose arrays carry the layer as their first axis, logical axis "layers").

Checkpoint formats (Hugging Face, PEFT) and the LoRA variants' per-matrix math speak the unrolled layout; the model
with `Config.scan_layers` stores the scanned one. These two functions convert any tree (params, LoRA collections,
their gradients or logical axes) between them, at whatever depth the layer keys sit.
"""
import jax
import numpy as np

SCANNED = "layers"
AXIS = "layers"  # the logical axis name of the stacked dimension


def _layer_keys(node: dict) -> list[str]:
  return sorted((k for k in node if k.startswith("layer_")), key=lambda k: int(k.removeprefix("layer_")))


def is_scanned(tree) -> bool:
  """Whether a tree (or any dict inside it) holds the scanned `layers` subtree."""
  if not isinstance(tree, dict):
    return False
  return SCANNED in tree or any(is_scanned(v) for v in tree.values())


def stack(tree, axes: bool = False):
  """layer_0..layer_{N-1} -> layers (arrays stacked on a new first axis; with `axes`, tuples of logical axis names
  get "layers" prepended instead)."""
  if not isinstance(tree, dict):
    return tree
  keys = _layer_keys(tree)
  out = {k: stack(v, axes) for k, v in tree.items() if k not in keys}
  if keys:
    if axes:
      out[SCANNED] = jax.tree_util.tree_map(lambda a: (AXIS, *a), tree[keys[0]],
                                            is_leaf=lambda x: isinstance(x, tuple))
    else:
      out[SCANNED] = jax.tree_util.tree_map(lambda *xs: _stack_arrays(xs), *[tree[k] for k in keys])
  return out


def unstack(tree, axes: bool = False):
  """layers -> layer_0..layer_{N-1} (slices of the first axis; with `axes`, the leading "layers" name dropped)."""
  if not isinstance(tree, dict):
    return tree
  out = {k: unstack(v, axes) for k, v in tree.items() if k != SCANNED}
  if SCANNED in tree:
    sub = tree[SCANNED]
    if axes:
      out["layer_0"] = jax.tree_util.tree_map(lambda a: tuple(a)[1:], sub, is_leaf=lambda x: isinstance(x, tuple))
      return out  # the caller expands one layer's axes to every layer (they are the same)
    n = jax.tree_util.tree_leaves(sub)[0].shape[0]
    for i in range(n):
      out[f"layer_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], sub)
  return out


def _stack_arrays(xs):
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  return jax.numpy.stack(xs)
