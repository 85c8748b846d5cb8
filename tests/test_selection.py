"""The trainer returns the checkpoint selected on validation, not the last one: what `fiat train` saves and what
`fiat evaluate` / `fiat infer` later load."""
import jax
import numpy as np

from fiat_jax.model import lora as lora_lib
from fiat_jax.model import transformer as model_lib
from fiat_jax.training import optim
from fiat_jax.training import train
from test_train import one_device, params_of, step_batches, VOCAB


def test_the_best_validation_step_is_returned(tmp_path):
  cfg = model_lib.tiny_config(vocab_size=VOCAB, lora=lora_lib.LoraConfig(rank=4, alpha=8.0))
  seen = {}
  scores = {1: 0.2, 2: 0.9, 3: 0.5}  # step 2 is the best; step 3 is the last

  def evaluate(step, variables):
    seen[step] = jax.device_get(variables['lora'])
    return {'f1': scores[step]}

  tcfg = train.TrainConfig(num_steps=3, batch_size=8, eval_every=1, save_every=1, best_metric='eval/f1',
                           best_mode='max', tensorboard=False, optim=optim.OptimConfig(learning_rate=1e-2))
  res = train.train(tcfg, cfg, params_of(cfg), step_batches(), 'random', str(tmp_path), evaluate=evaluate,
                    mesh=one_device())
  assert (res.step, res.selected_step, res.best['step']) == (3, 2, 2)
  got = jax.tree_util.tree_leaves(jax.device_get(res.trainable['lora']))
  for want_step, equal in ((2, True), (3, False)):
    want = jax.tree_util.tree_leaves(seen[want_step])
    same = all(np.array_equal(a, b) for a, b in zip(got, want))
    assert same == equal, want_step
