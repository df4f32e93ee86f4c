"""Zero-shot top-1/top-5, prompt ensembling and retrieval R@k against brute-force loops."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import parallel
from vit_jax.evaluation import prompts
from vit_jax.evaluation import retrieval
from vit_jax.evaluation import zeroshot


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- Prompts -----------------------------------------------------------------------------------


def test_templates():
  assert len(prompts.IMAGENET_TEMPLATES) == 80 == len(set(prompts.IMAGENET_TEMPLATES))
  assert len(prompts.IMAGENET_TEMPLATES_SHORT) == 7
  assert set(prompts.IMAGENET_TEMPLATES_SHORT) <= set(prompts.IMAGENET_TEMPLATES)
  for t in prompts.IMAGENET_TEMPLATES:
    assert t.count("{}") == 1 and t.format("x") != t
  assert prompts.IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
  assert prompts.IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
  assert prompts.get_templates() == prompts.IMAGENET_TEMPLATES_SHORT
  assert prompts.get_templates("imagenet80") is prompts.IMAGENET_TEMPLATES
  assert prompts.get_templates("a {} here.") == ("a {} here.",)
  assert prompts.get_templates(["a {}.", "the {}."]) == ("a {}.", "the {}.")
  with pytest.raises(ValueError, match=r"'imagenet81': expected one of \['imagenet7'"):
    prompts.get_templates("imagenet81")
  with pytest.raises(ValueError, match=r"templates\[1\]: expected exactly one '\{\}'.*'the \{0\}'"):
    prompts.get_templates(["a {}.", "the {0}"])
  with pytest.raises(ValueError, match="at least one template"):
    prompts.get_templates([])


# --- Prompt ensembling -------------------------------------------------------------------------

SEQ, WIDTH = 24, 6
_R = np.random.RandomState(0).randn(SEQ, WIDTH).astype(np.float32)


def _tokenize(texts):
  """A stand-in tokenizer: the bytes of each string, truncated or zero-padded to SEQ."""
  out = np.zeros((len(texts), SEQ), np.int32)
  for i, t in enumerate(texts):
    b = np.frombuffer(t.encode()[:SEQ], np.uint8)
    out[i, :len(b)] = b
  return out


def _encode_np(tokens):
  """A stand-in text tower (nonlinear, so averaging before normalising would differ)."""
  return np.tanh(tokens.astype(np.float32) @ _R / 300.0) + 0.1


def test_class_embeddings_match_hand_ensemble():
  classes, templates = ["cat", "dog", "sea lion"], ["a photo of a {}.", "art of the {}.",
                                                     "a {} in a video game.", "itap of a {}."]
  shapes = []
  jitted = jax.jit(lambda t: jnp.tanh(t.astype(jnp.float32) @ _R / 300.0) + 0.1)

  def encode(tokens):
    shapes.append(tokens.shape)
    return jitted(tokens)

  got = zeroshot.class_embeddings(encode, _tokenize, classes, templates, batch_size=5)
  # 12 prompts in batches of 5: 5, 5, then 2 padded to 5; one shape, so one compilation.
  assert shapes == [(5, SEQ)] * 3
  assert got.shape == (3, WIDTH) and got.dtype == np.float32
  for c, name in enumerate(classes):
    per_template = []
    for t in templates:
      e = _encode_np(_tokenize([t.format(name)]))[0].astype(np.float64)
      per_template.append(e / np.sqrt(np.sum(e * e)))
    mean = np.sum(per_template, axis=0) / len(templates)
    np.testing.assert_allclose(got[c], mean / np.sqrt(np.sum(mean * mean)), rtol=1e-5, atol=1e-6)
  # Not the same as normalising the plain mean of the raw embeddings.
  raw = _encode_np(_tokenize([t.format("cat") for t in templates])).mean(0)
  assert np.max(np.abs(got[0] - raw / np.linalg.norm(raw))) > 1e-4

  seen = []
  zeroshot.class_embeddings(lambda t: seen.append(t) or _encode_np(t), _tokenize, ["cat"],
                            "imagenet7", batch_size=64)
  assert seen[0].shape == (64, SEQ)
  with pytest.raises(ValueError, match=r"encode_text_fn: expected \[4, width\]"):
    zeroshot.class_embeddings(lambda t: _encode_np(t)[:3], _tokenize, ["cat"], "photo", 4)


# --- Zero-shot top-1 / top-5 through both back-ends --------------------------------------------

N_CLASSES, D = 9, 6


def _zeroshot_data(seed=0):
  rng = np.random.RandomState(seed)
  class_embeds = _unit(rng.randn(N_CLASSES, D)).astype(np.float32)
  params = {"w": (np.eye(D) + 0.3 * rng.randn(D, D)).astype(np.float32)}
  batches = []
  for n_pad in (0, 5):  # the second batch ends in padding rows, with nonsense labels
    labels = rng.randint(0, N_CLASSES, 16)
    image = (class_embeds[labels] + 0.9 * rng.randn(16, D)).astype(np.float32)
    mask = np.arange(16) < 16 - n_pad
    labels[~mask] = 0
    image[~mask] = class_embeds[0]  # padding that would count as correct if it counted
    batches.append({"image": image, "labels": np.eye(N_CLASSES, dtype=np.float32)[labels],
                    "_mask": mask})
  return params, class_embeds, batches


def _zeroshot_brute_force(params, class_embeds, batches):
  top1 = top5 = count = 0
  for b in batches:
    for i in range(len(b["image"])):
      if not b["_mask"][i]:
        continue
      e = b["image"][i].astype(np.float64) @ params["w"]
      e /= np.sqrt(np.sum(e * e))
      scores = [float(np.dot(e, class_embeds[c])) for c in range(N_CLASSES)]
      label = int(np.argmax(b["labels"][i]))
      rank = sum(s > scores[label] for s in scores)
      top1, top5, count = top1 + (rank == 0), top5 + (rank < 5), count + 1
  return {"top1": top1 / count, "top5": top5 / count, "num_examples": count}


@pytest.mark.parametrize("parallelism", ["pmap", "pjit"])
def test_zeroshot_eval_matches_brute_force(parallelism):
  params, class_embeds, batches = _zeroshot_data()
  expected = _zeroshot_brute_force(params, class_embeds, batches)
  assert expected["num_examples"] == 27 and 0 < expected["top1"] < expected["top5"] < 1

  config = ml_collections.ConfigDict({"parallelism": parallelism, "batch": 16, "batch_eval": 16,
                                      "mesh": [("data", -1)]})
  backend = parallel.get_backend(config)
  eval_fn = zeroshot.make_eval_fn(lambda p, images: images @ p["w"])
  # The wiring the module docstring proposes: (params, class_embeds) as the step's first arg.
  step = backend.compile_eval_step(lambda pc, b: eval_fn(pc[0], pc[1], b))
  placed = backend.put_state((params, class_embeds))
  sums = None
  for b in batches:
    s = step(placed, backend.put_batch(b))
    sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
  got = zeroshot.finalize(backend.fetch(sums))
  assert got.keys() == expected.keys()
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-6)


def test_zeroshot_int_labels_and_few_classes():
  params, class_embeds, batches = _zeroshot_data(seed=1)
  b = dict(batches[1], labels=np.argmax(batches[1]["labels"], -1))
  eval_fn = jax.jit(zeroshot.make_eval_fn(lambda p, images: images @ p["w"]))
  onehot, ints = eval_fn(params, class_embeds, batches[1]), eval_fn(params, class_embeds, b)
  assert jax.tree.map(float, onehot) == jax.tree.map(float, ints)
  # Three classes: every label is in the "top 5".
  few = dict(b, labels=b["labels"] % 3)
  s = eval_fn(params, class_embeds[:3], few)
  assert float(s["top5"]) == float(s["count"]) == 11
  with pytest.raises(ValueError, match="labels have 9 classes; the class embeddings 3"):
    eval_fn(params, class_embeds[:3], batches[1])
  with pytest.raises(ValueError, match="no .unpadded. examples"):
    zeroshot.finalize({"top1": 0, "top5": 0, "count": 0})


# --- Retrieval R@k -----------------------------------------------------------------------------


def _retrieval_data(seed=0, n_img=14, d=8):
  rng = np.random.RandomState(seed)
  images = rng.randn(n_img, d).astype(np.float32)
  owner = np.repeat(np.arange(n_img), rng.randint(1, 5, n_img))  # 1 to 4 captions per image
  owner = owner[rng.permutation(len(owner))]
  texts = (images[owner] + 1.2 * rng.randn(len(owner), d)).astype(np.float32)
  return images, texts, owner


def _retrieval_brute_force(images, texts, owner, ks):
  images, texts = _unit(images.astype(np.float64)), _unit(texts.astype(np.float64))
  out = {}
  for k in ks:
    hits = 0
    for i in range(len(images)):
      sims = [float(np.dot(images[i], texts[j])) for j in range(len(texts))]
      top = np.argsort(sims)[::-1][:k]
      hits += any(owner[j] == i for j in top)
    out[f"i2t/R@{k}"] = hits / len(images)
  for k in ks:
    hits = 0
    for j in range(len(texts)):
      sims = [float(np.dot(texts[j], images[i])) for i in range(len(images))]
      hits += owner[j] in np.argsort(sims)[::-1][:k]
    out[f"t2i/R@{k}"] = hits / len(texts)
  return out


@pytest.mark.parametrize("chunk_size", [1024, 3])
def test_retrieval_matches_brute_force(chunk_size):
  images, texts, owner = _retrieval_data()
  ks = (1, 2, 5, 10)
  expected = _retrieval_brute_force(images, texts, owner, ks)
  got = retrieval.retrieval_metrics(images, texts, owner, ks, chunk_size=chunk_size)
  assert list(got) == [f"i2t/R@{k}" for k in ks] + [f"t2i/R@{k}" for k in ks]
  assert got == pytest.approx(expected, abs=1e-12)
  assert 0 < got["i2t/R@1"] < 1 and 0 < got["t2i/R@1"] < got["t2i/R@5"] < 1


def test_retrieval_drops_padding_rows():
  images, texts, owner = _retrieval_data(seed=1)
  expected = retrieval.retrieval_metrics(images, texts, owner)
  assert list(expected) == ["i2t/R@1", "i2t/R@5", "i2t/R@10", "t2i/R@1", "t2i/R@5", "t2i/R@10"]
  assert expected == pytest.approx(_retrieval_brute_force(images, texts, owner, (1, 5, 10)))
  # Padded as collected from batches: padding images (with captions of their own), padding
  # captions pointing at image 0, all equal to a real image's embedding so they would compete.
  pad_images = np.repeat(images[:1], 3, axis=0)
  all_images = np.concatenate([images[:5], pad_images, images[5:]])
  new_row = np.where(owner < 5, owner, owner + 3)
  all_texts = np.concatenate([texts, np.repeat(images[:1], 4, axis=0)])
  all_owner = np.concatenate([new_row, [5, 6, 0, 0]])
  image_mask = np.r_[np.ones(5), np.zeros(3), np.ones(len(images) - 5)].astype(bool)
  text_mask = np.r_[np.ones(len(texts)), [1, 1, 0, 0]].astype(bool)  # padded image's captions
  got = retrieval.retrieval_metrics(all_images, all_texts, all_owner, image_mask=image_mask,
                                    text_mask=text_mask)
  assert got == pytest.approx(expected, abs=1e-12)


def test_retrieval_ties_count_against_the_right_item():
  # A collapsed model: every embedding equal. Pessimistic ties give 0, not a perfect score.
  got = retrieval.retrieval_metrics(np.ones((4, 3)), np.ones((8, 3)), np.repeat(np.arange(4), 2),
                                    ks=(1, 6, 7))
  assert got == {"i2t/R@1": 0.0, "i2t/R@6": 0.0, "i2t/R@7": 1.0,
                 "t2i/R@1": 0.0, "t2i/R@6": 1.0, "t2i/R@7": 1.0}


def test_retrieval_errors():
  images, texts, owner = _retrieval_data()
  with pytest.raises(ValueError, match=r"1 of 14 images have no caption \(first: \[3\]\)"):
    retrieval.retrieval_metrics(images, texts[owner != 3], owner[owner != 3])
  with pytest.raises(ValueError, match=r"text_to_image: expected int \[\d+\]"):
    retrieval.retrieval_metrics(images, texts, owner.astype(np.float32))
  with pytest.raises(ValueError, match=r"indices must lie in \[0, 14\); found \[1, 14\]"):
    retrieval.retrieval_metrics(images, texts, np.where(owner == 0, 14, owner))
  with pytest.raises(ValueError, match="image width 8 != text width 7"):
    retrieval.retrieval_metrics(images, texts[:, :7], owner)
  with pytest.raises(ValueError, match="non-finite"):
    retrieval.retrieval_metrics(images * np.nan, texts, owner)


def test_chance_recall_by_enumeration():
  for n, k, m in [(10, 1, 1), (10, 3, 1), (9, 2, 3), (7, 4, 2), (5, 5, 1), (6, 5, 2)]:
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(i < m for i in s) for s in subsets) / len(subsets)
    assert retrieval.chance_recall(n, k, m) == pytest.approx(expected, abs=1e-12)
  assert retrieval.chance_recall(5000, 1) == pytest.approx(1 / 5000)
  assert 0 < retrieval.chance_recall(25000, 10, 5) < 0.0021
  with pytest.raises(ValueError, match="num_relevant=3"):
    retrieval.chance_recall(2, 1, 3)
