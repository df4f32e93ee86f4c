"""AugReg augmentation levels (Steiner et al. 2021, "How to train your ViT?"): mixup alpha and
RandAugment (layers, magnitude) per level, and the level named in an AugReg checkpoint filename."""
import dataclasses
import logging
import re


@dataclasses.dataclass(frozen=True)
class AugLevel:
  name: str
  mixup_alpha: float  # 0: no mixup
  randaug: tuple[int, int] | None  # (num_layers, magnitude); None: no RandAugment


# Upstream's table (vision_transformer README / AugReg paper, Table 7).
LEVELS = {
    "none": AugLevel("none", 0.0, None),
    "light1": AugLevel("light1", 0.0, (2, 0)),
    "light2": AugLevel("light2", 0.2, (2, 10)),
    "medium1": AugLevel("medium1", 0.2, (2, 15)),
    "medium2": AugLevel("medium2", 0.5, (2, 15)),
    "strong1": AugLevel("strong1", 0.5, (2, 20)),
    "strong2": AugLevel("strong2", 0.8, (2, 20)),
}

# Ops that turn uint8 pixels into float: RandAugment must come before them.
_FLOAT_OPS = ("value_range", "normalize")
_LABEL_OPS = ("onehot", "keep", "drop")


def get_level(name: str) -> AugLevel:
  if name not in LEVELS:
    raise ValueError(f"Unknown AugReg level {name!r}; known: {', '.join(LEVELS)}.")
  return LEVELS[name]


def level_from_filename(filename: str) -> str | None:
  """'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0[.npz]' -> 'medium1' (None if the
  name has no `aug_` field). A path or a `--`-joined fine-tuned name works too (the pre-training
  part comes first)."""
  m = re.search(r"(?:^|[-/])aug_([a-z]+\d*)(?=-|\.|$)", filename)
  if m is None:
    return None
  get_level(m.group(1))  # an aug_ field we do not know is an error, not "no augmentation"
  return m.group(1)


FROM_CHECKPOINT = "checkpoint"  # config.aug_level: the level in the pretrained file's name


def _level_of_pretrained(config) -> str:
  """The AugReg level named by config.pretrained_path, else by config.model_name."""
  names = [n for n in (config.get("pretrained_path"), config.get("model_name")) if n]
  for n in names:
    level = level_from_filename(n)
    if level is not None:
      logging.info("config.aug_level=%r: AugReg level %r from %s", FROM_CHECKPOINT, level, n)
      return level
  raise ValueError(f"config.aug_level={FROM_CHECKPOINT!r} takes the level from an AugReg "
                   "checkpoint filename (..-aug_medium1-..), but config.pretrained_path / "
                   f"config.model_name {names or '(both unset)'} name none.")


def insert_randaug(pp: str, num_layers: int, magnitude: int) -> str:
  """Puts randaug(num_layers, magnitude) into a pp string where pixels are still uint8: before the
  first value_range/normalize, else before the label ops, else at the end."""
  ops = [o for o in pp.split("|") if o.strip()] if pp.strip() else []
  names = [o.strip().partition("(")[0].strip() for o in ops]
  at = next((i for i, n in enumerate(names) if n in _FLOAT_OPS),
            next((i for i, n in enumerate(names) if n in _LABEL_OPS), len(ops)))
  return "|".join(ops[:at] + [f"randaug({num_layers},{magnitude})"] + ops[at:])


def resolve(config) -> tuple[str, float]:
  """(pp.train with the level's RandAugment, mixup alpha) from config.aug_level and explicit keys.

  An explicit randaug in pp.train or a config.mixup_alpha together with aug_level is an error:
  which one wins would be a guess.
  """
  pp, alpha = config.pp.train, config.mixup_alpha
  name = config.aug_level
  if not name:
    return pp, alpha
  if name == FROM_CHECKPOINT:
    name = _level_of_pretrained(config)
  level = get_level(name)
  if "randaug" in pp:
    raise ValueError(f"config.aug_level={name!r} sets RandAugment, but pp.train already has one: "
                     f"{pp!r}. Use one of them.")
  if alpha:
    raise ValueError(f"config.aug_level={name!r} sets mixup alpha {level.mixup_alpha}, but "
                     f"config.mixup_alpha={alpha} too. Use one of them.")
  if level.randaug is not None:
    pp = insert_randaug(pp, *level.randaug)
  return pp, level.mixup_alpha
