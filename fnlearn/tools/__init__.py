"""Developer tools: the model summary with FLOPs (`python -m fnlearn.summary`), graphs, gradient hooks and
statistics, TensorBoard histograms every N steps, profiling, and where a NaN first appears."""
from fnlearn.tools.summary import Summary
from fnlearn.tools.summary import cost_flops
from fnlearn.tools.summary import summary
from fnlearn.tools.grads import grad_hook
from fnlearn.tools.grads import grad_stats
from fnlearn.tools.grads import hook_gradients
from fnlearn.tools.graph import GraphError
from fnlearn.tools.graph import hlo_dot
from fnlearn.tools.graph import jaxpr_dot
from fnlearn.tools.graph import render
from fnlearn.tools.anomaly import Anomaly
from fnlearn.tools.anomaly import find_anomaly
from fnlearn.tools.tensorboard import StepSummaries
from fnlearn.tools.tensorboard import histogram_stats
