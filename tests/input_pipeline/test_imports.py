"""DESIGN rule: input_pipeline/ imports only tf/tfds/numpy (and the standard library), never jax."""
import ast
import pathlib
import sys

import vit_jax

ALLOWED = {"tensorflow", "tensorflow_datasets", "numpy", "tokenizers", "ftfy", "vit_jax.input_pipeline"}


def test_input_pipeline_imports_only_tf_tfds_numpy():
  package = pathlib.Path(vit_jax.__file__).parent / "input_pipeline"
  for path in sorted(package.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        ok = (top in sys.stdlib_module_names or top in ALLOWED
              or name.startswith("vit_jax.input_pipeline"))
        assert ok, f"{path.name} imports {name}"
