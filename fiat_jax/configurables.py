"""Every module that registers gin configurables, imported in one place before any `fiat` mode parses gin files.

A gin file may name any of them (`@vocab.vocabulary()`, `Experiment`, `HttpBeta`, `local_beta`, ...), whichever
mode reads it: serving β, writing rationales, training τ or planning memory.
"""
# pylint: disable=unused-import
from fiat_jax.beta import backends  # HttpBeta, Budget, local_beta, tiny_local_beta, beta_sampling
from fiat_jax.beta import rationales as beta_run  # rationales, icl_baseline
from fiat_jax.beta import serve  # serve
from fiat_jax.data import pipeline  # TaskData
from fiat_jax import evaluation  # evaluate_run
from fiat_jax import experiment  # Experiment, Recipe, Beta, tau_model, vocabularies
from fiat_jax import inference  # infer
from fiat_jax.model import hf  # model_config
from fiat_jax.model import lora  # LoraConfig
from fiat_jax.model import sharding  # make_mesh, logical_axis_rules
from fiat_jax.model import vocab  # vocabulary (a checkpoint's tokenizer.json or tokenizer.model)
from fiat_jax.training import optim  # OptimConfig
from fiat_jax.training import plan  # plan
from fiat_jax.training import train  # TrainConfig
from fiat_jax import tuning  # build
