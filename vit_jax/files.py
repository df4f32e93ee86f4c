"""Files written whole: a temporary name beside the target, then a rename, so a reader (or a run
killed mid-write) never sees half a file. Local paths and gs:// alike (etils.epath)."""
import os
from typing import Union

from etils import epath


def write_atomic(path, data: Union[str, bytes]) -> str:
  """Writes `data` (text or bytes) to `path`, creating its folder; returns the path."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # The process id keeps apart writers of one file (sweep workers finishing together).
  tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
  if isinstance(data, bytes):
    tmp.write_bytes(data)
  else:
    tmp.write_text(data)
  tmp.replace(path)
  return str(path)
