"""Tokenizers of Hugging Face checkpoints as seqio Vocabularies (tokenizer.json through the `tokenizers` library,
tokenizer.model through seqio's SentencePieceVocabulary), and chat templates rendered as transformers renders them."""
import datetime
import functools
import hashlib
import json
import os

import gin
import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils
import numpy as np
import seqio
import tensorflow as tf
import tokenizers

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: str, required: bool = False) -> dict:
  if not os.path.exists(path):
    if required:
      raise FileNotFoundError(f"{path}: not found")
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def special_tokens(tokenizer_dir: str) -> dict[str, str]:
  """bos_token, eos_token, ... (strings) as transformers reads them: tokenizer_config.json, overridden by the legacy
  special_tokens_map.json when the config has no `added_tokens_decoder`."""
  cfg = _read_json(os.path.join(tokenizer_dir, "tokenizer_config.json"))
  found = {k: cfg[k] for k in SPECIAL_TOKEN_NAMES if cfg.get(k)}
  if "added_tokens_decoder" not in cfg:
    legacy = _read_json(os.path.join(tokenizer_dir, "special_tokens_map.json"))
    found.update({k: v for k, v in legacy.items() if k in SPECIAL_TOKEN_NAMES and v})
  return {k: v["content"] if isinstance(v, dict) else str(v) for k, v in found.items()}


