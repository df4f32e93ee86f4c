"""tf.data input pipeline: per-process numpy batches for training and evaluation.

Imports only tf/tfds/numpy (never jax), and TensorFlow only when this package is imported.
"""
from vit_jax.input_pipeline.pipeline import EvalData
from vit_jax.input_pipeline.pipeline import make_eval_data
from vit_jax.input_pipeline.pipeline import make_train_dataset
from vit_jax.input_pipeline.pipeline import make_train_iterator
from vit_jax.input_pipeline.pipeline import per_process_batch
