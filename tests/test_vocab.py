"""Checkpoint tokenizers as seqio vocabularies (trained here) encode / decode as transformers' tokenizers do on the
scripts of the data sets, and chat templates render byte-identically to transformers' apply_chat_template."""
import io
import json
import pickle

import jinja2
import numpy as np
import pytest
import seqio
import sentencepiece
import tensorflow as tf
import tokenizers

from fiat_jax.model import vocab

transformers = pytest.importorskip("transformers")

# Bengali, Devanagari, Japanese, Cyrillic, Telugu, Latin (docs/data.md, fixtures), with digits, punctuation and odd spacing.
TEXTS = ["আমি বাংলায় গান গাই। প্রশ্ন: রাজধানী কোথায়?", "नमस्ते, आप कैसे हैं? मैं ठीक हूँ।", "東京は日本の首都です。今日は晴れ。",
         "Москва — столица России, основана в 1147 году.", "తెలుగు ఒక ద్రావిడ భాష. సమాధానం లేదు",
         "The quick brown fox isn't lazy , is it ? Answer: No Answer", "Hyvää huomenta, mitä kuuluu?",
         "  two  spaces\tand a tab\nnew line"]
UNSEEN = ["ગુજરાતી લિપિ 😀 Ω≈ç√", "Qual é a resposta? 42."]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_LIKE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
              "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# Whitespace control (trim_blocks / lstrip_blocks), namespace, loop controls, tojson and the generation tag.
CHATML_LIKE = """{%- set ns = namespace(system=none, turns=0) %}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif %}
  {%- set ns.turns = ns.turns + 1 %}
{% endfor %}
{% if ns.system is not none %}
<|im_start|>system
{{ ns.system }}<|im_end|>
{% endif %}
{% for m in messages if m.role != 'system' %}
    {% if m.role == 'assistant' %}
<|im_start|>assistant
{% generation %}{{ m.content }}{% endgeneration %}<|im_end|>
    {% else %}
<|im_start|>{{ m.role }}
{{ m.content }}{% if m.meta is defined %} {{ m.meta | tojson }}{% endif %}<|im_end|>
    {% endif %}
    {% if loop.index >= 9 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def write_bpe_tokenizer(path, template_in_file=False, cleanup=False):
  """A byte-level BPE tokenizer.json trained on TEXTS, its tokenizer_config.json and a chat template."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS + ["<|im_start|>", "<|im_end|>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 5, trainer)
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": {"__type": "AddedToken", "content": "<eos>", "lstrip": False, "normalized": False,
                                                                 "rstrip": False, "single_word": False},
            "pad_token": "<pad>", "clean_up_tokenization_spaces": cleanup}
  if template_in_file:
    (path / "chat_template.jinja").write_text(CHATML_LIKE)
  else:
    config["chat_template"] = [{"name": "default", "template": GEMMA_LIKE}, {"name": "chatml", "template": CHATML_LIKE}]
  (path / "tokenizer_config.json").write_text(json.dumps(config))
  return path


def write_unigram_tokenizer(path):
  """A SentencePiece-style (Metaspace + Unigram) tokenizer.json with the WordPiece-era clean-up switched on."""
  tok = tokenizers.SentencePieceUnigramTokenizer()
  tok.train_from_iterator(TEXTS * 5, vocab_size=300, special_tokens=SPECIALS, unk_token="<pad>")
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "clean_up_tokenization_spaces": True}))
  return path


def write_spm(path):
  """A Gemma-style SentencePiece model (byte fallback, no dummy prefix, identity normalisation)."""
  buf = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXTS * 20), model_writer=buf, vocab_size=500, model_type="bpe", pad_id=0, eos_id=1,
      bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, character_coverage=1.0, allow_whitespace_only_pieces=True, minloglevel=2,
      user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
  path.mkdir(parents=True, exist_ok=True)
  (path / "tokenizer.model").write_bytes(buf.getvalue())
  (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>",
                                                          "eos_token": "<eos>", "pad_token": "<pad>"}))
  return path


