"""The `fiat` modes and their flags, in one light module: `fiat --help` and `fiat MODE --help` answer from here
before JAX or TensorFlow is imported, and each mode parses its arguments with the same parser."""
import argparse
import dataclasses
import os
import re
import sys
import tempfile
from typing import Callable

from fiat_jax.data import readers  # light: the data sets and splits, no TensorFlow until a file is read


class UsageError(ValueError):
  """A mistake the user can fix (a flag, a gin file or binding, a path): `fiat` prints it as one line, exit 2."""


@dataclasses.dataclass(frozen=True)
class Mode:
  target: str  # "module:function"; the function takes argv (without the mode) and returns an exit code
  distributed: bool  # joins a multi-process run (jax.distributed) before the mode starts
  summary: str
  example: str
  flags: Callable[[argparse.ArgumentParser], None] | None = None
  gin: bool = True  # takes --gin_file / --gin.NAME=VALUE


def _rationales(ap):
  ap.add_argument('--status', action='store_true', help='print done / failed / pending per split and language, '
                  'ask nothing')
  ap.add_argument('--repair', action='store_true', help="move the store's corrupt lines to <shard>.corrupt first, "
                  'and ask β again for their examples')


def _train(ap):
  ap.add_argument('--allow_changed_settings', action='store_true',
                  help="resume although settings differ from the run's train_config.json; the change is recorded in "
                       'settings_history.jsonl')


def _evaluate(ap):
  ap.add_argument('--reliance', action='store_true',
                  help='also with empty and with shuffled rationales (how much τ uses β)')


def _serve(ap):
  ap.add_argument('--tiny', action='store_true', help='serve a random tiny model (tests, demo)')
  ap.add_argument('--tiny_seed', type=int, default=0)
  ap.add_argument('--host', default='127.0.0.1', help='bind address; 127.0.0.1 unless told otherwise')
  ap.add_argument('--port', type=int, default=8000, help='0 picks a free port (see --port_file)')
  ap.add_argument('--port_file', help='write the bound port here once listening')
  ap.add_argument('--model_name', help="the name clients must ask for (default: beta's identity)")
  ap.add_argument('--request_log', default='fiat_serve_requests.jsonl')
  ap.add_argument('--api_key_env', help='name of an environment variable holding the key clients must send')
  ap.add_argument('--max_batch', type=int, default=16)
  ap.add_argument('--batch_wait_ms', type=float, default=5.0, help='least time a batch waits for more prompts')
  ap.add_argument('--batch_wait_fraction', type=float, default=0.1,
                  help="a batch waits up to this fraction of the last batch's decoding time for more prompts")
  ap.add_argument('--max_new_tokens', type=int, default=256, help='when a request gives no max_tokens (256)')
  ap.add_argument('--max_tokens_limit', type=int, default=4096,
                  help='largest max_tokens a request may ask for; more is a 400 (4096)')
  ap.add_argument('--max_n', type=int, default=16, help='largest n (samples per prompt); more is a 400 (16)')
  ap.add_argument('--max_prompts', type=int, default=64,
                  help='most prompts in one /v1/completions request; more is a 400 (64)')
  ap.add_argument('--max_body_bytes', type=int, default=4 << 20,
                  help='largest request body; a larger Content-Length is a 413, answered unread (4 MiB)')
  ap.add_argument('--read_timeout_s', type=float, default=30.0,
                  help='time to receive a whole request, headers and body, however slowly it trickles in; then a '
                       '408 and the connection is closed; also closes idle keep-alive connections (30)')
  ap.add_argument('--max_connections', type=int, default=64,
                  help='open connections served at once (one thread each); more are answered 503 (64)')
  ap.add_argument('--inject_faults', default='', help='TEST ONLY: e.g. 429=0.1,500=0.1,malformed=0.05,stall=0.05')
  ap.add_argument('--fault_seed', type=int, default=0)
  ap.add_argument('--fault_retry_after_s', type=float, default=1.0)
  ap.add_argument('--fault_stall_s', type=float, default=30.0)


def _score(ap):
  ap.add_argument('--task', required=True, choices=readers.DATASETS)
  ap.add_argument('--gold', required=True, help='a released gold JSONL file, or the extracted release folder')
  ap.add_argument('--predictions', required=True, help='JSONL, one {"prediction": ...} a line')
  ap.add_argument('--split', default='test', choices=readers.SPLITS,
                  help='with a release folder as --gold')
  ap.add_argument('--languages', default=None, help='comma-separated, with a release folder')
  ap.add_argument('--seed', type=int, default=0, help='bootstrap seed')
  ap.add_argument('--bootstrap', type=int, default=1000, help='bootstrap resamples')


