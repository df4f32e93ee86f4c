"""CLIP tokenizer: ids against independent references (instant-clip-tokenizer, transformers)."""
import gzip
import json
import pathlib
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from vit_jax.input_pipeline import tokenizer as tokenizer_lib

SOT, EOT = 49406, 49407

# Hand-picked cases: each stresses one part of the pipeline (clean-up, regex, BPE, truncation).
CURATED = [
    "a photo of a cat", "A PHOTO OF A CAT", "a photo of a dog.", "", " ", "\t\n", "x",
    "don't", "DON'T", "I'm sure you'll say we've done it, they're sure it's Ed's",
    "'s 't 're 've 'm 'll 'd", "''s", "o'clock", "rock'n'roll",
    "  multiple   spaces\tand\ttabs\nand\r\nnewlines  ", "\u00a0nbsp\u2003em\u3000ideographic",
    "&amp; &#39; &quot;quoted&quot; &lt;b&gt;bold&lt;/b&gt;", "&amp;amp; is unescaped twice",
    "AT&T", "&notanentity; &#x41; &#65;", "café Café CAFÉ", "cafe\u0301 (combining accent)",
    "naïve façade jalapeño smörgåsbord", "Ærøskøbing Œuvre ß ẞ", "İstanbul ıi", "ΟΔΟΣ ΣΑΣ σς",
    "Привет, мир!", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "日本語のテキスト", "中文字符测试", "한국어 텍스트", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ﬁne ﬂow ﬀ", "😀 👍🏽 👨‍👩‍👧 🇫🇷 ❤️", "emoji😀inside", "“curly” ‘quotes’ «guillemets»",
    "mojibake: Ã©tÃ© â€œhiâ€\x9d", "1234567890", "3.14159 -42 1,000,000 1e-5", "٣٤٥ ⅷ ²³",
    "!!! ??? ... --- ___ *** ###", "a+b=c; x<y>z | {}[]()", "email@example.com http://x.y/z?q=1",
    "#hashtag @mention $100 50% ^_^ ~~", "tab\there", "\x00\x1c\x1d control \x7f chars",
    "K Ω Å (Kelvin, Ohm, Angstrom signs)", "Ǆ ǅ ǆ", "it'ſ long s", "<|endoftext|> in text",
    "<|startoftext|>", "</w> suffix", "the the the the", "a" * 300,
    "a very long caption " * 20, "supercalifragilisticexpialidocious antidisestablishmentarianism",
]

_FRAGMENTS = [
    "a", "photo", "of", "the", "cat", "dog", "Street", "NIGHT", "don't", "it's", "we'll", "I'd",
    "&amp;", "&#39;", "&gt;", "&quot;", "café", "über", "naïve", "日本", "语言", "한국", "Москва",
    "😀", "🚀", "👍🏽", "✨", "42", "3.5", "2024", "½", "!", "?!", "...", ",", "-", "(x)", "#1",
    "@", "/", "\\", "“", "”", "ﬁ", "Ｗ", "ß", "ǅ", "\u0301", " ", "  ", "\t", "\n", "\u3000",
]


