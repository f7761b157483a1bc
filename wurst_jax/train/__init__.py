"""Training: the Würstchen objectives, optax train state and sharded step, orbax resume, the procedural
captioned dataset and its checker, and the tiny model trained from scratch."""