def _report(ap):
  ap.add_argument('--runs_dir', required=True, help='the RUNS_DIR of the runs (RUNS_DIR/<setting>/<name>/)')
  ap.add_argument('--out_dir', default=None, help='default: RUNS_DIR/report')


def _plan(ap):
  ap.add_argument('--mesh', help="the planned mesh, e.g. data=1,fsdp=16,model=1 (default: plan.num_devices and "
                  "make_mesh's bindings, else this machine's devices)")
  ap.add_argument('--device', help='v4 | v5e | v5p | v6e | h100 (default: plan.device)')
  ap.add_argument('--no_compile', action='store_true',
                  help="stored trees only: skip compiling the steps for XLA's activation memory (minutes on CPU for "
                       "a multi-billion-parameter model)")
  ap.add_argument('--json', default=None, help='also write the plan as JSON to this file')


_RUN = '--gin_file=runs/xtreme_up_indic/xs_fiat.gin --gin_file=beta/http.gin --gin.DATA_DIR="\'/data/xtreme_up\'" ...'
MODES = {
    'rationales': Mode('fiat_jax.beta.rationales:main', True,
                       "β writes a rationale for every example of the run's data set into the resumable store "
                       '(Algorithm 1, step 1)', f'fiat rationales {_RUN}', _rationales),
    'icl': Mode('fiat_jax.beta.rationales:icl_main', True,
                'the few-shot in-context-learning baseline: β answers alone',
                'fiat icl --gin_file=runs/xtreme_up_indic/icl.gin --gin_file=beta/http.gin ...'),
    'serve': Mode('fiat_jax.beta.serve:main', True, 'serves a local β checkpoint over an OpenAI-compatible HTTP API',
                  'fiat serve --gin_file=models/gemma-2-27b-it.gin --gin_file=beta/local.gin '
                  '--gin.BETA_CHECKPOINT="\'/ckpt/gemma-2-27b-it\'" --port=8000', _serve),
    'score': Mode('fiat_jax.data.scoring:main', False, 'scores a predictions file against a released gold file '
                  '(F1 / EM or accuracy / AUC-PR, per language, bootstrap intervals)',
                  'fiat score --task=xtreme_up_xqa --gold=/data/xtreme_up --predictions=answers.jsonl', _score,
                  gin=False),
    'train': Mode('fiat_jax.tuning:train_main', True,
                  "Algorithm 1: β's rationales, I_τ formatting, LoRA tuning of τ, checkpoint selection on "
                  'validation, test scores', f'fiat train {_RUN}', _train),
    'evaluate': Mode('fiat_jax.evaluation:evaluate_main', True, 'scores a trained run again on a split (with '
                     '--reliance: also with empty and shuffled rationales)', f'fiat evaluate {_RUN} --reliance',
                     _evaluate),
    'infer': Mode('fiat_jax.inference:main', True,
                  'Algorithm 2: β reasons and the tuned τ answers, for a JSONL of new inputs',
                  f'fiat infer {_RUN} --gin.infer.input_file="\'in.jsonl\'" '
                  '--gin.infer.output_file="\'out.jsonl\'"'),
    'report': Mode('fiat_jax.report:main', False, "the paper's Tables 2 and 3 and its figures from a runs directory",
                   'fiat report --runs_dir=/runs', _report, gin=False),
    'plan': Mode('fiat_jax.training.plan:main', False,
                 "memory per device of a model's training and decoding on a mesh: does the run fit",
                 'fiat plan --gin_file=models/gemma-2-2b-it.gin --mesh=data=1,fsdp=8,model=1', _plan),
}
DISTRIBUTED_FLAGS = {  # popped by fiat_jax.training.distributed before the mode parses (names: distributed.FLAGS)
    'coordinator_address': 'host:port of process 0 (default: FIAT_COORDINATOR_ADDRESS, a Cloud TPU VM\'s '
                           'metadata, or a single process)',
    'num_processes': 'processes in the run', 'process_id': "this process's index",
    'local_device_ids': 'comma-separated devices this process uses', 'distributed': 'auto | on | off'}
GLOBAL_FLAGS = {'debug': 'show the traceback of an error', 'verbose': 'keep the start-up notices of TensorFlow, '
                'XLA and JAX (backends tried, CUDA drivers looked for)'}
