"""CLIP's byte-level BPE tokenizer (OpenAI `simple_tokenizer.py` ids) on HF's `tokenizers` library.

`get_tokenizer()` builds it from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (shipped in the
`open-clip-torch` wheel) or from HF files (`vocab.json` + `merges.txt`, or `tokenizer.json`);
`encode` gives int32 [n, context_length] ids, `tf_encode` does the same inside tf.data.

Differences from OpenAI's tokenizer, all deliberate:
- A literal "<|startoftext|>" / "<|endoftext|>" in the text is tokenized as plain text (OpenAI and
  HF turn it into the special id). CLIP pools the text at the first EOT, so a caption must not be
  able to inject one.
- If `ftfy` is not importable, `ftfy.fix_text` is skipped and only NFC is applied: ids then differ
  from OpenAI's on mojibake, fullwidth letters, ligatures, curly quotes and control characters.
"""
import gzip
import html
import importlib.util
import json
import os
import pathlib
import re
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders
from tokenizers import normalizers
from tokenizers import pre_tokenizers

try:
  import ftfy
except ImportError:  # pragma: no cover - ftfy is in install_requires; see the module docstring.
  ftfy = None

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
EOW = "</w>"  # CLIP's end-of-word suffix: "cat</w>" is a whole word, "cat" a word's start.
# CLIP's pre-tokenizer: contractions, letter runs, single digits, punctuation runs; whitespace
# separates words and is dropped. (OpenAI also matches the special tokens here: see module doc.)
# OpenAI compiles it with IGNORECASE, which on lower-cased text changes one thing: `'s` also
# matches "'ſ" (long s, U+017F; no other character folds onto a contraction), hence `'ſ`.
CLIP_SPLIT_REGEX = r"""'s|'ſ|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# OpenAI's file has 262k merge lines after a header; CLIP uses the first 48894 of them.
OPENAI_NUM_MERGES = 49152 - 256 - 2
OPENAI_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# The open-clip-torch release whose wheel ships OPENAI_BPE_NAME as checked in tests; any recent
# release carries the same file.
OPEN_CLIP_VERSION = "3.3.0"


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's byte -> printable character map (256 entries, in CLIP's vocab order)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
  """CLIP's text clean-up: ftfy, HTML unescaped twice, whitespace collapsed and stripped, lower."""
  if ftfy is not None:
    text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text))
  return re.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
  """CLIP BPE tokenizer: text -> int32 ids [n, context_length], SOT + tokens + EOT + padding.

  Attributes:
    vocab_size: 49408 for CLIP.
    sot_id, eot_id: ids of "<|startoftext|>" (49406) and "<|endoftext|>" (49407).
    pad_id: id written after EOT (0, as OpenAI and open_clip do; 0 is also the token "!").
    context_length: length of every encoded row (77 for CLIP, 16 for OWL-ViT).
    backend: the `tokenizers.Tokenizer` doing normalization, pre-tokenization and BPE.
  """

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
               context_length: int = 77, pad_id: int = 0, source: str = "<in memory>"):
    """`vocab`: token -> id; `merges`: BPE merges, highest priority first; `source`: for errors."""
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}.")
    for name in (SOT, EOT):
      if name not in vocab:
        raise ValueError(f"{source}: the vocab has no special token {name!r}; not a CLIP vocab.")
    # Byte-level BPE never needs an unknown token if every byte, alone and as a word end, is in
    # the vocab; checking that here means no text can be silently dropped or mapped to EOT.
    missing = [c + s for c in bytes_to_unicode().values() for s in ("", EOW) if c + s not in vocab]
    if missing:
      raise ValueError(f"{source}: the vocab lacks {len(missing)} of the 512 byte-level base "
                       f"tokens (e.g. {missing[:3]}); not a CLIP byte-level BPE vocab.")
    self.vocab_size = len(vocab)
    self.sot_id = vocab[SOT]
    self.eot_id = vocab[EOT]
    self.pad_id = int(pad_id)
    self.context_length = int(context_length)
    self.source = source

    backend = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=dict(vocab), merges=[tuple(m) for m in merges], dropout=None,
        continuing_subword_prefix="", end_of_word_suffix=EOW, fuse_unk=False))
    # Same normalizer as transformers' CLIPTokenizerFast; after `clean_text` it only adds NFC when
    # ftfy is missing, and keeps `backend` usable on its own.
    backend.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
        normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(CLIP_SPLIT_REGEX), behavior="removed", invert=True),
        # use_regex=False: the Split above already made CLIP's words; GPT-2's regex must not
        # split them again.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    self.backend = backend

  def __repr__(self):
    return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"context_length={self.context_length}, pad_id={self.pad_id})")

  def add_tokens(self, words: Sequence[str]) -> list[int]:
    """Adds whole words to the vocabulary (domain vocabulary); returns their ids.

    New ids start at the current `vocab_size` (49408 for CLIP), ABOVE the EOT id, so a text model
    using them must pool at the first EOT id rather than at the argmax id (models/text.py's
    `eot_token_id`), and hold their embeddings beyond its vocabulary (`extra_tokens`). A word is
    matched as a whole word, case-insensitively (the text is lower-cased first). Words already
    added keep their ids; a word that is one token of the BPE vocab already is an error (it needs
    no new embedding).
    """
    ids = []
    for word in words:
      w = clean_text(word)
      if not w or " " in w:
        raise ValueError(f"add_tokens: {word!r} is not one word.")
      existing = self.backend.token_to_id(w)
      if existing is not None and existing >= self.eot_id + 1:
        ids.append(existing)
        continue
      if len(self.tokenize(w)) == 1:
        raise ValueError(f"add_tokens: {word!r} is already one token of the vocabulary "
                         f"(id {self.tokenize(w)[0]}); it needs no new embedding.")
      self.backend.add_tokens([tokenizers.AddedToken(w, single_word=True, normalized=True)])
      ids.append(self.backend.token_to_id(w))
    self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
    return ids

  def tokenize(self, text: str) -> list[int]:
    """Token ids of one text, without SOT/EOT and untruncated."""
    return self.backend.encode(clean_text(text), add_special_tokens=False).ids

  def encode(self, texts: str | Sequence[str]) -> np.ndarray:
    """Texts -> int32 [n, context_length]: SOT, tokens, EOT, then pad_id.

    Longer texts keep their first context_length - 2 tokens and still end in EOT (as open_clip's
    `tokenize`; OpenAI's `clip.tokenize(truncate=True)`). A single str gives [1, context_length].
    """
    if isinstance(texts, (str, bytes)):
      texts = [texts]
    texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f"encode: text {i} is a {type(t).__name__}, expected str: {t!r:.80}")
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    out[:, 0] = self.sot_id
    keep = self.context_length - 2
    encodings = self.backend.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
    for row, enc in zip(out, encodings):
      ids = enc.ids[:keep]
      row[1:len(ids) + 1] = ids
      row[len(ids) + 1] = self.eot_id
    return out

  __call__ = encode

  def decode(self, ids) -> str | list[str]:
    """Ids [length] -> text (for debugging); [n, length] -> list of n texts.

    Stops at the first EOT (what follows is padding) and drops a leading SOT. Not an exact inverse:
    clean-up lower-cases and drops whitespace, and decoded words are separated by single spaces.
    """
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row) for row in ids]
    if ids.ndim != 1:
      raise ValueError(f"decode: expected ids of shape [length] or [n, length], got {ids.shape}.")
    ids = [int(i) for i in ids]
    if self.eot_id in ids:
      ids = ids[:ids.index(self.eot_id)]
    if ids and ids[0] == self.sot_id:
      ids = ids[1:]
    return self.backend.decode(ids, skip_special_tokens=False).replace(EOW, " ").strip()

  def tf_encode(self, strings):
    """`encode` in a TF graph (tf.data map): string [n] -> int32 [n, L]; a string scalar -> [L].

    Strings must be UTF-8. Runs `encode` through `tf.numpy_function`, so it holds the Python GIL.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # keep TF out of module import

    strings = tf.convert_to_tensor(strings, dtype=tf.string)
    rank = strings.shape.rank
    if rank not in (0, 1):
      raise ValueError(f"tf_encode: expected a string scalar or vector, got shape {strings.shape}.")
    batch = tf.reshape(strings, [-1])
    ids = tf.numpy_function(self._encode_bytes, [batch], tf.int32, stateful=False,
                            name="clip_tokenize")
    ids.set_shape([batch.shape[0], self.context_length])
    return ids[0] if rank == 0 else ids

  def _encode_bytes(self, batch: np.ndarray) -> np.ndarray:
    texts = []
    for i, b in enumerate(batch):
      try:
        texts.append(b.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise ValueError(f"tf_encode: string {i} is not valid UTF-8 ({e}): {b[:80]!r}") from e
    return self.encode(texts)

  @classmethod
  def from_openai_bpe(cls, path: str | os.PathLike, **kwargs) -> "Tokenizer":
    """From OpenAI's `bpe_simple_vocab_16e6.txt.gz`, building the vocab as `simple_tokenizer.py`."""
    path = pathlib.Path(path)
    try:
      with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
      raise _file_error(path, f"OpenAI's gzipped BPE merges ({OPENAI_BPE_NAME})", e) from e
    # Line 0 is a "#version" header; CLIP uses the next OPENAI_NUM_MERGES lines.
    merges = _parse_merges(lines[1:OPENAI_NUM_MERGES + 1], path, first_line=2)
    if len(merges) != OPENAI_NUM_MERGES:
      raise ValueError(f"{path}: expected at least {OPENAI_NUM_MERGES} merge lines after the "
                       f"header, found {len(merges)}; not OpenAI's {OPENAI_BPE_NAME}?")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + EOW for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise ValueError(f"{path}: the merges give {len(tokens) - len(vocab)} duplicate tokens; "
                       f"not OpenAI's {OPENAI_BPE_NAME}?")
    return cls(vocab, merges, source=str(path), **kwargs)

  @classmethod
  def from_vocab_merges(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
                        **kwargs) -> "Tokenizer":
    """From HF's `vocab.json` ({token: id}) and `merges.txt` ("a b" lines, "#version" header)."""
    vocab_path, merges_path = pathlib.Path(vocab_path), pathlib.Path(merges_path)
    vocab = _read_json(vocab_path, "a JSON object {token: id} (HF vocab.json)")
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
      raise ValueError(f"{vocab_path}: expected a JSON object {{token: id}} (HF vocab.json), "
                       f"found a {type(vocab).__name__} that is not one.")
    try:
      lines = merges_path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise _file_error(merges_path, "BPE merges, one 'a b' pair a line (HF merges.txt)", e) from e
    start = 1 if lines and lines[0].startswith("#version") else 0
    merges = _parse_merges(lines[start:], merges_path, first_line=start + 1)
    return cls(vocab, merges, source=f"{vocab_path} + {merges_path}", **kwargs)

  @classmethod
  def from_tokenizer_json(cls, path: str | os.PathLike, **kwargs) -> "Tokenizer":
    """From HF's `tokenizer.json`; only its BPE vocab and merges are used (the rest is CLIP's)."""
    path = pathlib.Path(path)
    data = _read_json(path, "a HF tokenizers JSON file (tokenizer.json)")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
      raise ValueError(f"{path}: expected a HF tokenizer.json with a 'model' object, found none "
                       "(for a vocab.json, pass its directory or a (vocab.json, merges.txt) pair).")
    if model.get("type") != "BPE":
      raise ValueError(f"{path}: model type is {model.get('type')!r}, expected 'BPE' (CLIP's "
                       "byte-level BPE); this tokenizer.json is not a CLIP tokenizer.")
    if model.get("end_of_word_suffix") != EOW:
      raise ValueError(f"{path}: BPE end_of_word_suffix is {model.get('end_of_word_suffix')!r}, "
                       f"expected {EOW!r} as in CLIP's tokenizer.")
    merges = []
    for i, m in enumerate(model.get("merges") or []):
      # tokenizers < 0.20 wrote merges as "a b" strings; newer versions as ["a", "b"] pairs.
      pair = m.split(" ") if isinstance(m, str) else m
      if not (isinstance(pair, list) and len(pair) == 2):
        raise ValueError(f"{path}: model.merges[{i}] is {m!r}, expected 'a b' or ['a', 'b'].")
      merges.append(tuple(pair))
    return cls(model.get("vocab") or {}, merges, source=str(path), **kwargs)


