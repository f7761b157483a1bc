"""Training: run configs checked once (`config`), the Würstchen objectives (`objectives`), the optax train state, its
trainable mask, sharded step and orbax resume (`state`), one setup of all that for every trainer (`setup`), the
fine-tune of a checkpoint on `.npz` shards (`finetune`, `shards`), `prepare-data` (`prepare`) and the `train`
command (`cli`). The tiny model's recipe and data live in `wurst_jax.tiny`."""
