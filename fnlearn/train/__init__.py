"""Training core: state, losses, optimizers, pure steps and the fit loop.

It takes a model's `apply` and arrays as arguments; it imports no model.
"""
from fnlearn.train.fit import epoch_batches
from fnlearn.train.fit import fit
from fnlearn.train.grads import accumulate_gradients
from fnlearn.train.losses import accuracy
from fnlearn.train.losses import cross_entropy
from fnlearn.train.losses import mse
from fnlearn.train.optim import decay_mask
from fnlearn.train.optim import make_optimizer
from fnlearn.train.optim import make_schedule
from fnlearn.train.state import TrainState
from fnlearn.train.steps import NonFiniteError
from fnlearn.train.steps import make_eval_step
from fnlearn.train.steps import make_train_step