def get_tokenizer(path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                  context_length: int = 77, pad_id: int = 0) -> Tokenizer:
  """CLIP tokenizer from `path`, or from open_clip's copy of OpenAI's BPE file if `path` is None.

  `path` is one of: OpenAI's `bpe_simple_vocab_16e6.txt.gz` (any `.gz`); a HF `tokenizer.json`
  (any `.json`); a (vocab.json, merges.txt) pair; or a directory holding `tokenizer.json`, else
  `vocab.json` + `merges.txt`, else `bpe_simple_vocab_16e6.txt.gz`.
  """
  kwargs = dict(context_length=context_length, pad_id=pad_id)
  if path is None:
    return Tokenizer.from_openai_bpe(default_bpe_path(), **kwargs)
  if not isinstance(path, (str, os.PathLike)):
    paths = list(path)
    if len(paths) != 2:
      raise ValueError(f"get_tokenizer: expected a path or a (vocab.json, merges.txt) pair, "
                       f"got {len(paths)} paths: {paths}.")
    return Tokenizer.from_vocab_merges(*paths, **kwargs)
  path = pathlib.Path(path)
  if path.is_dir():
    if (path / "tokenizer.json").is_file():
      return Tokenizer.from_tokenizer_json(path / "tokenizer.json", **kwargs)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
      return Tokenizer.from_vocab_merges(path / "vocab.json", path / "merges.txt", **kwargs)
    if (path / OPENAI_BPE_NAME).is_file():
      return Tokenizer.from_openai_bpe(path / OPENAI_BPE_NAME, **kwargs)
    raise FileNotFoundError(
        f"{path}: found no tokenizer files in this directory; expected tokenizer.json, or "
        f"vocab.json + merges.txt, or {OPENAI_BPE_NAME}; it holds: {_listing(path)}.")
  if path.name.endswith(".gz"):
    return Tokenizer.from_openai_bpe(path, **kwargs)
  if path.suffix == ".json":
    return Tokenizer.from_tokenizer_json(path, **kwargs)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or directory; expected a tokenizer.json, "
                            f"{OPENAI_BPE_NAME}, or a directory with tokenizer files.")
  raise ValueError(f"{path}: unknown tokenizer file; expected a tokenizer.json (.json), OpenAI's "
                   f"{OPENAI_BPE_NAME} (.gz), a (vocab.json, merges.txt) pair or a directory.")


