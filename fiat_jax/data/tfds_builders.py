"""tensorflow-datasets builders for XOR-AttriQA (in-language) and XTREME-UP v1.1 cross-lingual QA.

Both download the real release; for offline machines put the archive (or its
extracted folder) in the manual directory:
  tfds build xor_attriqa --imports=fiat_jax.data.tfds_builders --manual_dir=DIR
(or in Python, download_and_prepare(download_config=DownloadConfig(manual_dir=DIR))).
"""
import json
import os
from typing import Iterable, Optional

import numpy as np
import tensorflow_datasets as tfds

from fiat_jax.data import readers

_CITATIONS = {
    'xor_attriqa': """@article{muller2023evaluating,
  title={Evaluating and Modeling Attribution for Cross-Lingual Question Answering},
  author={Muller, Benjamin and Wieting, John and Clark, Jonathan H and Kwiatkowski, Tom and
          Ruder, Sebastian and Soares, Livio Baldini and Aharoni, Roee and Herzig, Jonathan and
          Wang, Xinyi},
  journal={arXiv preprint arXiv:2305.14332}, year={2023}}""",
    'xtreme_up_xqa': """@article{ruder2023xtremeup,
  title={XTREME-UP: A User-Centric Scarce-Data Benchmark for Under-Represented Languages},
  author={Ruder, Sebastian and Clark, Jonathan H and Gutkin, Alexander and others},
  journal={arXiv preprint arXiv:2305.11938}, year={2023}}""",
}


def _release_dir(dl_manager, archive_name: str, url: str) -> str:
  """The manual copy (archive or extracted folder) if there is one, else a download."""
  try:
    manual = dl_manager.manual_dir
  except AssertionError:  # No manual dir configured, or it is empty.
    return os.fspath(dl_manager.download_and_extract(url))
  if (manual / archive_name).exists():
    return os.fspath(dl_manager.extract(manual / archive_name))
  return os.fspath(manual)


class _ReleaseBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared by both builders: examples are readers' canonical dicts, raw fields as JSON."""

  DATASET = ''
  TEXT_FIELDS = ()

  def _generate_examples(self, release_dir: str, split: str):
    for path, lang in readers.split_files(self.DATASET, release_dir, split):
      for i, ex in enumerate(readers.read_file(self.DATASET, path, lang)):
        record = {k: ex[k] for k in self.TEXT_FIELDS}
        record['raw'] = json.dumps(ex['raw'], ensure_ascii=False, sort_keys=True)
        if 'label' in ex:
          record['label'] = ex['label']
        yield f'{os.path.basename(path)}:{i}', record


class XorAttriqa(_ReleaseBuilder):
  """XOR-AttriQA, in-language setting: is the answer attributable to the passage."""

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download {readers.XOR_ATTRIQA_URL} and place xor_attriqa.zip (or its extracted '
      'folder, holding in-language/) in the manual directory.')
  DATASET = 'xor_attriqa'
  TEXT_FIELDS = ('id', 'language', 'question', 'answer', 'passage')

  def _info(self):
    features = {k: tfds.features.Text() for k in self.TEXT_FIELDS + ('raw',)}
    features['label'] = tfds.features.Scalar(dtype=np.bool_)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        homepage='https://github.com/google-research/google-research/tree/master/xor_attriqa',
        citation=_CITATIONS['xor_attriqa'],
        disable_shuffling=True)  # Keep the release's order (gold order for scoring).

  def _split_generators(self, dl_manager):
    root = _release_dir(dl_manager, 'xor_attriqa.zip', readers.XOR_ATTRIQA_URL)
    return {s: self._generate_examples(root, s) for s in readers.SPLITS}


class XtremeUpXqa(_ReleaseBuilder):
  """XTREME-UP v1.1 cross-lingual QA: English answer span or `No Answer`."""

  VERSION = tfds.core.Version('1.1.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download {readers.XTREME_UP_URL} and place xtreme-up-v1.1.jsonl.tgz (or its extracted '
      'folder, holding qa_cross_lang/) in the manual directory.')
  DATASET = 'xtreme_up_xqa'
  TEXT_FIELDS = ('id', 'language', 'question', 'title', 'context', 'target')

  def _info(self):
    features = {k: tfds.features.Text() for k in self.TEXT_FIELDS + ('raw',)}
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        homepage='https://github.com/google-research/xtreme-up',
        citation=_CITATIONS['xtreme_up_xqa'],
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    root = _release_dir(dl_manager, 'xtreme-up-v1.1.jsonl.tgz', readers.XTREME_UP_URL)
    return {s: self._generate_examples(root, s) for s in readers.SPLITS}


BUILDERS = {'xor_attriqa': XorAttriqa, 'xtreme_up_xqa': XtremeUpXqa}


def read_split_tfds(dataset: str, tfds_data_dir: str, split: str,
                    languages: Optional[Iterable[str]] = None) -> list[dict]:
  """Canonical examples of one split from a prepared TFDS copy (same dicts as read_split)."""
  builder = BUILDERS[dataset](data_dir=tfds_data_dir)
  if not builder.is_prepared():
    raise readers.DataError(f'{tfds_data_dir}: {dataset} is not prepared; run '
                            f'`tfds build {dataset} --imports=fiat_jax.data.tfds_builders '
                            f'--data_dir={tfds_data_dir}` first')
  keep = set(languages) if languages is not None else None
  examples = []
  for row in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    ex = {k: (v.decode('utf-8') if isinstance(v, bytes) else v) for k, v in row.items()}
    ex['raw'] = json.loads(ex['raw'])
    if 'label' in ex:
      ex['label'] = bool(ex['label'])
    if keep is None or ex['language'] in keep:
      examples.append(ex)
  if not examples:
    raise readers.DataError(f'{tfds_data_dir}: {dataset} split {split!r} has no examples')
  readers.check_ids(examples, f'{tfds_data_dir} {dataset} {split}')
  readers.log_counts(dataset, split, examples)
  return examples