@pytest.mark.parametrize("writer", [write_bpe_tokenizer, write_unigram_tokenizer, write_spm])
def test_encode_decode_equal_transformers(writer, tmp_path):
  d = writer(tmp_path / "tok")
  ours, theirs = vocab.vocabulary(str(d)), transformers.AutoTokenizer.from_pretrained(str(d))
  assert isinstance(ours, seqio.SentencePieceVocabulary if writer is write_spm else vocab.HfTokenizerVocabulary)
  assert ours.eos_id == theirs.eos_token_id
  # transformers' GemmaTokenizer appends a <mask> token to the SentencePiece vocabulary.
  assert ours.vocab_size == (theirs.vocab_size if writer is write_spm else len(theirs))
  n_tokens = 0
  for text in TEXTS + UNSEEN + ["<start_of_turn>user\nপ্রশ্ন<end_of_turn>\n"]:
    ids = list(ours.encode(text))
    assert ids == theirs.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    n_tokens += len(ids)
  assert n_tokens > 100
  assert ours.decode(ours.encode(TEXTS[0]) + [ours.eos_id] + ours.encode("after EOS")) == TEXTS[0]


def test_hf_vocabulary_in_tensorflow_and_pickle(tmp_path):
  ours = vocab.HfTokenizerVocabulary(str(write_bpe_tokenizer(tmp_path / "tok")))
  ids = ours.encode(TEXTS[1])
  np.testing.assert_array_equal(ours.encode_tf(tf.constant(TEXTS[1])).numpy(), ids)
  batch = ours.encode_tf(tf.constant(TEXTS[:3]))
  assert batch.to_list() == [ours.encode(t) for t in TEXTS[:3]]
  assert ours.decode_tf(tf.constant(ids + [ours.eos_id, 5, 6])).numpy().decode() == TEXTS[1]
  rows = [ours.encode("ab") + [ours.eos_id, 7], ours.encode("খ")]
  width = max(map(len, rows))
  padded = tf.constant([r + [ours.pad_id] * (width - len(r)) for r in rows])
  assert [s.decode() for s in ours.decode_tf(padded).numpy()] == ["ab", "খ"]
  assert (ours.pad_id, ours.bos_id) == (0, 2)
  clone = pickle.loads(pickle.dumps(ours))
  assert clone == ours and clone.encode(TEXTS[2]) == ours.encode(TEXTS[2])
  assert vocab.HfTokenizerVocabulary(str(tmp_path / "tok"), skip_special_tokens=False) != ours
  keep = vocab.HfTokenizerVocabulary(str(tmp_path / "tok"), skip_special_tokens=False)
  assert keep.decode(ours.encode("<bos>hi")) == "<bos>hi"


CHATS = [
    [{"role": "user", "content": "প্রশ্ন: বাংলাদেশের রাজধানী কোথায়?  "}],
    [{"role": "user", "content": "Вопрос?"}, {"role": "assistant", "content": "Ответ.", "meta": None},
     {"role": "user", "content": "तो?", "meta": {"lang": "hi", "note": "नमस्ते <&>"}}],
    [{"role": "system", "content": "Answer in English."}, {"role": "user", "content": "東京?"},
     {"role": "assistant", "content": "Tokyo"}, {"role": "user", "content": "తెలుగు"}],
]


@pytest.mark.parametrize("template_in_file", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_is_byte_identical_to_apply_chat_template(template_in_file, add_generation_prompt, tmp_path):
  d = write_bpe_tokenizer(tmp_path / "tok", template_in_file=template_in_file)
  theirs = transformers.AutoTokenizer.from_pretrained(str(d))
  names = [None] if template_in_file else [None, "chatml"]
  rendered = 0
  for name in names:
    for chat in CHATS:
      if name is None and not template_in_file and chat[0]["role"] == "system":
        with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
          vocab.render_chat(chat, str(d), add_generation_prompt)
        continue
      ours = vocab.render_chat(chat, str(d), add_generation_prompt, template_name=name)
      assert ours == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                chat_template=name)
      rendered += 1
  assert rendered == (3 if template_in_file else 5)
  first = vocab.render_chat(CHATS[0], str(d), add_generation_prompt)
  assert first.startswith("<|im_start|>user\n" if template_in_file else "<bos><start_of_turn>user\n")


def test_missing_template_and_tokenizer_errors(tmp_path):
  d = write_unigram_tokenizer(tmp_path / "base")
  with pytest.raises(ValueError, match="no chat template .*base models have none"):
    vocab.render_chat(CHATS[0], str(d))
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
    vocab.vocabulary(str(tmp_path))
  d2 = write_bpe_tokenizer(tmp_path / "it")
  with pytest.raises(ValueError, match=r"no chat template named 'tools'; it has \['chatml', 'default'\]"):
    vocab.render_chat(CHATS[0], str(d2), template_name="tools")
