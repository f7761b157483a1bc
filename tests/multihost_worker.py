"""One process of the multi-host test: `python multihost_worker.py PID NPROC PORT DECODER PRIOR OUT.npy`.

Each process has 4 CPU devices; together they form one ("data", "model") mesh, load the pipeline sharded,
generate images for the same prompt list and write the gathered images (process 0).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import wurst_jax as wj  # noqa: E402

pid, nproc, port, decoder, prior, out, mode = sys.argv[1:8]
wj.initialize_distributed(f"localhost:{port}", int(nproc), int(pid))
assert jax.process_count() == int(nproc) and jax.device_count() == 4 * int(nproc)
model = 2 if mode == "tp" else 1
mesh = wj.make_mesh(data=-1, model=model)
pipe = wj.WuerstchenPipeline.from_pretrained(decoder, prior, mesh=mesh, sharding=mode, progress=False)
images = pipe(
    ["a red circle", "a blue square", "a green triangle"],
    height=128,
    width=128,
    prior_num_inference_steps=3,
    num_inference_steps=2,
    seed=11,
    output_type="np",
).images
if jax.process_index() == 0:
    np.save(out, images)
print(f"process {pid}: {images.shape}", flush=True)