GIN_HELP = """gin:
  --gin_file=FILE             repeatable; a path, else relative to the packaged gin_configs/ (models/, runs/,
                              beta/, recipes/, datasets/, sizes/, tiny.gin, demo.gin); later files override earlier
  --gin.NAME=VALUE            a binding, applied after the files; a string is quoted for gin inside the shell's
                              quotes: --gin.DATA_DIR="'/data/x'"  --gin.TrainConfig.num_steps=500"""


class _Parser(argparse.ArgumentParser):
  """argparse whose mistakes are a UsageError (one line from `fiat`), not usage text and exit."""

  def error(self, message):
    raise UsageError(f'{message} (`{self.prog} --help` lists the flags)')


def parser(mode: str) -> argparse.ArgumentParser:
  """The parser of `fiat MODE` (or of `python -m fiat_jax.<module>` for a name not in MODES: gin flags only)."""
  mode = mode.removeprefix('fiat ')
  spec = MODES.get(mode)
  prog = f'fiat {mode}' if spec else mode
  epilog = [GIN_HELP] if spec is None or spec.gin else []
  if spec:
    if spec.distributed:
      epilog.append('multi-process (a pod slice, several GPU hosts; see launch/):\n' + '\n'.join(
          f'  {"--" + name + "=VALUE":<28}{text}' for name, text in DISTRIBUTED_FLAGS.items()))
    epilog.append('other:\n' + '\n'.join(f'  {"--" + name:<28}{text}' for name, text in GLOBAL_FLAGS.items()))
    epilog.append(f'example:\n  {spec.example}')
  ap = _Parser(prog=prog, description=spec.summary if spec else None, epilog='\n\n'.join(epilog),
               formatter_class=argparse.RawDescriptionHelpFormatter)
  if spec is None or spec.gin:
    ap.add_argument('--gin_file', action='append', default=[], metavar='FILE', help='repeatable (see gin: below)')
  if spec and spec.flags:
    spec.flags(ap)
  return ap


def overview() -> str:
  """`fiat --help`: every mode in one line."""
  width = max(map(len, MODES)) + 2
  lines = ['usage: fiat MODE [flags]   (fiat MODE --help: the mode\'s flags and an example)', '',
           'FIAT: a big frozen LLM (β) reasons, a LoRA-tuned moderate LLM (τ) answers.', '', 'modes:']
  lines += [f'  {name.ljust(width)}{spec.summary}' for name, spec in MODES.items()]
  lines += ['', 'Also: python -m fiat_jax.sweep (a table\'s rows in order), python -m fiat_jax.demo (the miniature '
            'world end to end).']
  return '\n'.join(lines)


def run_guarded(prog: str, fn: Callable[[list[str]], int], argv: list[str]) -> int:
  """fn(argv) after --debug / --verbose are taken out of argv and TensorFlow is imported quietly; a UsageError or
  a DataError (a release missing or malformed, named by file, line and field) is one line on stderr and exit code 2
  (with --debug, its traceback)."""
  debug = '--debug' in argv
  if '--verbose' in argv:
    os.environ['FIAT_VERBOSE'] = '1'
  argv = [a for a in argv if a not in ('--debug', '--verbose')]
  if not verbose():
    import_tensorflow_quietly()
  try:
    return fn(argv)
  except (UsageError, readers.DataError) as e:  # a flag, a path, the data: the user's to fix
    if debug:
      raise
    lines = [line for line in str(e).splitlines() if not line.startswith('  In call to configurable')]  # gin's
    print(f'{prog}: error: ' + '\n'.join(lines), file=sys.stderr)
    return 2


def verbose() -> bool:
  """--verbose (or FIAT_VERBOSE=1 in the environment, which the processes a launcher starts inherit)."""
  return os.environ.get('FIAT_VERBOSE', '') not in ('', '0')


# TensorFlow's and XLA's native start-up notices: C++ logs written before absl::InitializeLog, which no environment
# variable silences (TF_CPP_MIN_LOG_LEVEL does not reach them). On a CPU machine they read as failures.
_NOTICES = re.compile(r'All log messages before absl::InitializeLog|oneDNN custom operations are on|Could not find '
                      r'cuda drivers|failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory|cpu_feature_guard'
                      r'|TensorFlow binary is optimized|rebuild TensorFlow with the appropriate compiler flags'
                      r'|computation placer already registered')


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow (the data pipeline's) with its native notices filtered from stderr, and keeps it off the
  GPUs: JAX owns the accelerator, and TF would otherwise reserve its memory. Anything else TF writes is kept."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], 'GPU')  # initialises TF's devices here, under the filter (cuInit)
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode('utf-8', errors='replace').splitlines(keepends=True)
      sys.stderr.write(''.join(line for line in lines if not _NOTICES.search(line)))
