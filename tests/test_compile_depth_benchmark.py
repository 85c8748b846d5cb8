"""benchmarks/compile_depth.py --smoke: both layouts of the LoRA step lower, compile and run on the CPU, agree on
the first loss, and the JSON's ratio is the quotient of the totals it reports; the script loads neither seqio nor
TensorFlow."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'compile_depth.py')


def test_smoke_compiles_both_layouts_with_equal_first_losses(tmp_path):
  out = tmp_path / 'compile_depth.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # conftest's fake devices are not the benchmark's setting
  proc = subprocess.run([sys.executable, SCRIPT, '--smoke', '--hlo_counts', '--json', str(out)], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(out.read_text())
  assert result['forbidden_modules'] == []
  summary, runs = result['summary'], result['runs']
  for name in ('scanned', 'unrolled'):
    run, = runs[name]
    assert 0 < run['lower_s'] < run['total_s'] and run['compile_s'] > 0, name
    assert math.isclose(run['total_s'], run['lower_s'] + run['compile_s'], rel_tol=1e-9), name
    assert run['temp_bytes'] >= 0 and run['hlo']['instructions'] > 0, name
  assert summary['ratio'] > 0 and summary['target'] == 1 / 3
  assert math.isclose(summary['ratio'], runs['scanned'][0]['total_s'] / runs['unrolled'][0]['total_s'])
  assert summary['met'] == (summary['ratio'] <= 1 / 3)
  # The same weights in both layouts (float32): the first losses agree to rounding.
  assert abs(runs['scanned'][0]['first_loss'] - runs['unrolled'][0]['first_loss']) < 1e-5
  # One traced block: the scanned module holds fewer instructions than the three unrolled layers.
  assert runs['scanned'][0]['hlo']['instructions'] < runs['unrolled'][0]['hlo']['instructions']
  for line in ('| scanned |', '| unrolled |', 'scanned / unrolled total:', 'first loss:'):
    assert line in proc.stdout, line