class HfTokenizerVocabulary(seqio.Vocabulary):
  """A tokenizer.json (Hugging Face `tokenizers`) as a seqio Vocabulary: encode adds no special tokens (chat
  templates write them as text), decode skips them by default, like SentencePiece's control symbols."""

  def __init__(self, tokenizer_dir: str, skip_special_tokens: bool = True):
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: not found")
    with open(path, "rb") as f:
      self._digest = hashlib.sha256(f.read()).hexdigest()
    self._dir, self._skip = tokenizer_dir, skip_special_tokens
    self._tok = tokenizers.Tokenizer.from_file(path)
    cfg = _read_json(os.path.join(tokenizer_dir, "tokenizer_config.json"))
    # transformers skips this WordPiece-era clean-up for BPE models unless told to corrupt the output anyway.
    is_bpe = type(self._tok.model).__name__ == "BPE"
    self._cleanup = bool(cfg.get("clean_up_tokenization_spaces", False)) and (
        not is_bpe or bool(cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
    self._special = {k: self._tok.token_to_id(v) for k, v in special_tokens(tokenizer_dir).items()}
    super().__init__(extra_ids=0)

  def __getstate__(self):
    return {"tokenizer_dir": self._dir, "skip_special_tokens": self._skip}

  def __setstate__(self, state):
    self.__init__(state["tokenizer_dir"], state["skip_special_tokens"])

  def __eq__(self, other):
    return isinstance(other, HfTokenizerVocabulary) and (self._digest, self._skip) == (other._digest, other._skip)

  def __hash__(self):
    return hash((self._digest, self._skip))

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    return self._tok

  @property
  def bos_id(self):
    return self._special.get("bos_token")

  @property
  def eos_id(self):
    return self._special.get("eos_token")

  @property
  def unk_id(self):
    return self._special.get("unk_token")

  @property
  def pad_id(self) -> int:
    """The tokenizer's pad token; else EOS (Llama 3 has no pad token); else 0."""
    for name in ("pad_token", "eos_token"):
      if self._special.get(name) is not None:
        return self._special[name]
    return 0

  @property
  def _base_vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> list[int]:
    return self._tok.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    text = self._tok.decode([int(i) for i in ids], skip_special_tokens=self._skip)
    if self._cleanup:
      for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                   (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Scalar string -> int32 [n]; rank-1 strings -> int32 RaggedTensor [batch, None]."""
    def encode_all(x):
      rows = [self._encode(t.decode("utf-8")) for t in np.reshape(x, -1)]
      return (np.asarray([i for r in rows for i in r], np.int32), np.asarray([len(r) for r in rows], np.int64))
    values, lengths = tf.numpy_function(encode_all, [s], [tf.int32, tf.int64], stateful=False)
    values.set_shape([None])
    if s.shape.rank == 0:
      return values
    if s.shape.rank == 1:
      return tf.RaggedTensor.from_row_lengths(values, tf.reshape(lengths, [-1]))
    raise ValueError(f"HfTokenizerVocabulary.encode_tf: strings of rank {s.shape.rank}; give a scalar or a vector")

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int [n] -> scalar string; int [batch, n] -> strings [batch] (each up to and including its first EOS)."""
    def upto_eos(row):
      row = [int(i) for i in row]
      return row[:row.index(self.eos_id) + 1] if self.eos_id in row else row

    def decode_all(x):
      if x.ndim == 1:
        return np.asarray(self._decode(upto_eos(x)).encode("utf-8"), dtype=object)
      return np.asarray([self._decode(upto_eos(r)).encode("utf-8") for r in x], dtype=object)
    out = tf.numpy_function(decode_all, [ids], tf.string, stateful=False)
    out.set_shape(ids.shape[:-1])
    return out


@gin.configurable
def vocabulary(tokenizer_dir: str, skip_special_tokens: bool = True) -> seqio.Vocabulary:
  """The checkpoint's tokenizer: tokenizer.json if present, else tokenizer.model (SentencePiece)."""
  if not tokenizer_dir:
    raise ValueError("vocab.vocabulary.tokenizer_dir is not set: bind the checkpoint macro (BETA_CHECKPOINT or "
                     "TAU_CHECKPOINT) of the gin_configs/models/ file")
  if os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
    return HfTokenizerVocabulary(tokenizer_dir, skip_special_tokens)
  spm = os.path.join(tokenizer_dir, "tokenizer.model")
  if os.path.exists(spm):
    return seqio.SentencePieceVocabulary(spm)
  raise FileNotFoundError(f"{tokenizer_dir}: neither tokenizer.json nor tokenizer.model")


# ---- chat templates ------------------------------------------------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


class _Namespace(jinja2.utils.Namespace):
  """jinja's namespace without underscore attributes (no reach into Python internals from a Hub template)."""

  def __init__(*args, **kwargs):  # jinja's own signature trick, so `namespace(self=...)` works
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"chat template: namespace attribute {name!r} is not allowed")


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  """The environment transformers renders chat templates in: sandboxed, trim_blocks + lstrip_blocks, loop
  controls, a non-escaping `tojson`, `raise_exception`, `strftime_now`."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
  env.globals.update(raise_exception=_raise, namespace=_Namespace, dict=dict,
                     strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  return env.from_string(template)


def chat_template(tokenizer_dir: str, name: str | None = None) -> str:
  """The checkpoint's chat template: chat_template.jinja (or additional_chat_templates/NAME.jinja), else the
  `chat_template` field of tokenizer_config.json (a string, or a list of named templates: 'default' unless named)."""
  templates = {}
  config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
  field = _read_json(config_path).get("chat_template")
  if isinstance(field, str):
    templates["default"] = field
  elif isinstance(field, list):
    templates.update({t["name"]: t["template"] for t in field})
  jinja_file = os.path.join(tokenizer_dir, "chat_template.jinja")
  extra_dir = os.path.join(tokenizer_dir, "additional_chat_templates")
  files = {"default": jinja_file} if os.path.exists(jinja_file) else {}
  if os.path.isdir(extra_dir):
    files.update({f.removesuffix(".jinja"): os.path.join(extra_dir, f) for f in sorted(os.listdir(extra_dir))
                  if f.endswith(".jinja")})
  if files:  # transformers: template files replace the config field
    templates = {}
    for key, path in files.items():
      with open(path, encoding="utf-8") as f:
        templates[key] = f.read()
  key = name or "default"
  if key not in templates:
    if not templates:
      raise ValueError(f"{tokenizer_dir}: no chat template (neither chat_template.jinja nor field 'chat_template' of "
                       "tokenizer_config.json); base models have none, so format their prompts without one")
    raise ValueError(f"{tokenizer_dir}: no chat template named {key!r}; it has {sorted(templates)}")
  return templates[key]


def render_chat(messages: list[dict], tokenizer_dir: str, add_generation_prompt: bool = True,
                template_name: str | None = None, **kwargs) -> str:
  """The prompt text of `messages` ([{'role', 'content'}, ...]) under the checkpoint's chat template,
  byte-identical to transformers' tokenizer.apply_chat_template(messages, tokenize=False, ...)."""
  template = chat_template(tokenizer_dir, template_name)
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise TypeError(f"render_chat: message {i} is a {type(m).__name__}, not a dict with 'role' and 'content'")
  chat = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers: None keys dropped
  variables = {**special_tokens(tokenizer_dir), **kwargs}
  return _compile(template).render(messages=chat, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