def _generated(n: int, seed: int = 0) -> list[str]:
  """n strings mixing fragments at random, separated by nothing, a space, or other whitespace."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    parts = rng.choices(_FRAGMENTS, k=rng.randint(1, 30))
    out.append("".join(p + rng.choice(["", " ", " ", " ", "\t", "  "]) for p in parts))
  return out


STRINGS = CURATED + _generated(300)


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.get_tokenizer()


def _unpadded(row) -> list[int]:
  row = [int(i) for i in row]
  return row[:row.index(EOT) + 1]


def _hf_files(tmp_path: pathlib.Path) -> pathlib.Path:
  """vocab.json + merges.txt written from OpenAI's .gz as OpenAI's simple_tokenizer builds them."""
  lines = gzip.open(tokenizer_lib.default_bpe_path()).read().decode("utf-8").split("\n")
  merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
  chars = list(tokenizer_lib.bytes_to_unicode().values())
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  (tmp_path / "vocab.json").write_text(json.dumps(dict(zip(vocab, range(len(vocab))))))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return tmp_path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return _hf_files(tmp_path_factory.mktemp("clip_tokenizer"))


def test_known_ids(tok):
  ids = tok.encode(["a photo of a cat"])
  assert ids.shape == (1, 77) and ids.dtype == np.int32
  assert ids[0, :8].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT, 0]
  assert not ids[0, 7:].any()
  # Ids checked against OpenAI's simple_tokenizer.py (open_clip's copy), which runs ftfy, unescapes
  # HTML twice and lower-cases with Python's str.lower (final sigma: "ς").
  assert _unpadded(tok.encode("a diagram")[0]) == [SOT, 320, 22697, EOT]
  assert _unpadded(tok.encode("A person riding a motorcycle")[0]) == \
      [SOT, 320, 2533, 6765, 320, 10297, EOT]
  assert _unpadded(tok.encode("Hi there")[0]) == [SOT, 1883, 997, EOT]
  assert _unpadded(tok.encode("")[0]) == [SOT, EOT]
  assert tok.tokenize("Tom &amp;amp; Jerry&#39;s") == [2435, 261, 9164, 568]
  assert tok.tokenize("ﬁne “Ｗine”") == [3797, 257, 2604, 257]  # ftfy: ligature, width, quotes
  assert tok.tokenize("ΟΔΟΣ") == [138, 123, 138, 112, 138, 123, 139, 480]
  assert (tok.vocab_size, tok.sot_id, tok.eot_id) == (49408, SOT, EOT)


def test_long_s_follows_openai_ignorecase(tok):
  # OpenAI's regex is case-insensitive, so `'s` matches "'ſ": ids from OpenAI's simple_tokenizer
  # (open_clip's copy). instant-clip-tokenizer and transformers split it as "'" + "ſ" instead.
  assert _unpadded(tok.encode("it'ſ")[0]) == [SOT, 585, 6, 129, 379, EOT]


def test_truncation_and_padding():
  tok16 = tokenizer_lib.get_tokenizer(context_length=16, pad_id=-1)  # OWL-ViT's length
  long_text = "one two three four five six seven eight nine ten " * 3
  ids = tok16.encode([long_text, "a cat"])
  assert ids.shape == (2, 16) and ids.dtype == np.int32
  # First 14 tokens kept, and EOT still last (CLIP pools the text at EOT).
  assert ids[0].tolist() == [SOT] + tok16.tokenize(long_text)[:14] + [EOT]
  assert ids[1].tolist() == [SOT, 320, 2368, EOT] + [-1] * 12
  assert tok16.encode("a cat").shape == (1, 16)


def test_same_ids_as_instant_clip_tokenizer(tok):
  instant = pytest.importorskip("instant_clip_tokenizer")
  ref = instant.Tokenizer()  # its own copy of OpenAI's vocabulary file
  # instant only lower-cases: give it text after CLIP's clean-up (ftfy, HTML, whitespace).
  strings = [s for s in STRINGS if "'ſ" not in s]  # see test_long_s_follows_openai_ignorecase
  for context_length in (77, 16):
    ours = tokenizer_lib.get_tokenizer(context_length=context_length).encode(strings)
    theirs = ref.tokenize_batch([tokenizer_lib.clean_text(s) for s in strings],
                                context_length=context_length)
    bad = [(s, a.tolist(), b.tolist()) for s, a, b in zip(strings, ours, theirs) if (a != b).any()]
    assert not bad, f"{len(bad)} of {len(strings)} differ, first: {bad[0]}"
  assert any(len(ref.encode(tokenizer_lib.clean_text(s))) > 75 for s in strings)  # truncation ran


def test_same_ids_as_transformers(tok, hf_dir):
  transformers = pytest.importorskip("transformers")
  hf = transformers.CLIPTokenizerFast.from_pretrained(str(hf_dir))
  # transformers does no ftfy/HTML clean-up, and maps a literal "<|endoftext|>" to the special id.
  strings = [tokenizer_lib.clean_text(s) for s in STRINGS if "<|" not in s and "'ſ" not in s]
  theirs = hf(strings, padding="max_length", max_length=77, truncation=True)["input_ids"]
  ours = tok.encode(strings)
  assert all(len(b) == 77 for b in theirs)
  for s, a, b in zip(strings, ours, theirs):
    assert _unpadded(a) == _unpadded(b), s  # transformers pads with EOT, we with 0


def test_hf_files_give_same_ids_as_openai_gz(tok, hf_dir, tmp_path):
  expected = tok.encode(STRINGS)
  from_vocab_merges = tokenizer_lib.get_tokenizer(hf_dir)  # a directory
  pair = tokenizer_lib.get_tokenizer((hf_dir / "vocab.json", hf_dir / "merges.txt"))
  np.testing.assert_array_equal(from_vocab_merges.encode(STRINGS), expected)
  np.testing.assert_array_equal(pair.encode(STRINGS), expected)
  transformers = pytest.importorskip("transformers")
  # A tokenizer.json written by transformers, not by us.
  transformers.CLIPTokenizerFast.from_pretrained(str(hf_dir)).save_pretrained(str(tmp_path))
  assert (tmp_path / "tokenizer.json").is_file()
  np.testing.assert_array_equal(
      tokenizer_lib.get_tokenizer(tmp_path / "tokenizer.json").encode(STRINGS), expected)


def test_decode(tok):
  ids = tok.encode(["A photo of a CAT!", "naïve café 日本"])
  assert tok.decode(ids[0]) == "a photo of a cat !"
  assert tok.decode(ids) == ["a photo of a cat !", "naïve café 日本"]


def test_tf_data_map_gives_same_ids(tok):
  tf = pytest.importorskip("tensorflow")
  strings = STRINGS[:40]
  ds = tf.data.Dataset.from_tensor_slices(strings)
  per_example = ds.map(lambda s: {"labels": tok.tf_encode(s)})
  assert per_example.element_spec["labels"].shape == (77,)
  got = np.stack([ex["labels"] for ex in per_example.as_numpy_iterator()])
  np.testing.assert_array_equal(got, tok.encode(strings))
  batched = ds.batch(16).map(tok.tf_encode, num_parallel_calls=2)
  assert batched.element_spec.shape.as_list() == [None, 77]
  assert batched.element_spec.dtype == tf.int32
  np.testing.assert_array_equal(np.concatenate(list(batched.as_numpy_iterator())), got)
  bad = tf.data.Dataset.from_tensor_slices([b"ok", b"\xff\xfe"]).batch(2).map(tok.tf_encode)
  with pytest.raises(tf.errors.InvalidArgumentError, match="string 1 is not valid UTF-8"):
    list(bad)


def test_missing_files_are_named(tmp_path):
  missing = tmp_path / "nope" / "bpe_simple_vocab_16e6.txt.gz"
  with pytest.raises(FileNotFoundError, match=r"nope.*no such file.*OpenAI"):
    tokenizer_lib.get_tokenizer(missing)
  with pytest.raises(FileNotFoundError, match="tokenizer.json.*no such file"):
    tokenizer_lib.get_tokenizer(tmp_path / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="found no tokenizer files"):
    tokenizer_lib.get_tokenizer(tmp_path)
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="merges.txt: no such file"):
    tokenizer_lib.get_tokenizer((tmp_path / "vocab.json", tmp_path / "merges.txt"))
  (tmp_path / "bad.gz").write_bytes(b"not gzip")
  with pytest.raises(ValueError, match=r"bad.gz: cannot read OpenAI"):
    tokenizer_lib.get_tokenizer(tmp_path / "bad.gz")


def test_bad_tokenizer_json_is_refused(tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
  with pytest.raises(ValueError, match="model type is 'WordPiece', expected 'BPE'"):
    tokenizer_lib.get_tokenizer(path)
  path.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [],
                                        "end_of_word_suffix": None}}))
  with pytest.raises(ValueError, match="end_of_word_suffix is None, expected '</w>'"):
    tokenizer_lib.get_tokenizer(path)
  path.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [],
                                        "end_of_word_suffix": "</w>"}}))
  with pytest.raises(ValueError, match=re.escape("no special token '<|startoftext|>'")):
    tokenizer_lib.get_tokenizer(path)
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(ValueError, match=r"pass its directory or a \(vocab.json, merges.txt\) pair"):
    tokenizer_lib.get_tokenizer(tmp_path / "vocab.json")
  path.write_text("{not json")
  with pytest.raises(ValueError, match="cannot read a HF tokenizers JSON"):
    tokenizer_lib.get_tokenizer(path)


def test_missing_open_clip_says_how_to_install(monkeypatch):
  monkeypatch.setattr(tokenizer_lib.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ModuleNotFoundError,
                     match=r"pip install --no-deps open-clip-torch==\d+\.\d+\.\d+.*or pass a path"):
    tokenizer_lib.get_tokenizer()


def test_module_import_pulls_no_tensorflow_or_torch():
  # Loaded as a bare file: the vit_jax.input_pipeline package itself imports TensorFlow.
  code = ("import importlib.util, sys; "
          f"s = importlib.util.spec_from_file_location('t', {tokenizer_lib.__file__!r}); "
          "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
          "m.get_tokenizer(); "
          "print(sorted({'tensorflow', 'torch', 'open_clip'} & set(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_add_tokens_domain_vocabulary():
  base = tokenizer_lib.get_tokenizer(context_length=16)
  tok = tokenizer_lib.get_tokenizer(context_length=16)
  texts = ["a photo of a photovoltaic inverter.", "photovoltaics", "a cat"]
  before = base.encode(texts)
  ids = tok.add_tokens(["Photovoltaic", "xq7mosfet"])
  assert ids == [49408, 49409] and tok.vocab_size == 49410
  assert tok.add_tokens(["photovoltaic"]) == [49408]  # already added: same id
  after = tok.encode(texts)
  # The new word is one token; whole words only ("photovoltaics" keeps its BPE ids); the rest of
  # every text keeps its ids.
  assert list(after[0][:7]) == [49406, 320, 1125, 539, 320, 49408, 12061]
  np.testing.assert_array_equal(after[1:], before[1:])
  assert after[0][np.argmax(after[0] == tok.eot_id)] == tok.eot_id
  with pytest.raises(ValueError, match="already one token"):
    tok.add_tokens(["cat"])
  with pytest.raises(ValueError, match="not one word"):
    tok.add_tokens(["two words"])
