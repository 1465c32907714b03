"""The pretraining engine: configuration, masks, optimisation, checkpoints, distribution, logging, pictures,
and the loop (:func:`mimfast.train.engine.train`) behind ``python -m mimfast.pretrain``."""