def default_bpe_path() -> pathlib.Path:
  """open_clip's copy of OpenAI's BPE file, found without importing open_clip (it needs torch)."""
  hint = (f"Install it with `pip install --no-deps open-clip-torch=={OPEN_CLIP_VERSION}`, or pass "
          "a path to get_tokenizer (OpenAI's .gz, a tokenizer.json, or vocab.json + merges.txt).")
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(f"The default CLIP tokenizer needs {OPENAI_BPE_NAME} from the "
                              f"open-clip-torch package, which is not installed. {hint}")
  for folder in spec.submodule_search_locations:
    path = pathlib.Path(folder) / OPENAI_BPE_NAME
    if path.is_file():
      return path
  raise FileNotFoundError(f"open_clip is installed at {list(spec.submodule_search_locations)} but "
                          f"has no {OPENAI_BPE_NAME}. {hint}")


def _parse_merges(lines: list[str], path, first_line: int) -> list[tuple[str, str]]:
  merges = []
  for n, line in enumerate(lines, start=first_line):
    if not line.strip():
      continue
    pair = line.split()
    if len(pair) != 2:
      raise ValueError(f"{path}, line {n}: expected a BPE merge 'a b', found {line!r}.")
    merges.append(tuple(pair))
  return merges


def _read_json(path: pathlib.Path, expected: str):
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _file_error(path, expected, e) from e


def _file_error(path: pathlib.Path, expected: str, e: Exception) -> Exception:
  if not path.exists():
    return FileNotFoundError(f"{path}: no such file; expected {expected}.")
  return ValueError(f"{path}: cannot read {expected}: {type(e).__name__}: {e}")


def _listing(folder: pathlib.Path, limit: int = 10) -> str:
  names = sorted(p.name for p in folder.iterdir())
  return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
