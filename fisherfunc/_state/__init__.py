"""The state layer: what survives a batch.

``state`` (``FisherState``) and ``ema`` (the one EMA update and its bias correction) → ``step``
(``make_fisher_step``) → ``codec`` (storage dtypes), ``keys`` (flat keys), ``merge`` (merging
estimates), ``container`` (sealed, atomic safetensors files) and ``files`` (``save``/``load``).
"""
