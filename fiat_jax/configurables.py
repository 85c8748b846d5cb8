"""Every module that registers gin configurables, imported in one place before any `fiat` mode parses gin files.

A gin file may name any of them (`@vocab.vocabulary()`, `Experiment`, `HttpBeta`, `local_beta`, ...), whichever
mode reads it: serving β, writing rationales, training τ or planning memory.
"""
# pylint: disable=unused-import
from fiat_jax import data  # TaskData
from fiat_jax import evaluation  # evaluate_run
from fiat_jax import experiment  # Experiment, Recipe, Beta, tau_model, vocabularies
from fiat_jax import hf  # model_config
from fiat_jax import infer  # infer
from fiat_jax import lora  # LoraConfig
from fiat_jax import optim  # OptimConfig
from fiat_jax import plan  # plan
from fiat_jax import run  # build
from fiat_jax import sharding  # make_mesh, logical_axis_rules
from fiat_jax import train  # TrainConfig
from fiat_jax import vocab  # vocabulary (a checkpoint's tokenizer.json or tokenizer.model)
from fiat_jax.beta import backends  # HttpBeta, Budget, local_beta, tiny_local_beta, beta_sampling
from fiat_jax.beta import run as beta_run  # rationales, icl_baseline
from fiat_jax.beta import serve  # serve
