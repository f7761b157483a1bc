"""The tiny Würstchen recipe, apart from the product: a procedurally generated captioned dataset (`data`), a
model-free checker that scores images against their prompts (`checker`), the small semantic encoder trained jointly
with Stage B (`semantic`), the CLIP vocabulary builder (`clip_vocab`) and the recipe that trains the three stages
from scratch and exports them (`recipe`). Nothing in `wurst_jax` outside this package imports it, except the CLI's
`train` command."""
