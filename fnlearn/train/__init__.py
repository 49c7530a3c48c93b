"""Training core: state, losses, optimizers, pure steps, the shared loop pieces and `fit`.

It takes a model's `apply` and arrays as arguments; it imports no model.
"""
from fnlearn.train.finetune import FROZEN
from fnlearn.train.finetune import freeze
from fnlearn.train.finetune import load_pretrained
from fnlearn.train.finetune import param_groups
from fnlearn.train.finetune import partition
from fnlearn.train.fit import fit
from fnlearn.train.grads import accumulate_gradients
from fnlearn.train.loop import History
from fnlearn.train.loop import TrainingDiverged
from fnlearn.train.loop import batched
from fnlearn.train.loop import chunks
from fnlearn.train.loop import epoch_order
from fnlearn.train.loop import scan_steps
from fnlearn.train.losses import accuracy
from fnlearn.train.losses import cross_entropy
from fnlearn.train.losses import mse
from fnlearn.train.optim import decay_mask
from fnlearn.train.optim import make_optimizer
from fnlearn.train.optim import make_schedule
from fnlearn.train.precision import POLICIES
from fnlearn.train.precision import LossScale
from fnlearn.train.precision import Policy
from fnlearn.train.progress import StepProgress
from fnlearn.train.state import TrainState
from fnlearn.train.steps import make_eval_step
from fnlearn.train.steps import make_train_step
