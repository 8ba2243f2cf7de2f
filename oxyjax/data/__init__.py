"""oxyjax data layer.

- :mod:`oxyjax.data.readers`: raw files -> ``SequenceDataset`` (pure Python, no TF).
- :mod:`oxyjax.data.pipeline`: ``ExampleArrays``, ``load_split``, ``BatchIterator``,
  ``eval_batches`` (no TF unless ``load_split(..., source="seqio")`` is used).
- :mod:`oxyjax.data.tfds_builders`, :mod:`oxyjax.data.tasks`: TFDS builders and the seqio
  task registry (import TensorFlow; import them only where needed).
"""
