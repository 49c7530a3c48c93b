"""One process of test_multihost's two-process run: `python tests/multihost_worker.py COORDINATOR
NUM_PROCESSES PROCESS_ID CONFIG_JSON DATA DATA_DIR OUT.npz` trains the recipe through
`jax.distributed` (alone, with NUM_PROCESSES 1) and saves the params this process holds at the end."""
import json
import sys

import jax
import numpy as np

from fnlearn.data import load_dataset
from fnlearn.recipes.cifar import CifarConfig, train_and_evaluate

if __name__ == "__main__":
    coordinator, num_processes, process_id, config, data, data_dir, out = sys.argv[1:]
    if int(num_processes) > 1:
        jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
    dataset = load_dataset(data, data_dir=data_dir)  # prepared by the test: read only
    result = train_and_evaluate(CifarConfig(**json.loads(config)), dataset, progress=False, log=lambda _: None)
    # The state is replicated: this process holds a whole copy of every leaf.
    np.savez(out, *[np.asarray(leaf) for leaf in jax.tree.leaves(result.state.params)],
             devices=len(jax.devices()))
