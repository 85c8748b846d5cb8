"""Device mesh, the logical-axis rules table, shardings of parameter / state trees, and multi-host input."""
import contextlib
import math

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fiat_jax.model import lora as lora_lib
from fiat_jax.model import transformer as model_lib

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axes. A logical axis with several rules takes the first whose mesh axes are still free in
# that array's spec (flax's resolution), so activations' "embed" stays replicated where "batch" took fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("layers", None),  # scanned layers' stacked axis (Config.scan_layers): every device holds all layers
    ("length", None),
    ("embed", "fsdp"), ("embed", None),
    ("vocab", "model"),
    ("q_heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("head_dim", None),
    ("lora_rank", None),
)


@gin.configurable
def axis_rules(rules=DEFAULT_RULES, overrides=()):
  """The rules table; `overrides` (gin) are put first, so they win."""
  return tuple(tuple(r) for r in overrides) + tuple(rules)


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'model') mesh over all devices; one size may be -1 to take what is left."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, model]
  if sizes.count(-1) > 1:
    raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} model={model}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"make_mesh: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"make_mesh: data*fsdp*model = {math.prod(sizes)} but there are {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def param_axes(cfg: model_lib.Config):
  """Logical PartitionSpecs of the base params, read from an abstract init (nothing is allocated)."""
  abstract = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  return nn.get_partition_spec(abstract)


def lora_axes(cfg: model_lib.Config):
  """Logical PartitionSpecs of the LoRA collections, derived from the params' axes."""
  to_tuple = lambda s: tuple(s)
  axes = jax.tree_util.tree_map(to_tuple, param_axes(cfg), is_leaf=lambda x: isinstance(x, PartitionSpec))
  out = lora_lib.logical_axes(cfg.lora, axes, cfg.tie_embeddings)
  return jax.tree_util.tree_map(lambda t: PartitionSpec(*t), out, is_leaf=lambda x: isinstance(x, tuple))


def to_shardings(logical_specs, mesh: Mesh, rules=None, shapes=None):
  """Logical PartitionSpecs -> NamedShardings on `mesh`. With `shapes` (a matching tree of arrays or
  ShapeDtypeStructs), a dimension that its mesh axes do not divide evenly (e.g. a vocab of 259) is replicated."""
  shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules or axis_rules())
  if shapes is None:
    return shardings

  def fit(sharding, x):
    spec = []
    for dim, axes in zip(x.shape, tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))):
      names = (axes,) if isinstance(axes, str) else (axes or ())
      spec.append(axes if dim % math.prod(mesh.shape[n] for n in names) == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*spec))
  return jax.tree_util.tree_map(fit, shardings, shapes)


def init_params_sharded(cfg: model_lib.Config, key, mesh: Mesh, rules=None):
  """Random base params created directly in their shards (jit with out_shardings after eval_shape)."""
  return jax.jit(lambda k: nn.meta.unbox(model_lib.init_params(cfg, k)),
                 out_shardings=param_shardings(cfg, mesh, rules))(key)


def param_shardings(cfg: model_lib.Config, mesh: Mesh, rules=None):
  """NamedShardings of the base params tree."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  return to_shardings(param_axes(cfg), mesh, rules, shapes)


def lora_shardings(cfg: model_lib.Config, mesh: Mesh, rules=None):
  """NamedShardings of the LoRA collections."""
  shapes = jax.eval_shape(lambda: lora_lib.init(cfg.lora, model_lib.init_params(cfg, jax.random.PRNGKey(0)),
                                                jax.random.PRNGKey(0), cfg.tie_embeddings))
  return to_shardings(lora_axes(cfg), mesh, rules, shapes)


def init_lora_sharded(cfg: model_lib.Config, params, key, mesh: Mesh, rules=None):
  """LoRA collections for `params`, created directly in their shards."""
  return jax.jit(lambda p, k: lora_lib.init(cfg.lora, p, k, cfg.tie_embeddings),
                 out_shardings=lora_shardings(cfg, mesh, rules))(params, key)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=None):
  """Inside: the model's logical activation constraints resolve against `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules or axis_rules()):
    yield


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=None) -> NamedSharding:
  """Sharding of [B, ...] input arrays: batch over (data, fsdp), the rest replicated."""
  return to_shardings(PartitionSpec("batch", *([None] * (ndim - 1))), mesh, rules)


def global_batch(local_batch: dict, mesh: Mesh, rules=None) -> dict:
  """Per-host numpy arrays [B_local, ...] -> global jax.Arrays sharded over the batch axes (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), rules), np.asarray(v))
          for k, v in local_batch.items()}
