"""The files a user brings, written here in their real formats: tiny Hugging Face checkpoints saved by
transformers (Gemma-2 with a SentencePiece tokenizer.model, Llama with a tokenizer.json only, as Llama 3 ships),
and the XTREME-UP / XOR-AttriQA release layouts (the test fixtures)."""
import io
import json
import os
import shutil

import sentencepiece
import tokenizers

TESTDATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'testdata')
PROMPTS = os.path.join(os.path.dirname(TESTDATA), '..', 'tasks', 'prompts')
SPECIALS = ['<pad>', '<eos>', '<bos>', '<unk>']  # ids 0..3, as Gemma numbers them
VOCAB_SIZE = 1024  # embeddings of every tiny checkpoint (the tokenizers are smaller)


def corpus() -> list[str]:
  """Every string of the fixture releases and of the prompt files: what the tokenizers are trained on."""
  texts = []
  for root, _, files in os.walk(TESTDATA):
    for name in files:
      if name.endswith('.jsonl') and 'broken' not in root:
        with open(os.path.join(root, name), encoding='utf-8') as f:
          for line in f:
            texts += [v for v in json.loads(line).values() if isinstance(v, str)]
  for name in sorted(os.listdir(PROMPTS)):
    with open(os.path.join(PROMPTS, name), encoding='utf-8') as f:
      texts += f.read().splitlines()
  return [t for t in texts if t.strip()]


def write_sentencepiece(path: str, texts: list[str]) -> None:
  """tokenizer.model: a unigram SentencePiece model with byte fallback (every script encodes), Gemma's ids."""
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=1000, model_type='unigram', byte_fallback=True,
      character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece='<pad>', eos_piece='<eos>',
      bos_piece='<bos>', unk_piece='<unk>', minloglevel=2)
  with open(os.path.join(path, 'tokenizer.model'), 'wb') as f:
    f.write(model.getvalue())


def write_tokenizer_json(path: str, texts: list[str]) -> None:
  """tokenizer.json (byte-level BPE) and tokenizer_config.json naming its special tokens, as Llama 3 ships."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=480, special_tokens=SPECIALS,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  tok.save(os.path.join(path, 'tokenizer.json'))
  with open(os.path.join(path, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<bos>', 'eos_token': '<eos>',
               'pad_token': '<pad>', 'unk_token': '<unk>'}, f)


def write_checkpoint(path: str, family: str, tokenizer: str, seed: int, texts: list[str]) -> str:
  """A random tiny model saved by transformers' save_pretrained (safetensors) with its tokenizer files."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  common = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                pad_token_id=0, eos_token_id=1, bos_token_id=2)
  if family == 'gemma2':
    config = transformers.Gemma2Config(**common, sliding_window=64, query_pre_attn_scalar=8,
                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    model_cls = transformers.Gemma2ForCausalLM
  else:
    config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    model_cls = transformers.LlamaForCausalLM
  torch.manual_seed(seed)
  model = model_cls(config)
  with torch.no_grad():  # larger weights than the default init, so greedy decoding has clear winners
    for name, p in model.named_parameters():
      if 'norm' not in name:
        p.normal_(0.0, 0.3)
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path, safe_serialization=True)
  (write_sentencepiece if tokenizer == 'sentencepiece' else write_tokenizer_json)(path, texts)
  return path


def build(root: str) -> dict[str, str]:
  """Data in the release layouts and the checkpoints of β and of τ (instruction-tuned and plain), under root."""
  texts = corpus()
  paths = {'xtreme_up': os.path.join(root, 'data', 'xtreme_up'), 'xor_attriqa': os.path.join(root, 'data', 'xor')}
  shutil.copytree(os.path.join(TESTDATA, 'xtreme_up'), paths['xtreme_up'])
  shutil.copytree(os.path.join(TESTDATA, 'xor_attriqa'), paths['xor_attriqa'])
  paths['beta'] = write_checkpoint(os.path.join(root, 'ckpt', 'beta-llama'), 'llama', 'tokenizer.json', 0, texts)
  paths['tau_it'] = write_checkpoint(os.path.join(root, 'ckpt', 'tau-gemma2-it'), 'gemma2', 'sentencepiece', 1,
                                     texts)
  paths['tau_base'] = write_checkpoint(os.path.join(root, 'ckpt', 'tau-gemma2'), 'gemma2', 'sentencepiece', 2,
                                       texts)
  paths['tau_llama'] = write_checkpoint(os.path.join(root, 'ckpt', 'tau-llama-it'), 'llama', 'tokenizer.json', 3,
                                        texts)
  return paths
